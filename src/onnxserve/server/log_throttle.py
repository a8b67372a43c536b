"""At most one log record every so often about something that may happen thousands of times a second.

A flood (connections closed to make room, gRPC calls displaced from the message room, connections
refused for want of memory) must not turn into a flood of log lines: each place counts its events in a
:class:`LogThrottle` and logs only when :meth:`LogThrottle.due` says so, with how many happened since
its last record.
"""

from __future__ import annotations

import time
from collections.abc import Callable

EVERY_SECONDS = 10.0
"""The default: at most one record every 10 s."""


class LogThrottle:
    """Counts events; says when one of them may be logged, with how many happened since the last record."""

    def __init__(self, every: float = EVERY_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
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
