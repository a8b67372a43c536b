"""The calls open on one gRPC connection, and whether their client lets grpc-core send their answers.

The gRPC port's front (``server.grpc_front``) reads the frame headers of both sides of each connection it
hands on to grpc-core. From them this keeps the calls open (a client's HEADERS opens one; grpc-core's
END_STREAM or either side's RST_STREAM ends it) and HTTP/2's flow control of grpc-core's answers (RFC 9113,
6.9): grpc-core may send a call's DATA only within the call's window and the connection's, which start at
the client's ``SETTINGS_INITIAL_WINDOW_SIZE`` (65,535 until it names one) and 65,535 bytes, shrink by each
DATA frame's length and grow by the client's WINDOW_UPDATE frames. A call whose answer has begun (its
HEADERS) and whose window, or the connection's, is spent cannot move until its client reads: a client
that never does keeps the call, and its connection, open for as long as it likes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

DEFAULT_WINDOW = 65_535
"""HTTP/2's initial flow-control window, of a connection and of each stream until SETTINGS name another."""

INITIAL_WINDOW_SIZE = 0x4
"""The SETTINGS parameter that names each stream's initial window."""


class Calls:
    """The open calls of one connection and their flow-control windows (module docstring)."""

    def __init__(self) -> None:
        self._taken: dict[int, int] = {}
        """Each open call's window taken: the DATA bytes grpc-core sent on it less the client's WINDOW_UPDATEs
        for it (its window is the initial window less this)."""
        self._answering: set[int] = set()  # open calls whose answer grpc-core has begun (its HEADERS)
        self._sending: set[int] = set()  # open calls whose client has not ended its side nor grpc-core answered
        self.initial_window = DEFAULT_WINDOW
        self.connection_window = DEFAULT_WINDOW

    def __len__(self) -> int:
        return len(self._taken)

    def __bool__(self) -> bool:
        return bool(self._taken)

    def __contains__(self, stream: object) -> bool:
        return stream in self._taken

    def __iter__(self) -> Iterator[int]:
        return iter(self._taken)

    def open(self, stream: int) -> None:
        self._taken[stream] = 0
        self._sending.add(stream)

    def end(self, stream: int) -> None:
        self._taken.pop(stream, None)
        self._answering.discard(stream)
        self._sending.discard(stream)

    def client_ended(self, stream: int) -> None:
        """The client ended its side of a call (END_STREAM): its request is all sent."""
        self._sending.discard(stream)

    # -- the client's frames -------------------------------------------------------------------------
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
        elif stream in self._taken:
            self._taken[stream] -= increment

    # -- grpc-core's frames --------------------------------------------------------------------------
    def server_headers(self, stream: int, end_stream: bool) -> None:
        if end_stream:
            self.end(stream)
        elif stream in self._taken:
            self._answering.add(stream)
            self._sending.discard(stream)

    def server_data(self, stream: int, length: int) -> None:
        """DATA of ``length`` bytes (padding included, as flow control counts it). grpc-core ends a call with
        its trailers, never with a DATA frame's END_STREAM, so that flag ends nothing here."""
        self.connection_window -= length
        if stream in self._taken:
            self._taken[stream] += length

    @property
    def sending(self) -> bool:
        """Whether every open call (one at least) waits for its client's request: the client has not ended
        its side, and grpc-core has not begun the answer (a unary call's message still coming, or never)."""
        return bool(self._taken) and len(self._sending) == len(self._taken)

    @property
    def stalled(self) -> bool:
        """Whether every open call (one at least) waits for its client to read: its answer has begun and its
        window, or the connection's, is spent."""
        if not self._taken or len(self._answering) < len(self._taken):
            return False
        if self.connection_window <= 0:
            return True
        initial = self.initial_window
        return all(taken >= initial for taken in self._taken.values())
