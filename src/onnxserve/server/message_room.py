"""The room for arriving gRPC messages, shared fairly between clients.

grpcio receives a whole request message once a handler asks for it (``ServicerContext.read()``) and
shows nothing of it before, neither its size nor its first bytes. So each gRPC call waiting for its
message (a unary call's one, a stream's next one) takes a place of the largest message
(``--grpc-max-message-bytes``) in this room, as large as ``--max-inflight-bytes`` and apart from it,
and leaves it as soon as the message has arrived (it is then held in the in-flight budget at its
size). Calls that never send, or idle streams between two messages, would keep their places until
``--body-timeout``; so when a call finds the room full, a waiting call gives way to it (displacement,
as HTTP connection slots do, ``server.connections``):

1. **The heaviest client.** When the client holding the most places holds at least two more than the
   newcomer's client (``fairness.gives_way``), its newest waiting call gives way. One client (a token's
   identity, else an address) therefore cannot keep others out, however many calls it opens.
2. **A call waiting too long.** Else a call that has waited for its message longer than ``stale_after``
   seconds (``--grpc-message-wait``) gives way to any newcomer, the one waiting longest first: a
   message of 64 MiB arrives in about half a second at 1 Gbit/s, so such a call is idle (or stalled),
   and many clients that each open a few idle calls only hold the room that long.
3. Else the newcomer waits up to ``seconds`` for a place to be freed or to become displaceable
   (RESOURCE_EXHAUSTED then).

A call that gives way is interrupted (its task is cancelled while it awaits ``ctx.read()``) and ends
itself with RESOURCE_EXHAUSTED (:data:`DISPLACED`); its place passes to the newcomer at once. A call
whose message has arrived has left the room; one whose message arrived while its handler has not yet
resumed (its task no longer waits) is never chosen. Every method runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from onnxserve.core.fairness import gives_way
from onnxserve.log_throttle import LogThrottle

log = logging.getLogger(__name__)

DEFAULT_MESSAGE_WAIT_SECONDS = 5.0
"""How long a call may wait for its message and keep its place in a full room (``--grpc-message-wait``)."""

DISPLACED = (
    "this call was waiting for its request message while the room for arriving gRPC messages was full "
    "(each counted at --grpc-max-message-bytes until it has arrived; --max-inflight-bytes), and the server "
    "needed the room for other clients' messages; retry"
)
"""The message of a call that gave way (RESOURCE_EXHAUSTED)."""


@dataclass(eq=False)
class Place:
    """One call's place in the room while it waits for its message."""

    client: str
    size: int
    since: float
    """When it started waiting for its message (the loop's clock)."""
    task: asyncio.Task[Any] | None
    displaced: bool = False
    """It gave way: its task was cancelled, and it must end with RESOURCE_EXHAUSTED (:data:`DISPLACED`)."""
    arrived: bool = False
    """Its message has arrived: it stays counted until the in-flight budget takes the message, and is never
    displaced."""
    left: bool = False


@dataclass
class MessageRoom:
    """Places of ``limit`` bytes in all (0: no limit) for calls waiting for their messages (module docstring)."""

    limit: int
    stale_after: float = DEFAULT_MESSAGE_WAIT_SECONDS
    held: int = 0
    places: dict[str, dict[Place, None]] = field(default_factory=dict)
    """Each client's places, oldest first (a dict as an ordered set: a place leaves in constant time)."""
    _freed: asyncio.Event = field(default_factory=asyncio.Event)
    _displaced: LogThrottle = field(default_factory=LogThrottle)
    """At most one WARNING every 10 s about calls displaced from the room, with their count."""

    def __len__(self) -> int:
        return sum(len(held) for held in self.places.values())

    async def enter(self, client: str, size: int, seconds: float) -> Place | None:
        """A place of ``size`` bytes for the current task, taken now, or within ``seconds``; None when none."""
        loop = asyncio.get_running_loop()
        place = Place(client, size, loop.time(), asyncio.current_task())
        if self._take(place, place.since):
            return place
        deadline = place.since + seconds
        while True:
            now = loop.time()
            if now >= deadline:
                return None
            # Wake when a place is freed, or when the oldest one may be displaced.
            wake = min(deadline, self._next_stale(now)) - now
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), max(wake, 0.0))
            now = loop.time()
            if self._take(place, now):
                return place

    def leave(self, place: Place) -> None:
        """Give the place back (its message arrived, or its call ended); nothing if it already gave way."""
        if place.left:
            return
        place.left = True
        held = self.places.get(place.client)
        if held is not None and place in held:
            del held[place]
            if not held:
                del self.places[place.client]
            self.held -= place.size
        self._freed.set()

    def shrink(self, place: Place, size: int) -> None:
        """Count ``place`` (whose message has arrived) at ``size`` bytes from now on, when that is less."""
        if place.left or size >= place.size:
            return
        self.held -= place.size - size
        place.size = size
        self._freed.set()

    def _take(self, place: Place, now: float) -> bool:
        while self.limit and self.held + place.size > self.limit:
            victim = self._victim(place.client, now)
            if victim is None:
                return False
            self._displace(victim)
        place.since = now
        self.places.setdefault(place.client, {})[place] = None
        self.held += place.size
        return True

    def _victim(self, client: str, now: float) -> Place | None:
        """The waiting call that gives way to one of ``client``'s, or None (module docstring)."""
        if not self.places:
            return None
        heaviest = max(self.places, key=lambda c: len(self.places[c]))
        held = self.places[heaviest]
        if heaviest != client and gives_way(len(held), len(self.places.get(client, ()))):
            newest = next((p for p in reversed(held) if _waiting(p)), None)
            if newest is not None:
                return newest
        # Each client's oldest waiting place (its places are in age order), then the oldest of those.
        oldest = (next((p for p in places if _waiting(p)), None) for places in self.places.values())
        stale = (p for p in oldest if p is not None and now - p.since >= self.stale_after)
        return min(stale, key=lambda p: p.since, default=None)

    def _next_stale(self, now: float) -> float:
        """When the next call may be displaced for waiting too long (the loop's clock); infinity when none."""
        due = (p.since + self.stale_after for places in self.places.values() for p in places)
        return min((when for when in due if when > now), default=float("inf"))

    def _displace(self, victim: Place) -> None:
        victim.displaced = True
        self.leave(victim)
        assert victim.task is not None  # _waiting
        victim.task.cancel()
        if displaced := self._displaced.due():
            log.warning(
                "%d gRPC call(s) waiting for their request messages gave way to other calls' messages: the room "
                "for arriving messages is full (--max-inflight-bytes / --grpc-max-message-bytes; --grpc-message-wait)",
                displaced,
            )


def _waiting(place: Place) -> bool:
    """Whether ``place``'s task still awaits its message: suspended on a future that is not done (a task
    whose message has arrived is about to resume, and is left alone)."""
    task = place.task
    if place.arrived or task is None or task.done() or task is asyncio.current_task():
        return False
    awaited = getattr(task, "_fut_waiter", None)  # asyncio's Task (C and Python): what it is suspended on
    return awaited is not None and not awaited.done()
