"""grpc-core's queue of calls waiting for the application, followed and bounded by the gRPC port's front.

grpc-core keeps each call it has parsed in a queue until grpc.aio takes it (one at a time, a few thousand
a second on two cores: live calls, and dead ones a client reset or left behind alike). Past 1,000 calls
waiting there (``grpc.server.max_pending_requests``) it drops new calls at random, and past 3,000 all of
them, answering CANCELLED before the application sees them: the calls of every client. Per-address budgets
(:mod:`onnxserve.server.abandoned_calls`) keep one address from filling it; many addresses, each within
its budget, still did (outside attack rt47 M1: 8,000 addresses of 100 calls each had 53 of 70 other
clients' calls answered CANCELLED).

So the front counts the queue itself: every call it hands on to grpc-core is named by a field the front adds
at the end of the call's header block, which goes on in one frame (``CALL_FIELD``, a literal the compression
table never keeps, so the client's table and grpc-core's stay as they were), and the server's handler lookup,
which grpc.aio runs for every call it takes (dead ones too), reports the name back (:meth:`CoreQueue.taken`; a
call taken without it, whose name grpc-core dropped, takes the oldest counted). Calls the front has handed on
and the application has not taken are the queue, or on their way to it. A call grpc-core never queues is not
counted, or not for long: one whose header block grpc-core refuses before queueing it (no POST, no ``te:
trailers``...: ``grpc_front.queued``) is named but not counted; one grpc-core resets unanswered for being
malformed or past its stream limit (PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM), one past the last stream
of its connection's GOAWAY, and one whose bytes never reached grpc-core leave the count
(:meth:`CoreQueue.never_queued`); any other leaves it once a call handed on ``ORDER_SLACK_SECONDS`` after it
is taken (the queue is first in, first out), once nothing has been taken for ``IDLE_SECONDS``, or after
``FORGET_SECONDS``.

The front decides when a new call's header block is whole (it knows the call's method then). Calls wait in
grpc-core's queue behind every call there, first in first out, so the bound on them is what grpc.aio takes
in ``QUEUE_SECONDS`` at its recent pace (:attr:`CoreQueue.bound`, at least ``MIN_BOUND``, at most ``limit``
less the probes' room). While calls wait, or past half the bound, a new call waits in the front, with what
its connection sends after it (still read, up to a bound, so that a client that goes is seen to go), unless
its client address has fewer than ``FEW`` calls counted (a client with a call or two: a person) and the
count is under the bound; past the bound, every new call waits but a health probe (``PROBE_ROOM`` of them,
up to ``limit``). Waiting calls go on as the application takes calls, first come first served, a few calls
of a connection a turn (one that holds more waits again, behind the others: a connection with a backlog
took hundreds of places at once), those of light addresses first past half the bound. A call waits rather
than being refused: a refusal the client would retry (RST_STREAM REFUSED_STREAM) cannot be made without also
keeping its header block from grpc-core, whose compression table must see every block.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

QUEUE_LIMIT = 800
"""Calls counted in grpc-core's queue past which every new call waits in the front, unless told
(``--grpc-max-queued-calls``; 0: none): under grpc-core's 1,000, the calls on their way to it included."""

FEW = 4
"""Calls an address may have counted and still pass between ``bound / 2`` and ``bound``."""

QUEUE_SECONDS = 0.2
"""How long, at grpc.aio's recent pace, the calls counted in grpc-core's queue take to be taken, past which
a new call other than a probe waits in the front (:attr:`CoreQueue.bound`): in grpc-core's queue a call waits
behind every call there, first in first out, where the front lets probes pass (``PROBE_ROOM``). With a fixed
bound of 800, under a flood of model calls from 940 addresses grpc.aio took a few hundred calls a second, and
a health probe waited seconds behind them (outside attacks rt51, rt52: probe medians 1.3 to 3.8 s)."""

MIN_BOUND = 32
"""The bound is never lower than this (unless the limit less the probes' room is): enough calls queued that
grpc.aio never waits for the front to hand on the next."""

PACE_WEIGHT = 1 / 64
MIN_TAKE_SECONDS = 1e-6
"""grpc.aio's pace: the mean of the waits between two calls it took with a call counted all along (a backlog;
weighted: each new one ``PACE_WEIGHT``), each at least ``MIN_TAKE_SECONDS``."""

PROBE_ROOM = 32
"""Health calls (ServerLive, ServerReady: the methods open without a token, ``auth.OPEN_GRPC_METHODS``) pass
the front's wait while fewer than this (at most half the limit) are counted and the count is under the limit,
which keeps this room for them above the bound: a readiness probe waits behind at most the bound's calls
and these. More of them wait like other calls (a flood of probes cannot keep other calls waiting)."""

FORGET_SECONDS = 5.0
"""A call counted this long is no longer counted: grpc.aio drains 1,000 calls in well under a second, so a
call never taken by then was never queued (a way out of grpc-core the front did not see)."""

ORDER_SLACK_SECONDS = 2.0
"""grpc-core's queue is first in, first out (one queue of calls for the generic handlers grpc.aio serves): when
grpc.aio takes a call, the calls handed on more than this before it and still counted never reached the queue,
and are no longer counted (the slack: grpc-core reads its connections in its own order, and late under load:
with 0.5 s, 940 connections of model calls had calls still on their way taken off the count, and grpc-core's
queue passed 1,000: outside attack rt52). So a call grpc-core refused unqueued in a way the front did not see
holds others for a few seconds at most."""

IDLE_SECONDS = 1.0
"""When grpc.aio has taken no call for this long (or for ``IDLE_GAPS`` times the longest wait between two
calls it took lately, if longer), grpc-core's queue is empty (grpc.aio takes the next call as soon as there is
one, on the event loop this runs on): the calls counted that were handed on before are no longer counted.
It was 0.2 s, and under a flood of model calls from 940 connections, with the event loop busy, grpc.aio took
nothing for 0.21 to 0.27 s more than once with 800 calls queued; those went uncounted, and grpc-core's queue
passed 1,000 (outside attack rt52: other clients' calls answered CANCELLED)."""

IDLE_GAPS = 4.0
GAP_DECAY = 0.999
"""The longest wait between two calls grpc.aio took with calls counted all along, followed: each take's wait,
or the last longest times ``GAP_DECAY`` if longer (it fades over thousands of takes)."""

BEAT_SECONDS = 0.1
STALL_SECONDS = 0.05
"""While calls are counted, a timer beats every ``BEAT_SECONDS``; a beat later than ``STALL_SECONDS`` says the
event loop stood still that long (a decode holding the interpreter lock, a model loading): the ages above are
counted on the loop's running time, without its stalls. A call cannot be taken while the loop stands, and
counted on the clock a 7 s stall (a 62 MB parameters map decoding) took every queued call off the count:
grpc-core's queue passed 1,000 as the front handed on more (outside attack rt53: CANCELLED)."""

CALL_FIELD = b"onnxserve-front-call"
"""The header field naming each call the front hands on (its value: a decimal number)."""

WAKE_SCAN = 256
"""Waiting connections looked at, from the first, for one of a light address when the count is between the
two bounds."""


class Waiter(Protocol):
    """A connection with a call waiting for room in the queue."""

    host: str

    def room(self) -> None:
        """Its call may go on."""


def call_field(name: int) -> bytes:
    """``CALL_FIELD`` with value ``name``, as an HPACK literal that is never indexed (RFC 7541, 6.2.3: the
    compression tables of both ends stay as they were)."""
    value = str(name).encode()
    return b"\x10" + bytes([len(CALL_FIELD)]) + CALL_FIELD + bytes([len(value)]) + value


def call_name(metadata: Sequence[tuple[str, str | bytes]] | None) -> int | None:
    """The front's name of a call from its metadata (the last ``CALL_FIELD``: the front's comes after any the
    client sent); None if it has none."""
    field = CALL_FIELD.decode()
    name = None
    for key, value in metadata or ():
        if key == field and isinstance(value, str) and value.isdigit() and len(value) < 20:
            name = int(value)
    return name


class CoreQueue:
    """The calls the front has handed on that grpc.aio has not taken (the module's docstring)."""

    def __init__(self, limit: int = QUEUE_LIMIT, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._names = 0
        # name -> (when handed on, its address, whether a probe)
        self._calls: OrderedDict[int, tuple[float, str, bool]] = OrderedDict()
        self.by_address: dict[str, int] = {}
        self._probes = 0  # probes counted
        self._take_seconds = QUEUE_SECONDS / max(limit, 1)  # grpc.aio's pace: the mean wait between takes lately
        self._waiting: OrderedDict[Waiter, None] = OrderedDict()
        self._wake: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stalled = 0.0  # seconds the event loop stood still, as the beats saw it (``BEAT_SECONDS``)
        self._beat_due = 0.0  # when the next beat should come, on ``clock``
        self._taken_at = clock()  # when grpc.aio last took a call (``_now``)
        self._gap = 0.0  # the longest wait between two takes lately (``GAP_DECAY``)
        self._turn: Waiter | None = None  # the waiting connection whose calls go on now
        self._turn_left = 0  # how many more of its calls may

    def __len__(self) -> int:
        return len(self._calls)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def probe_room(self) -> int:
        """How many probes may be counted and pass calls that wait: ``PROBE_ROOM``, at most half the limit."""
        return min(PROBE_ROOM, self.limit // 2)

    @property
    def bound(self) -> int:
        """How many calls counted a new call other than a probe may join: what grpc.aio takes in about
        ``QUEUE_SECONDS`` at the pace it took them lately, at least ``MIN_BOUND``, at most ``limit`` less the
        probes' room (at least 1)."""
        pace = max(MIN_BOUND, int(QUEUE_SECONDS / self._take_seconds))
        return max(1, min(self.limit - self.probe_room, pace))

    def admits(self, host: str, waiter: Waiter | None = None, probe: bool = False) -> bool:
        """Whether a new call of ``host`` (on the connection ``waiter``) may go to grpc-core now: under
        ``limit``, a probe (``PROBE_ROOM`` of them counted at most); under :attr:`bound`, a light address's
        call; under half of it, any call, unless calls wait (then it waits its turn behind them), and the calls
        of the connection whose turn it is (``FEW`` a turn)."""
        if self.limit <= 0:
            return True
        self._forget()
        count = len(self._calls)
        if count >= self.limit:
            return False
        if probe and self._probes < self.probe_room:
            return True
        bound = self.bound
        if count >= bound:
            return False
        if self.by_address.get(host, 0) < FEW:
            return True
        if waiter is not None and waiter is self._turn and self._turn_left > 0:
            self._turn_left -= 1
            return True
        return not self._waiting and count < bound // 2

    def handed_on(self, host: str, counted: bool = True, probe: bool = False) -> int:
        """A call of ``host`` goes to grpc-core: its name; counted in the queue unless grpc-core refuses it
        unqueued (every call is named, so that a call taken without a name is known to be one that lost it);
        ``probe``: a health call (``PROBE_ROOM``)."""
        self._names += 1
        name = self._names
        if self.limit > 0 and counted:
            self._calls[name] = (self._now(), host, probe)
            self.by_address[host] = self.by_address.get(host, 0) + 1
            self._probes += probe
            self._keep_beating()
        return name

    def taken(self, name: int | None) -> None:
        """grpc.aio took the call named ``name``; None: a call whose name grpc-core dropped (it drops the fields
        after one it refuses in some header blocks), taken for the oldest counted: the queue is first in,
        first out."""
        now = self._now()
        if self._calls:  # how long calls were counted and none taken
            oldest = next(iter(self._calls.values()))[0]
            self._gap = max(now - max(self._taken_at, oldest), self._gap * GAP_DECAY)
            if oldest < self._taken_at:  # a call counted since the last take: grpc.aio's pace, not a call's way
                wait = max(now - self._taken_at, MIN_TAKE_SECONDS)
                self._take_seconds += (wait - self._take_seconds) * PACE_WEIGHT
        self._taken_at = now
        if name is None:
            if self._calls:
                self._remove(next(iter(self._calls)))
            return
        if (entry := self._calls.get(name)) is None:
            return
        self._remove(name)
        # calls handed on well before it and not taken: never queued (first in, first out)
        self._drop_before(entry[0] - ORDER_SLACK_SECONDS)

    def never_queued(self, name: int) -> None:
        """The call named ``name`` never reached grpc-core's queue."""
        self._remove(name)

    def queued(self, name: int) -> bool:
        return name in self._calls

    def _remove(self, name: int) -> None:
        entry = self._calls.pop(name, None)
        if entry is None:
            return
        host = entry[1]
        self._probes -= entry[2]
        left = self.by_address[host] - 1
        if left:
            self.by_address[host] = left
        else:
            del self.by_address[host]
        if self._waiting and self._wake is None:
            self._wake = asyncio.get_running_loop().call_soon(self._go_on)

    def _forget(self) -> None:
        if not self._calls:
            return
        now = self._now()
        idle = max(IDLE_SECONDS, IDLE_GAPS * self._gap)
        self._drop_before(now - (idle if now - self._taken_at > idle else FORGET_SECONDS))

    def _drop_before(self, until: float) -> None:
        """No longer count the calls handed on at ``until`` or before (the oldest first)."""
        calls = self._calls
        while calls:
            name, (when, _, _) = next(iter(calls.items()))
            if when > until:
                break
            self._remove(name)

    def _now(self) -> float:
        """The event loop's running time: ``clock`` less the stalls the beats saw."""
        return self._clock() - self._stalled

    def _keep_beating(self) -> None:
        """Beat while calls are counted or wait: to see the loop's stalls, and to forget old calls on time
        while calls wait (nothing else may come to do it)."""
        if self._timer is None and (self._calls or self._waiting):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a test of the counting alone): no beats
                return
            self._beat_due = self._clock() + BEAT_SECONDS
            self._timer = loop.call_later(BEAT_SECONDS, self._beat)

    def _beat(self) -> None:
        self._timer = None
        late = self._clock() - self._beat_due
        if late > STALL_SECONDS:
            self._stalled += late
        if self._waiting:
            self._forget()
            self._go_on()
        self._keep_beating()

    # -- waiting calls ----------------------------------------------------------------------------------
    def wait(self, waiter: Waiter) -> None:
        """``waiter``'s next call waits for room (:meth:`Waiter.room` when it has some)."""
        self._waiting[waiter] = None
        self._keep_beating()

    def discard(self, waiter: Waiter) -> None:
        self._waiting.pop(waiter, None)

    def _go_on(self) -> None:
        """Let waiting calls go on while there is room: first come first, those of light addresses first
        between the two bounds."""
        self._wake = None
        while self._waiting:
            count = len(self._calls)
            bound = self.bound
            if count >= bound:
                return
            waiter = next(iter(self._waiting)) if count < bound // 2 else self._light()
            if waiter is None:
                return
            del self._waiting[waiter]
            before = len(self._calls)
            self._turn, self._turn_left = waiter, FEW  # a few calls a turn: a connection holding many waits again
            try:
                waiter.room()
            except Exception:  # one connection's failure must not keep the others waiting
                log.exception("a gRPC connection failed as its call went on from the front's wait")
            finally:
                self._turn = None
            if len(self._calls) == before and waiter not in self._waiting:
                continue  # it handed nothing on (its client left meanwhile): the room is still there
            if len(self._calls) == before:
                return  # it waits again without a call handed on: stop, lest the loop never ends

    def _light(self) -> Waiter | None:
        for index, waiter in enumerate(self._waiting):
            if index == WAKE_SCAN:
                break
            if self.by_address.get(waiter.host, 0) < FEW:
                return waiter
        return None
