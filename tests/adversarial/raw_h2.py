"""A raw HTTP/2 gRPC client for hostile tests: open calls, announce a message, send part of it, stall.

grpc's own clients never do this, which is why the attacks that matter are written with ``h2``:
a message announced as 60 MB whose bytes stop arriving, streams opened and never written to.
Everything here is bounded in time (``deadline`` seconds) and talks to loopback only.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER_READY = "/inference.GRPCInferenceService/ServerReady"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


@dataclass
class CallOutcome:
    """What the server said about one stream: its grpc-status (None: nothing yet), or that it reset it."""

    status: int | None = None
    message: str = ""
    reset: bool = False
    reset_code: int | None = None  # the HTTP/2 error code of the server's RST_STREAM
    sent: int = 0
    received: int = 0

    @property
    def ended(self) -> bool:
        return self.status is not None or self.reset


@dataclass
class RawGrpcConnection:
    """One HTTP/2 connection to a gRPC server, driven frame by frame."""

    host: str
    port: int
    calls: dict[int, CallOutcome] = field(default_factory=dict)
    closed: bool = False
    reads: bool = True  # False: a client that never opens a flow-control window for the server's answers
    source: str | None = None  # the loopback address to connect from (127.0.0.x), to be another client

    def __post_init__(self) -> None:
        source = (self.source, 0) if self.source is not None else None
        self.sock = socket.create_connection((self.host, self.port), timeout=5, source_address=source)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        if not self.reads:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def open_call(self, method: str = INFER, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        """Send a call's headers (no message yet); returns its stream id."""
        stream_id: int = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata,
        ]
        self.h2.send_headers(stream_id, headers)
        self.calls[stream_id] = CallOutcome()
        self.flush()
        return stream_id

    def send_part(
        self, stream_id: int, announced: int, part: int, deadline: float = 5.0, compressed: bool = False
    ) -> int:
        """Announce a message of ``announced`` bytes (``compressed``: flagged so) and send its first ``part``
        bytes, as flow control allows, for at most ``deadline`` seconds; never ends the stream. Returns the
        bytes sent."""
        payload_left = part
        prefix = (b"\x01" if compressed else b"\x00") + announced.to_bytes(4, "big")
        pending = prefix
        stop = time.monotonic() + deadline
        chunk = b"\x00" * 16384
        while (pending or payload_left) and time.monotonic() < stop and not self.closed:
            if self.calls[stream_id].ended:
                break
            try:
                window = self.h2.local_flow_control_window(stream_id)
            except h2.exceptions.StreamClosedError:
                break
            window = min(window, self.h2.max_outbound_frame_size)
            if window <= 0:
                self.pump(0.2, once=True)
                continue
            if not pending:
                take = min(payload_left, len(chunk))
                pending = chunk[:take]
                payload_left -= take
            piece, pending = pending[:window], pending[window:]
            try:
                self.h2.send_data(stream_id, piece)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                break
            self.calls[stream_id].sent += len(piece)
            self.flush()
        return self.calls[stream_id].sent

    def send_whole(self, stream_id: int, message: bytes, compressed: bool = False) -> None:
        """Send one complete message (``compressed``: flagged so, its call opened with a ``grpc-encoding``)
        and end the stream (a well-behaved unary call)."""
        self.send_part(stream_id, len(message), 0, compressed=compressed)
        data = message
        while data and not self.closed and not self.calls[stream_id].ended:
            window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if window <= 0:
                self.pump(0.2, once=True)
                continue
            self.h2.send_data(stream_id, data[:window])
            data = data[window:]
            self.flush()
        if not self.calls[stream_id].ended:
            self.h2.end_stream(stream_id)
            self.flush()

    def pump(self, seconds: float, once: bool = False) -> None:
        """Read and handle what the server sends for up to ``seconds`` (``once``: until something came)."""
        stop = time.monotonic() + seconds
        while not self.closed:
            left = stop - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.closed = True
                return
            for event in events:
                self._handle(event)
            self.flush()
            if once:
                return

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            headers = dict(event.headers)
            outcome = self.calls.get(event.stream_id)
            if outcome is not None and "grpc-status" in headers:
                outcome.status = int(headers["grpc-status"])
                outcome.message = str(headers.get("grpc-message", ""))
        elif isinstance(event, h2.events.StreamReset):
            outcome = self.calls.get(event.stream_id)
            if outcome is not None:
                outcome.reset = True
                outcome.reset_code = int(event.error_code)
        elif isinstance(event, h2.events.DataReceived):
            if self.reads:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            outcome = self.calls.get(event.stream_id)
            if outcome is not None:
                outcome.received += len(event.data)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True

    def close(self) -> None:
        self.closed = True
        self.sock.close()
