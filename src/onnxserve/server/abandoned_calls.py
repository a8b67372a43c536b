"""How many gRPC calls each client address leaves behind in grpc-core unanswered (the gRPC port's front).

A call a client abandons (its connection closed, or the call reset, before grpc-core began to answer it; or
ended by grpc-core itself once its deadline passed, unseen by the server)
stays in grpc-core's queue of calls waiting for the application, and grpc.aio takes that queue one call
at a time: each dead call costs the event loop a turn (about 3,000 to 4,000 a second on two cores). Past
1,000 calls waiting, grpc-core drops new calls at random, and past 3,000 all of them (its
``grpc.server.max_pending_requests`` and ``..._hard_limit``), answering them CANCELLED without the
application seeing them: the calls of every client, not only the one that left its calls behind. One
client opening connections of 50 calls and dropping them 5 ms later, 170 a second, had 30 to 75% of other
clients' calls answered CANCELLED (outside attack rt46's follow-up; a bare grpc.aio server, grpcio 1.82
and later, does the same; 1.81 and before queue the calls and answer them seconds late instead).

:class:`AbandonedCalls` is a token bucket per address: a client may leave ``RATE`` calls a second behind,
``BURST`` at once (both ``--grpc-max-abandoned-calls``). An address past it has its new connections
refused, and a connection of its that abandons more is closed, until the bucket has refilled above zero.
Behind a gRPC proxy every client shares the proxy's address, and the budget with it: raise it there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RATE = 250.0
"""Calls a second an address may abandon: a small part of what grpc.aio drains, so that a few addresses
together cannot fill grpc-core's queue; far above what an honest client abandons (its cancelled calls and
missed deadlines)."""

BURST = 250.0
"""Calls an address may abandon at once: a quarter of the queue grpc-core keeps before it drops calls (with
500, two addresses bursting together reached it: outside attack rt49). A client that leaves more at once (a
process killed with 300 calls open) has its new connections refused until the bucket refills above zero, a
fraction of a second."""

ADDRESS_CALLS = 400
"""Calls one client address may have that grpc-core has not begun to answer, over all its connections, unless
told (``--grpc-max-address-calls``; the gRPC front holds it). Live calls wait in the same queue: one address
with 20 connections of 100 calls in flight, reading every answer, had 20 of 60 other clients' probes answered
CANCELLED (outside attack rt47 H2; 8 of 100: none); two addresses at the cap stay under grpc-core's 1,000."""

MOST_ADDRESSES = 4_096
"""Addresses followed at most; past it, those whose bucket has refilled are forgotten first (an address
whose bucket is full needs no entry)."""


class AbandonedCalls:
    """Per client address, a token bucket of the calls it may leave unanswered in grpc-core."""

    def __init__(self, rate: float = RATE, burst: float = BURST, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._levels: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)

    def _level(self, host: str, now: float) -> float:
        tokens, counted = self._levels.get(host, (self.burst, now))
        return min(self.burst, tokens + (now - counted) * self.rate)

    def charge(self, host: str, calls: int) -> bool:
        """``host`` left ``calls`` calls unanswered; whether it is now past its budget (never, with a rate
        of 0: no limit)."""
        if calls <= 0 or self.rate <= 0:
            return self.barred(host)
        now = self._clock()
        level = self._level(host, now) - calls
        self._levels[host] = (level, now)
        if len(self._levels) > MOST_ADDRESSES:
            self._forget_refilled(now)
        return level < 0

    def barred(self, host: str) -> bool:
        """Whether ``host`` is past its budget (its new connections are refused)."""
        if host not in self._levels or self.rate <= 0:
            return False
        now = self._clock()
        level = self._level(host, now)
        if level >= self.burst:
            del self._levels[host]
        return level < 0

    def _forget_refilled(self, now: float) -> None:
        for host in [host for host in self._levels if self._level(host, now) >= self.burst]:
            del self._levels[host]
        while len(self._levels) > MOST_ADDRESSES:  # all in debt: the one counted longest ago goes
            del self._levels[min(self._levels, key=lambda host: self._levels[host][1])]

    def __len__(self) -> int:
        return len(self._levels)
