"""One budget of request bytes held in memory at once, shared by every protocol (``--max-inflight-bytes``).

An HTTP request reserves its ``Content-Length`` before a byte of its body is read (a chunked or
compressed body reserves as it grows); a gRPC call reserves the largest message it may send before
its message is received, in a room of its own for arriving messages (``server.connections``
``MessageReception``), then holds the size that arrived here. Each reservation is released when its
request ends. A request that does not fit is refused at once (HTTP 503 / TF Serving 429 with
``Retry-After``; gRPC RESOURCE_EXHAUSTED): the server never holds more than the budget of bodies that
are still arriving (and as much again of gRPC messages), whatever the clients announce.

Answers count in the same budget, from before they are encoded until they have been sent (HTTP:
written to the connection; gRPC: the unary call has ended, a streamed answer handed to grpc),
in the request's :class:`Hold`: a request whose
answer does not fit now is refused the same way instead of being encoded, so clients that read large
answers slowly cannot make the server hold more than the budget of them either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import TypeVar

from onnxserve.errors import ResourceExhaustedError

DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
"""Four bodies of the default largest size (64 MiB) at once."""


SMALL_ANSWER_BYTES = 16 * 1024
"""HTTP answers below this size are not counted: at most one answer per connection is being written
(``--max-connections`` bounds them). It was 256 KiB, on the reasoning that a socket takes such an answer at
once; but a client that pipelines requests and reads nothing fills its socket (the kernel's send buffer
grows to megabytes), and each connection then held an answer of up to 256 KiB uncounted (rt16). gRPC
answers are all counted: grpc keeps each until its client reads it, and one connection carries many
calls."""

ANSWER_HEADROOM = 16
"""Answers leave at least 1/16 of the budget free for requests, so requests are still received while
large answers hold the rest (an answer alone may take the whole budget)."""


def over_budget(limit: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the server holds its limit of {limit} request bytes in flight (--max-inflight-bytes); retry later"
    )


def no_memory(what: str) -> ResourceExhaustedError:
    """The refusal of a request the process has no memory for now (a ``MemoryError`` while receiving or
    decoding it, under a memory limit): retrying later may succeed, so not a 5xx."""
    return ResourceExhaustedError(f"the server has no memory {what} now; retry later")


SMALL_PART = 256
"""A request whose body (or message) holds at most 1/256 of the budget is small (1 MiB of the default 256 MiB),
and so is an answer: the last ``1/SMALL_REQUEST_SHARE`` of the budget is kept for small requests, and small
answers may go past the room of answers."""

SMALL_REQUEST_SHARE = 16
"""Large requests and answers leave this part of the budget (1/16: 16 MiB of the default 256 MiB) to small
requests, unless the budget is otherwise empty; small answers may take the room large answers leave to
requests, up to it. Eight addresses each sending 64 MiB messages (64 KB of gzip each) kept the budget full,
and 162 of 213 small honest gRPC calls were refused RESOURCE_EXHAUSTED; forty connections leaving 33 MB
/tokenize answers unread filled the answers' room, and 179 of 291 small honest gRPC calls were refused for
their few bytes of answer (outside attack rt57)."""


class InflightBytes:
    """The bytes of request bodies and messages held now, at most ``limit`` (0: no limit).

    Every method runs on the event loop (HTTP and gRPC share it), so no lock is needed.
    """

    def __init__(self, limit: int = DEFAULT_MAX_INFLIGHT_BYTES, keep_free: int = 0) -> None:
        self.limit = limit
        self.held = 0
        self.small = limit // SMALL_PART  # the most a small request or answer holds
        # What large requests (and small answers) may fill the budget to: the rest is small requests'.
        self.large_room = limit - limit // SMALL_REQUEST_SHARE
        # What large answers leave free for requests: 1/ANSWER_HEADROOM of the budget, or ``keep_free`` (a gRPC
        # call reserves its largest message before receiving it) when more, beside small requests' part.
        self.answer_room = limit - min(limit, max(limit // ANSWER_HEADROOM, keep_free) + limit // SMALL_REQUEST_SHARE)
        self._freed = asyncio.Event()

    def reserve(self, size: int, whole: int = 0) -> bool:
        """Hold ``size`` more bytes if they fit; False (and nothing held) if they do not. ``whole``: what the
        request holds with them (``size`` by default); a large one (past ``1/SMALL_PART`` of the budget) does
        not take the budget's last ``1/SMALL_REQUEST_SHARE``, unless nothing else is held."""
        if self.limit:
            room = self.limit if max(size, whole) <= self.small or not self.held else self.large_room
            if self.held + size > room:
                return False
        self.held += size
        return True

    async def reserve_within(self, size: int, seconds: float, whole: int = 0) -> bool:
        """``reserve``, waiting up to ``seconds`` for other requests to release enough."""
        if self.reserve(size, whole):  # the usual case: room now, no clock read
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self.reserve(size, whole):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                return False
        return True

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)
        self._freed.set()


def answer_over_budget(limit: int, size: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the server holds its limit of {limit} bytes of requests and answers in flight (--max-inflight-bytes); "
        f"this answer of {size} bytes does not fit now; retry later"
    )


class Hold:
    """The bytes one request holds in the budget: its body (or message), then also its answer.

    The answer is counted from before it is encoded (its tensors' size) to when it has been sent (HTTP:
    written to the connection; gRPC: the unary call has ended, a streamed answer handed to grpc).
    Answers of at least ``smallest`` bytes are
    counted, and only up to the budget's ``answer_room`` (the rest stays free for requests); a request
    holds at most the whole budget, so an answer larger than that is still sent when nothing else is in
    flight.
    """

    def __init__(self, budget: InflightBytes | None, body: int = 0, smallest: int = SMALL_ANSWER_BYTES) -> None:
        self.budget = budget
        self.body = body  # bytes already reserved for the request
        self.held = body  # body + answer
        self.smallest = smallest  # the smallest answer counted

    def grow_to(self, size: int) -> None:
        """Hold at least ``size`` bytes of body; RESOURCE_EXHAUSTED when the budget has no room."""
        if self.budget is None or size <= self.body:
            return
        if not self.budget.reserve(size - self.body, whole=size):
            raise over_budget(self.budget.limit)
        self.held += size - self.body
        self.body = size

    def hold_answer(self, size: int) -> ResourceExhaustedError | None:
        """Count the answer at ``size`` bytes (in place of what it was counted at before); the
        RESOURCE_EXHAUSTED refusal to raise when they do not fit now (None: counted)."""
        budget = self.budget
        if budget is None or not budget.limit:
            return None
        counted = size if size >= self.smallest else 0
        wanted = min(self.body + counted, max(budget.limit, self.body))
        extra = wanted - self.held
        if extra <= 0:
            budget.release(-extra)
        elif (
            budget.held + extra <= budget.answer_room
            or (counted <= budget.small and budget.held + extra <= budget.large_room)
            or budget.held == self.held
        ):
            budget.held += extra  # within the answers' room (a small one: beyond it), or alone in the budget
        else:
            return answer_over_budget(budget.limit, size)
        self.held = wanted
        return None

    def release_answer(self) -> None:
        """The answer has been sent: keep only the body."""
        if self.budget is not None and self.held > self.body:
            self.budget.release(self.held - self.body)
        self.held = self.body

    def release(self) -> None:
        if self.budget is not None:
            self.budget.release(self.held)
        self.held = self.body = 0


_hold: ContextVar[Hold | None] = ContextVar("onnxserve_inflight_hold", default=None)


def holding(hold: Hold) -> Token[Hold | None]:
    """Make ``hold`` the one :func:`hold_answer` counts this request's answer in (until reset)."""
    return _hold.set(hold)


def stop_holding(token: Token[Hold | None]) -> None:
    try:
        _hold.reset(token)
    except ValueError:  # an async generator finalized in another context: forget the hold there
        _hold.set(None)


def hold_answer(size: int) -> ResourceExhaustedError | None:
    """Count the answer this request is building at ``size`` bytes in the in-flight budget, before it is
    built and again once its encoded size is known; the RESOURCE_EXHAUSTED refusal when it does not fit
    now (None: counted, or outside a request that holds bytes). The caller raises it, after dropping its
    own reference to the answer: the refusal's traceback keeps the caller's frame, and a refused answer
    kept alive by it (until the garbage collector happens to run) is memory outside the budget; that is
    how refused 64 MB answers once piled up to gigabytes."""
    hold = _hold.get()
    return hold.hold_answer(size) if hold is not None else None


A = TypeVar("A")


def held(answer: A, size: Callable[[A], int]) -> A:
    """``answer``, once counted at ``size(answer)`` bytes by :func:`hold_answer`; raises its
    RESOURCE_EXHAUSTED refusal when it does not fit now. The refusal is raised without a reference
    cycle through this frame, so once it is handled nothing keeps the refused answer alive (neither
    here nor in the callers' frames its traceback holds) until the garbage collector runs."""
    refused = hold_answer(size(answer))
    if refused is None:
        return answer
    del answer
    try:
        raise refused
    finally:
        del refused
