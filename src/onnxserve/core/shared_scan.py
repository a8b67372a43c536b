"""One reading of the model catalog at a time, shared by the control requests that ask for it.

Under explicit model control, the repository index lists the models of the catalog that are not loaded,
and a load finds its model there by name: each read the catalog (rescanned the repository, or re-read the
config file) on the event loop, 0.3 to 0.85 s for a repository of 3,000 model folders, so eight clients
asking for the index in a loop held probes 17.9 s (outside attack rt25). A :class:`SharedScan` reads on a
worker thread, one reading at a time; requests that come while one runs share it, and its result answers
those that come within ``FRESH_SECONDS`` after it started. A caller that must see the catalog as it is
now (a load by a name the last reading did not have) asks for a reading that starts after its own
arrival, still shared with the others that ask meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

FRESH_SECONDS = 1.0
"""How long after it started a reading of the catalog answers requests for it: what a flood of repository
index requests costs is one reading a second."""


class SharedScan(Generic[T]):
    """The latest result of ``read`` (a blocking call, run on a worker thread), shared (see the module)."""

    def __init__(self, read: Callable[[], T]) -> None:
        self._read = read
        self._running: asyncio.Future[T] | None = None
        self._running_since = 0.0
        self._result: tuple[float, T] | None = None  # the last reading that succeeded: (started, result)
        self._result_wall = 0.0  # when it started, by the wall clock (file times are on it)

    async def get(self, since: float | None = None) -> T:
        """A result of a reading started at ``since`` or later (by default: ``FRESH_SECONDS`` ago); a reading
        that fails raises to every caller that waited for it, and is not kept."""
        if since is None:
            since = time.monotonic() - FRESH_SECONDS
        while True:
            if self._result is not None and self._result[0] >= since:
                return self._result[1]
            running = self._running
            if running is None:
                running = self._start()
            elif self._running_since < since:  # started too early for this caller: wait for it, then read again
                await asyncio.wait([running])
                continue
            return await asyncio.shield(running)

    @property
    def result_started(self) -> float | None:
        """When the reading of the latest result started (``time.time()``: file times compare with it), or
        None before any."""
        return self._result_wall if self._result is not None else None

    def _start(self) -> asyncio.Future[T]:
        started, wall = time.monotonic(), time.time()
        running: asyncio.Future[T] = asyncio.ensure_future(asyncio.to_thread(self._read))
        self._running, self._running_since = running, started

        def finished(future: asyncio.Future[T]) -> None:
            if self._running is future:
                self._running = None
            if not future.cancelled() and future.exception() is None:
                self._result, self._result_wall = (started, future.result()), wall

        running.add_done_callback(finished)
        return running
