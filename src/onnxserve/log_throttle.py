"""At most one log record every so often about something that may happen thousands of times a second.

A flood (connections closed to make room, gRPC calls displaced from the message room, connections
refused for want of memory) must not turn into a flood of log lines: each place counts its events in a
:class:`LogThrottle` and logs only when :meth:`LogThrottle.due` says so, with how many happened since
its last record. A leaf module (it imports nothing of onnxserve), so every layer may use it: core (a failed
batch run again one request at a time), protocols (errors answered with a path hidden), server.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

EVERY_SECONDS = 10.0
"""The default: at most one record every 10 s."""

_every = EVERY_SECONDS


def set_every(seconds: float) -> None:
    """Set the interval of every throttle made without one of its own (the server's
    ``--log-repeat-seconds``): those made before this call follow it too."""
    global _every
    if not seconds > 0:
        raise ValueError(f"a log repeat interval must be positive, not {seconds!r}")
    _every = seconds


class LogThrottle:
    """Counts events; says when one of them may be logged, with how many happened since the last record."""

    def __init__(self, every: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._count = 0
        self._next = float("-inf")  # the first event is logged at once

    def due(self) -> int:
        """Count one event; the number of events to report (this one included) when a record is due now,
        else 0 (counted for the next record)."""
        self._count += 1
        now = self._clock()
        if now < self._next:
            return 0
        count, self._count = self._count, 0
        self._next = now + self.every
        return count

    @property
    def every(self) -> float:
        """Seconds between records: its own, else the process's (:func:`set_every`)."""
        return _every if self._every is None else self._every

    def note(self, count: int) -> str:
        """What a record reporting ``count`` events (``due``'s answer) adds to its message: nothing for one."""
        if count <= 1:
            return ""
        return f" ({count:,} such since the last line; reported every {self.every:g} s at most)"


KEYS = 1024
"""The most keys a :class:`LogThrottles` keeps a throttle for."""


class LogThrottles:
    """A :class:`LogThrottle` per key (a model's name, an error kind), for a line each model or kind has
    apart; at most ``keys`` of them, the least recently used leaving first (its next event is then
    reported at once)."""

    def __init__(self, keys: int = KEYS, every: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.keys = keys
        self.every = every
        self._clock = clock
        self._throttles: OrderedDict[Hashable, LogThrottle] = OrderedDict()
        self._lock = threading.Lock()  # used from the event loop and from instance threads

    def of(self, key: Hashable) -> LogThrottle:
        with self._lock:
            throttle = self._throttles.pop(key, None)
            if throttle is None:
                throttle = LogThrottle(self.every, self._clock)
            self._throttles[key] = throttle
            if len(self._throttles) > self.keys:
                self._throttles.popitem(last=False)
            return throttle


_UNEXPECTED = LogThrottles()
"""The throttle of unexpected errors' tracebacks, by the error's type and where it happened."""


def log_unexpected(logger: logging.Logger, where: str, message: str, *args: object) -> None:
    """Log the error being handled (call it in an ``except`` block) with its traceback: at most once every
    interval per (error type, ``where``: a port or part, a gRPC method; never what a client names), with how
    many there were since. A request that
    meets a bug fails the same way each time it is sent: one client wrote 42 lines of traceback a request,
    1.76 MB of log a second (outside attack rt35)."""
    error = sys.exc_info()[1]
    throttle = _UNEXPECTED.of((type(error).__name__, where))
    if count := throttle.due():
        logger.error("%s%s", message % args if args else message, throttle.note(count), exc_info=True)
