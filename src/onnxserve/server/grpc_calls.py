"""The calls open on one gRPC connection: whether they wait for their client, and for what.

The gRPC port's front (``server.grpc_front``) reads the frame headers of both sides of each connection it
hands on to grpc-core. From them this keeps the calls open (a client's HEADERS opens one; grpc-core's
END_STREAM or either side's RST_STREAM ends it) and, for each, two things a call may wait for its client on:

- **Its request.** gRPC messages go in DATA frames, each a 5-byte prefix (a flag, a length) and its bytes;
  counting the messages of both sides as their bytes pass shows a call whose every request message has been
  answered (a unary call's message still coming, or a stream between two messages: the server can do
  nothing until the client sends), unless the client has ended its side.
- **Reading its answer.** HTTP/2's flow control (RFC 9113, 6.9): grpc-core may send a call's DATA only within
  the call's window and the connection's, which start at the client's ``SETTINGS_INITIAL_WINDOW_SIZE``
  (65,535 until it names one) and 65,535 bytes, shrink by each DATA frame's length and grow by the client's
  WINDOW_UPDATE frames. A call whose answer has begun (its HEADERS) and whose window, or the connection's, is
  spent cannot move until its client reads.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

DEFAULT_WINDOW = 65_535
"""HTTP/2's initial flow-control window, of a connection and of each stream until SETTINGS name another."""

INITIAL_WINDOW_SIZE = 0x4
"""The SETTINGS parameter that names each stream's initial window."""

PREFIX = 5
"""A gRPC message's prefix: a compressed flag and a 4-byte length."""

EXPIRY_SLACK_SECONDS = 0.005
"""A call ended this long before its deadline as the front counts it (from its header block's arrival,
before grpc-core's) counts as ended at its deadline."""

CUT_SHORT_SECONDS = 1.0
"""How long a call grpc-core ended without an answer of the server's (trailers alone) counts as ended just
before grpc-core closed the connection (:meth:`Calls.recently_cut_short`)."""


REFUSED_STREAM = 0x7
"""The RST_STREAM error code with which grpc-core refuses a call before queueing it (past its stream limit):
HTTP/2's "refused before any application processing". Other codes say nothing of the queue: a DATA frame past
the call's window or with bad padding has grpc-core reset the call PROTOCOL_ERROR after queueing it (outside
attack rt51: such calls, taken for never queued, went uncounted, and grpc-core's queue passed 1,000)."""

CLIENT_ERROR_CODES = frozenset((0x1, 0x2, 0x3, 0x6, 0x9, 0xB))
"""RST_STREAM codes with which grpc-core ends a call for its client's error (PROTOCOL_ERROR, INTERNAL_ERROR,
FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM): a call so ended before its answer
began may wait in grpc-core's queue all the same, and counts as abandoned."""


class Messages:
    """One side's gRPC messages on one call, counted as their bytes pass (:meth:`take`)."""

    __slots__ = ("_left", "_prefix", "count")

    def __init__(self) -> None:
        self.count = 0  # messages whole
        self._left = 0  # bytes of the message under way still to come (0: a prefix is next)
        self._prefix = b""  # the part of a prefix seen so far

    def take(self, data: memoryview) -> None:
        """The next bytes of this side's DATA (padding excluded)."""
        at, size = 0, len(data)
        while at < size:
            if self._left:
                step = min(self._left, size - at)
                self._left -= step
                at += step
                if not self._left:
                    self.count += 1
                continue
            piece = bytes(data[at : at + PREFIX - len(self._prefix)])
            at += len(piece)
            self._prefix += piece
            if len(self._prefix) == PREFIX:
                self._left = int.from_bytes(self._prefix[1:], "big")
                self._prefix = b""
                if not self._left:
                    self.count += 1


class _Call:
    __slots__ = ("answering", "answers", "client_ended", "expires", "opaque", "requests", "taken")

    def __init__(self) -> None:
        self.expires = 0.0  # when its deadline passes (``time.monotonic``; 0: none, -1: past), its ``grpc-timeout``
        self.taken = 0
        """The window taken: the DATA bytes grpc-core sent on it less the client's WINDOW_UPDATEs for it."""
        self.answering = False  # grpc-core has begun the answer (its HEADERS)
        self.client_ended = False  # the client has ended its side (END_STREAM)
        self.opaque = False  # a padded DATA frame of the client's: its messages are not followed
        self.requests = Messages()
        self.answers = Messages()

    @property
    def waits_for_request(self) -> bool:
        return not self.client_ended and not self.opaque and self.answers.count >= self.requests.count


class Calls:
    """The open calls of one connection, what they wait for, and their flow-control windows (module docstring)."""

    def __init__(self) -> None:
        self._calls: dict[int, _Call] = {}
        self.initial_window = DEFAULT_WINDOW
        self.connection_window = DEFAULT_WINDOW
        self._cut_short = 0  # calls ended by trailers alone since ``_cut_since``
        self._cut_since = 0.0
        self.expired = 0
        """Calls grpc-core ended without an answer once their deadline had passed (taken by the connection)."""
        self.never_queued: list[int] = []
        """Streams whose calls grpc-core refused before queueing them (REFUSED_STREAM; taken by the connection)."""
        self.broken = 0
        """Calls grpc-core reset for their client's error before answering them (taken by the connection)."""
        self.last_stream: int | None = None
        """The last stream grpc-core's GOAWAY says it took (the later ones it never saw), None before one."""

    def __len__(self) -> int:
        return len(self._calls)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def __contains__(self, stream: object) -> bool:
        return stream in self._calls

    def __iter__(self) -> Iterator[int]:
        return iter(self._calls)

    def open(self, stream: int) -> None:
        self._calls[stream] = _Call()

    def end(self, stream: int) -> None:
        self._calls.pop(stream, None)

    def unanswered(self, stream: int | None = None) -> int:
        """How many open calls (of ``stream`` alone, if given) grpc-core has not begun to answer: left
        behind, they wait in its queue for the application (``abandoned_calls``)."""
        if stream is not None:
            call = self._calls.get(stream)
            return int(call is not None and not call.answering)
        return sum(not call.answering for call in self._calls.values())

    # -- the client's frames -------------------------------------------------------------------------
    def client_ended(self, stream: int) -> None:
        """The client ended its side of a call (END_STREAM): its request is all sent."""
        if (call := self._calls.get(stream)) is not None:
            call.client_ended = True

    def client_data(self, stream: int, padded: bool) -> Messages | None:
        """A DATA frame of the client's: where its payload goes (None: nowhere, a call not open or a padded
        frame, whose padding the front does not strip; that call's messages are not followed from then on,
        and it never counts as waiting for its request)."""
        call = self._calls.get(stream)
        if call is None or call.opaque:
            return None
        if padded:
            call.opaque = True
            return None
        return call.requests

    def client_settings(self, payload: bytes) -> None:
        """A SETTINGS frame's parameters (six bytes each); the last initial window it names counts."""
        whole = len(payload) - len(payload) % 6  # a partial parameter is grpc-core's FRAME_SIZE_ERROR
        for parameter, value in struct.iter_unpack(">HI", payload[:whole]):
            if parameter == INITIAL_WINDOW_SIZE:
                self.initial_window = value

    def client_window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            return  # grpc-core closes the connection (FRAME_SIZE_ERROR)
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream == 0:
            self.connection_window += increment
        elif (call := self._calls.get(stream)) is not None:
            call.taken -= increment

    # -- grpc-core's frames --------------------------------------------------------------------------
    def deadline(self, stream: int, seconds: float) -> None:
        """The client's deadline for a call (its ``grpc-timeout``), from now (0: already past)."""
        if (call := self._calls.get(stream)) is not None:
            call.expires = time.monotonic() + seconds if seconds > 0 else -1.0

    def _ended_short(self, call: _Call | None) -> None:
        """grpc-core ended ``call`` without beginning an answer (trailers alone, or a reset)."""
        if call is None or call.answering:
            return
        if call.expires and (call.expires < 0 or time.monotonic() + EXPIRY_SLACK_SECONDS >= call.expires):
            # grpc-core ends a call whose deadline passed while it waited in its queue, unseen by the server:
            # such calls cost the queue what abandoned ones do (outside attack rt48: calls of 1 ms deadlines,
            # never reset, 30,000 a second, had most other clients' calls answered CANCELLED)
            self.expired += 1

    def server_reset(self, stream: int, code: int = 0) -> None:
        call = self._calls.get(stream)
        if call is not None and not call.answering and code == REFUSED_STREAM:
            self.never_queued.append(stream)
        elif call is not None and not call.answering and code in CLIENT_ERROR_CODES:
            self.broken += 1  # abandoned, whatever its deadline
        else:
            self._ended_short(call)
        self.end(stream)

    def server_goaway(self, last_stream: int) -> None:
        self.last_stream = last_stream if self.last_stream is None else min(self.last_stream, last_stream)

    def server_headers(self, stream: int, end_stream: bool) -> None:
        if end_stream:
            if (call := self._calls.get(stream)) is not None and not call.answering:
                self._count_cut_short()
                self._ended_short(call)
            self.end(stream)
        elif (call := self._calls.get(stream)) is not None:
            call.answering = True

    def server_data(self, stream: int, length: int) -> Messages | None:
        """DATA of ``length`` bytes (padding included, as flow control counts it; grpc-core does not pad);
        where its payload goes. grpc-core ends a call with its trailers, never with a DATA frame's
        END_STREAM, so that flag ends nothing here."""
        self.connection_window -= length
        if (call := self._calls.get(stream)) is None:
            return None
        call.taken += length
        return call.answers

    def _count_cut_short(self) -> None:
        now = time.monotonic()
        if now - self._cut_since > CUT_SHORT_SECONDS:
            self._cut_since, self._cut_short = now, 0
        self._cut_short += 1

    def recently_cut_short(self) -> int:
        """Calls grpc-core ended with trailers alone (no answer begun) within ``CUT_SHORT_SECONDS`` or so:
        when grpc-core closes a connection for a client's error, it ends every open call so, and the calls
        still wait in its queue for the application (outside attack rt47 H1); an error answer of the
        server's own ends its call so too."""
        return self._cut_short if time.monotonic() - self._cut_since <= 2 * CUT_SHORT_SECONDS else 0

    @property
    def sending(self) -> bool:
        """Whether every open call (one at least) waits for its client's request: the client has not ended
        its side, and grpc-core has answered every request message it got (a unary call's message still
        coming, or never; a stream between two messages)."""
        return bool(self._calls) and all(call.waits_for_request for call in self._calls.values())

    def _unread(self, call: _Call) -> bool:
        """Whether ``call`` waits for its client to read: its answer has begun and its window, or the
        connection's, is spent."""
        return call.answering and (self.connection_window <= 0 or call.taken >= self.initial_window)

    @property
    def stalled(self) -> bool:
        """Whether every open call (one at least) waits for its client to read its answer."""
        return bool(self._calls) and all(self._unread(call) for call in self._calls.values())

    @property
    def waiting(self) -> bool:
        """Whether every open call (one at least) waits for its client, for its next request message or to
        read its answer, and one at least to read (some of each: a client that keeps one call unread and
        another without its message, reopened as it ends, was busy to the front, and kept its place past
        the cap and past ``--body-timeout``: outside attack rt42)."""
        calls = self._calls.values()
        if not calls:
            return False
        unread = False
        for call in calls:
            if self._unread(call):
                unread = True
            elif not call.waits_for_request:
                return False
        return unread
