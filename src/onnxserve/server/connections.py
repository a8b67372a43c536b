"""Connection limits and timeouts on both ports: what uvicorn and grpc do not do on their own.

HTTP (uvicorn's httptools protocol, extended by :func:`guarded_http_protocol`):

- **Request head**: a connection has ``header_timeout`` seconds from being opened (or from the first
  byte of its next request) to finish sending a request line and headers. A slow or silent client is
  answered 408 (silent ones are just closed).
- **Request body**: once the head is in, the whole body must arrive within ``body_timeout`` seconds;
  otherwise 408 and the connection closes (whatever the endpoint held is released).
- **Answer**: a client that leaves an answer unread (the connection's write buffer above its high-water
  mark) for ``body_timeout`` seconds is cut (the connection is aborted, dropping what it did not read),
  so a slow reader holds its answer, and its share of the in-flight budget, for at most that long.
- **Request head size**: at most ``max_header_bytes`` of request line and headers, counted as they
  arrive; above it 431 and the connection closes (httptools itself buffers a header of any size). At
  most ``MAX_HEADER_FIELDS`` fields. A chunked body's framing since its last chunk (chunk lines, trailer
  fields) is held to the same limit.
- **Pipelining**: at most ``MAX_PIPELINED`` requests queued behind the one being answered, and their
  targets, fields and bodies at most ``max_header_bytes`` together; past either the connection is cut.
- **Protocol switches** (``Connection: upgrade``): never made; the request is served as HTTP/1.1 and its
  connection closed after the answer.
- **An answer before the body is in** (a 413 to a body that inflates too far, a 404, a 401): the
  connection closes after the answer (reading the body on to keep it read 10 GB for a 413: rt20); the
  write side is shut and the rest read and dropped for up to ``LINGER_SECONDS`` / ``LINGER_BYTES`` before
  the close, so the kernel does not reset the connection over unread bytes and the client gets its
  answer. Over TLS, which cannot shut one side, every close reads and drops undecrypted what still
  arrives and ends the connection once its answer has reached the client, or once its client has taken
  nothing more for ``TLS_STALL_SECONDS`` (``_close_tls``), rather than waiting for the client's
  close_notify while decrypting all it sends.
- **Chunk framing**: a chunked body's framing in all (chunk lines, their extensions) may pass its data by
  at most ``max_header_bytes`` (400).
- **Idle keep-alive**: uvicorn's own ``timeout_keep_alive`` (``keep_alive_timeout``).
- **Open connections**: at most ``max_connections`` per port. When a new one would exceed it and the
  client address holding the most connections holds at least two more than the new one's address
  (``fairness.gives_way``, as in a model's queue), one of that address's connections that is idle or
  still sending its request (head or body) is closed to make room: an idle one first, else the one that
  has sent least, else the oldest; a request it was sending is answered 503 with ``Retry-After``. Else
  the oldest whose client does not read the answer being written is aborted. When
  that address has none of those, its newest request that only waits at its model (queued, or waiting
  for room for its text; no execution of it begun: ``core.progress``) is withdrawn
  (``InferenceCall.withdraw``): it leaves its queue without running, is answered like a full queue (503
  with ``Retry-After``), and its connection closes after that answer. A request whose execution has
  begun, or that is decoded, tokenized or answered, is never cut. So neither slow senders nor requests
  parked at a busy model from one address can keep other addresses out; behind a proxy (one address for
  all) this never applies. Otherwise the oldest connection that is not in the middle of a request (idle
  keep-alive, or still sending its head) of an address holding at least as many connections as the new
  one's is closed to make room (behind a proxy: the oldest of all). When every connection is busy (slow
  bodies, or requests being served), the new one is admitted into a reserve of ``PROBE_RESERVE`` more
  connections that may only ask for ``PROBE_PATHS`` (health probes, the metrics scrape), with short
  head and keep-alive deadlines; any other request there is answered 503 with ``Retry-After`` and
  closed. When the reserve is full too, its oldest idle connection is closed, else its oldest one open
  for more than ``RESERVE_STALE_SECONDS`` (a client that pipelines scrapes and never reads them), else
  the new connection is closed. A probe or scrape therefore always gets a connection, however many idle
  or busy ones an attacker holds.
- **TLS** (``tls``: the HTTPS context): the listener accepts plain TCP and this protocol sees every
  connection from its accept, so a connection still in its TLS handshake counts against
  ``max_connections`` (an idle one, the first to be closed to make room) and has what is left of
  ``header_timeout`` to finish the handshake and its request head. The loop's own TLS layer (what
  ``loop.start_tls`` uses) is put between the TCP transport and this protocol at the accept, and the
  request is read through it once the handshake is done. uvloop's TLS listener handshakes before the
  protocol exists: silent connections were counted nowhere and lived 60 s.
- **Accepting never fails**: a connection whose protocol cannot be made (a MemoryError) is closed alone,
  by a protocol made in advance; an exception out of the listener's accept callback would stop
  libuv from ever accepting again on that port.

gRPC (grpc.aio channel options from :func:`grpc_options`, plus :class:`MessageReception` around the
service's handlers):

- ``grpc_max_connections`` connections, held by the port's front (``server.grpc_front``: past it, an
  idle connection makes room, else the new one is closed), ``header_timeout``
  seconds for the HTTP/2 handshake, at most ``grpc_max_concurrent_streams`` streams per connection,
  connections idle (no call open) for ``grpc_max_connection_idle`` closed, optional maximum age with
  a grace period, and keepalive pings from clients no more often than every 10 s (enforced with
  GOAWAY by grpc).
- Every request message (a unary call's one, each of a stream's) must arrive within ``body_timeout``
  seconds (DEADLINE_EXCEEDED), and is received only once the room for arriving messages holds a place
  for the largest message (RESOURCE_EXHAUSTED after a short wait; the room is shared fairly between
  clients, and a call waiting for its message may give its place to another: ``server.message_room``);
  see :class:`MessageReception`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import resource
import ssl
import sys
import termios
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, overload

import grpc
import orjson
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from onnxserve.core.fairness import gives_way
from onnxserve.core.memory import give_back_memory_later
from onnxserve.errors import InvalidInputError, ResourceExhaustedError
from onnxserve.log_throttle import LogThrottle
from onnxserve.protocols import context
from onnxserve.protocols.http import CALL_SLOT, CallSlot
from onnxserve.protocols.inflation import Inflater, inflate, message_encoding
from onnxserve.protocols.inflight import Hold, InflightBytes, holding, no_memory, over_budget, stop_holding
from onnxserve.protocols.request_body import announces_body
from onnxserve.protocols.v2_grpc.servicer import SERVICE_NAME
from onnxserve.server.auth import METRICS_HTTP_PATH, OPEN_HTTP_PATHS
from onnxserve.server.connection_index import Counts, LazyHeap
from onnxserve.server.core_queue import CoreQueue, call_name
from onnxserve.server.message_room import DEFAULT_MESSAGE_WAIT_SECONDS, DISPLACED, MessageRoom, Place
from onnxserve.server.settings import ServerSettings
from onnxserve.server.tls_layer import wrap_tls

log = logging.getLogger(__name__)

RESERVED_FILE_DESCRIPTORS = 256
"""File descriptors kept out of the connection caps: models, logs, the repository, gRPC internals."""

BUDGET_WAIT_SECONDS = 1.0
"""How long a gRPC call waits for room in the in-flight budget before RESOURCE_EXHAUSTED."""

MIN_CLIENT_PING_INTERVAL_MS = 10_000

PROBE_PATHS = frozenset(path.encode("ascii") for path in (*OPEN_HTTP_PATHS, METRICS_HTTP_PATH))
"""The only paths a connection of the probe reserve may ask for."""

OPEN_PATHS = frozenset(path.encode("ascii") for path in OPEN_HTTP_PATHS)
"""The health probes: open to every client, also with tokens, and they take no request body."""

MAX_HEADER_FIELDS = 100
"""Header fields one HTTP request head may have (Apache's default; browsers send about 20): past it, 431."""

CHUNKS_FREE = 1024
"""Chunks a chunked body may have before their average size counts (``MIN_CHUNK_AVERAGE``)."""

MIN_CHUNK_AVERAGE = 256
"""Bytes of data a chunked body's chunks must average past ``CHUNKS_FREE`` of them: each chunk costs the
event loop Python calls, and a body streamed as 1-byte chunks (6 bytes of wire each) from 30 connections
held probes for 19 s (outside attack rt18). Clients stream chunks of kilobytes."""

MAX_PIPELINED = 32
"""Requests one HTTP/1.1 connection may queue behind the one being answered (pipelining); past it the
connection is closed. uvicorn stops reading once one is queued, but parses every request of a read it
has (thousands of tiny ones in 256 KiB), each holding its request objects until its turn."""

PROBE_RESERVE = 16
"""HTTP connections beyond ``max_connections`` kept for probes and scrapes when every other one is busy."""

RESERVE_HEAD_SECONDS = 2.0
"""Head deadline of a reserve connection (at most ``header_timeout``): a probe sends its head at once."""

RESERVE_KEEP_ALIVE_SECONDS = 1
"""Keep-alive of a reserve connection (at most ``keep_alive_timeout``), so the reserve frees itself."""

TLS_STALL_SECONDS = 2.0
"""How long a TLS connection the server closes may go without its client taking any more of the answer (and
close_notify) still to send before it is cut: until then it holds its file descriptor and its connection
slot (a client that never reads, or never answers the close, held every slot for 28 s when the TLS layer
waited the loop's default 30 s: outside attack rt18). One whose client still takes its answer, however
slowly, is cut ``body_timeout`` after its close at the latest, as an unread answer is."""

TLS_WRITE_HIGH_WATER = 64 * 1024
"""Over TLS, writing an answer is blocked while the TCP transport holds more than this unsent (``_watch_tcp``),
as a plain transport blocks it past its own high-water mark (64 KiB)."""

TLS_WRITE_PIECE = 64 * 1024
"""Over TLS, an answer is handed to the TLS layer this much at a time, the next piece once the layer takes
more (``_pump``). The layer encrypts all it is given at once into a memory buffer it keeps the size of, and
copies that out whole: a 61 MiB answer took the answer three times over, and every connection that carried
one kept about its size until Python's cyclic collector freed it (outside attack rt32: 80 connections, at
most two open, each reading its 61 MiB answer at full speed, took the server from 324 MB to 4.2 GB)."""

CLOSING_IDLE_SECONDS = 0.5
"""A TLS connection being closed whose client has taken nothing of its answer for this long may give its slot
to a new connection past ``--max-connections`` (``_cut_oldest_closing``)."""

CLOSING_LOOKED_AT = 64
"""The most connections being closed looked at for one new connection: the oldest first."""

TLS_CUT_CHECK_SECONDS = 0.01
"""How often a TLS connection the server closes (``_close_tls``) is checked for its answer having reached
the client (its buffers and the socket's send queue empty: sent and acknowledged) or having stalled."""

RESERVE_STALE_SECONDS = 2.0
"""A full reserve makes room by closing a reserve connection open longer than this, even a busy one."""

LINGER_SECONDS = 5.0
"""How long a connection closed with its request body still arriving keeps reading (and dropping) it."""

LINGER_BYTES = 64 * 1024 * 1024
"""How much of such a body is read and dropped before the connection is closed all the same."""

WITHDRAWN_MESSAGE = (
    "every connection is taken (--max-connections) and this client address holds the most; this request was "
    "still waiting for its model and was dropped without running, and its connection closes, to let another "
    "client in; retry later"
)
"""The answer to a request withdrawn while it waited, to free its connection for another address."""

UNREAD_METHODS = frozenset(f"/{SERVICE_NAME}/{name}" for name in ("ServerLive", "ServerReady", "ServerMetadata"))
"""Methods whose request message is empty: answered without receiving it, so probes never wait on the budget."""


@dataclass(frozen=True)
class ConnectionLimits:
    """The HTTP connection limits (see the module docstring)."""

    header_timeout: float
    body_timeout: float
    max_connections: int
    max_header_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(
            settings.header_timeout,
            settings.body_timeout,
            connection_cap(settings.max_connections),
            settings.max_header_bytes,
        )


def raise_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(wanted: int) -> int:
    """``wanted`` connections per port, lowered so both ports together stay under the open-file limit."""
    room = max(16, (raise_file_limit() - RESERVED_FILE_DESCRIPTORS) // 2)
    if wanted > room:
        log.warning("--max-connections %d is more than the open-file limit allows; using %d per port", wanted, room)
        return room
    return wanted


def _error_response(status: str, message: str, extra: str = "") -> bytes:
    """A whole JSON error answer that closes the connection (``extra``: more header lines)."""
    body = orjson.dumps({"error": message})
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n{extra}"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _timeout_response(message: str) -> bytes:
    return _error_response("408 Request Timeout", message)


class _ClosedWritesDropped:
    """A connection's transport whose writes after it closed are dropped, as asyncio's own transports do.

    uvloop's raise instead: a client that sent pipelined requests and closed its side had the answer to
    the second written to a closed transport, and each such answer was logged as two ERROR tracebacks
    (an outside attack: 3.9 MB of log in 0.8 s). A client that leaves is not an error.

    With ``piece`` (over TLS), a write larger than ``piece`` is kept in a backlog (no copy) and handed to the
    transport a piece at a time by :meth:`write_piece` (the protocol's ``_pump``), in order with the writes
    after it; a close waits for the backlog to be written."""

    def __init__(
        self,
        transport: asyncio.Transport,
        linger: Callable[[], bool] | None = None,
        wrote: Callable[[], None] | None = None,
        piece: int = 0,
    ) -> None:
        self._transport = transport
        self._linger = linger
        self._wrote = wrote  # told after each write (over TLS: ``GuardedHttpProtocol._watch_tcp``)
        self._lingering = False
        self._piece = piece
        self.backlog: deque[memoryview] = deque()
        self.backlog_bytes = 0
        self._close_when_written = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.is_closing():
            if self._piece and (self.backlog or len(data) > self._piece):
                view = memoryview(data).cast("B")
                self.backlog.append(view)
                self.backlog_bytes += len(view)
            else:
                self._transport.write(data)
            if self._wrote is not None:
                self._wrote()

    def write_piece(self) -> None:
        """Hand the transport the next piece of the backlog (then close it, if a close waits for that)."""
        head = self.backlog[0]
        piece = head[: self._piece]
        if len(head) > self._piece:
            self.backlog[0] = head[self._piece :]
        else:
            self.backlog.popleft()
        self.backlog_bytes -= len(piece)
        self._transport.write(bytes(piece))
        if not self.backlog and self._close_when_written:
            self._close_when_written = False
            self._transport.close()

    def drop_backlog(self) -> None:
        self.backlog.clear()
        self.backlog_bytes = 0

    def detach(self) -> None:
        """Let go of the transport once its connection is lost: uvicorn keeps the protocol, and through it
        this, until its cycle ends, and the TLS layer's objects (each with its 256 KiB read buffer and its
        memory buffers) made a reference cycle with them, freed only when Python's cyclic collector ran
        (outside attack rt34: 600 TLS connections each reading a 1 MiB answer kept ~0.7 MB each)."""
        self.drop_backlog()
        self._transport = _LOST  # type: ignore[assignment]
        self._linger = self._wrote = None

    def get_write_buffer_size(self) -> int:
        return self.backlog_bytes + self._transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self._lingering or self._close_when_written or self._transport.is_closing()

    def close(self) -> None:
        """Close, or (``linger`` says it takes over) look closed to uvicorn while the rest of the request
        is read and dropped; with a backlog, once it is written."""
        if self._close_when_written:
            return
        if not self._lingering and self._linger is not None and self._linger():
            self._lingering = True
            return
        if self.backlog:
            self._close_when_written = True
            return
        self._transport.close()

    def abort(self) -> None:
        self.drop_backlog()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _LostTransport:
    """The transport of a connection that is lost: closed, holding nothing."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_LOST = _LostTransport()


def _oldest(connection: GuardedHttpProtocol) -> float:
    return 0.0  # the heap orders equal keys by when the connection opened


def _sent(connection: GuardedHttpProtocol) -> float:
    return connection._head_bytes + connection._body_bytes


def _idle(connection: GuardedHttpProtocol) -> bool:
    """May be closed for another address, and sends nothing: the first closed for one, oldest first."""
    return connection._displaceable() and not connection._sending()


def _sending(connection: GuardedHttpProtocol) -> bool:
    """May be closed for another address, and is sending its request: by bytes sent, then age."""
    return connection._displaceable() and connection._sending()


def _free(connection: GuardedHttpProtocol) -> bool:
    return connection._free()


def _stalled(connection: GuardedHttpProtocol) -> bool:
    """Busy writing an answer its client does not read (writing paused): closed for another address
    after the idle and sending ones, oldest first."""
    return connection._stalled()


class _Address:
    """One client address's open connections, with those that may be closed for another address in the
    order they would be (idle ones first, then the one that has sent least of its request, then the
    oldest, then the oldest whose client does not read its answer) and its ordinary ones not in the middle
    of a request (oldest first)."""

    def __init__(self) -> None:
        self.connections: set[GuardedHttpProtocol] = set()
        self.idle: LazyHeap[GuardedHttpProtocol] = LazyHeap(_oldest, _idle)
        self.sending: LazyHeap[GuardedHttpProtocol] = LazyHeap(_sent, _sending)
        self.stalled: LazyHeap[GuardedHttpProtocol] = LazyHeap(_oldest, _stalled)
        self.free: LazyHeap[GuardedHttpProtocol] = LazyHeap(_oldest, _free)

    def track(self, connection: GuardedHttpProtocol, idle: bool) -> None:
        """Enter ``connection`` where it may have become sending (or ``idle``: idle and free as well)."""
        live = len(self.connections)
        self.sending.push(connection, live)
        if idle:
            self.idle.push(connection, live)
            self.free.push(connection, live)


@dataclass
class _Clients:
    """A port's open HTTP connections by client address, to share the connection slots between addresses,
    kept so that the connection to close for a new one is found without looking over the others
    (``server.connection_index``)."""

    by_address: dict[str, _Address] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    ordinary: int = 0
    """Open connections outside the probe reserve (closed ones count until the loop reports them lost)."""
    reserve: set[GuardedHttpProtocol] = field(default_factory=set)
    free: LazyHeap[GuardedHttpProtocol] = field(default_factory=lambda: LazyHeap(_oldest, _free))
    """Every address's ordinary connections not in the middle of a request, oldest first."""
    displaced: LogThrottle = field(default_factory=LogThrottle)
    """At most one WARNING every 10 s about connections closed for other addresses, with their count."""
    turned_away: LogThrottle = field(default_factory=LogThrottle)
    """Likewise about new connections closed because every slot, the probes' too, is busy."""
    cutting: dict[GuardedHttpProtocol, None] = field(default_factory=dict)
    """Ordinary TLS connections being closed (``_close_tls``), oldest first: the first to go for a new one."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body deadlines and a connection cap (module docstring)."""

    limits: ClassVar[ConnectionLimits]
    clients: ClassVar[_Clients]
    tls: ClassVar[ssl.SSLContext | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened_at = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        self._head_bytes = 0
        self._head_fields = 0  # header fields of the head being parsed
        self._pipelined_bytes = 0  # bytes of the requests (targets, fields, bodies) queued behind the one answered
        self._body_bytes = 0
        self._framing = 0  # bytes of the body's framing read since its last chunk: chunk lines, trailers
        self._framing_total = 0  # bytes of the body's framing in all (chunk lines with their extensions)
        self._body_seen = 0  # bytes of bodies the parser has handed over on this connection
        self._tcp: asyncio.Transport | None = None  # under the TLS layer: the connection's TCP transport
        self._undecrypted = False  # over TLS: what it receives is dropped undecrypted (_read_no_more_tls)
        self._closing_tls = False  # over TLS: closed once its answer is out (_close_tls)
        self._layer_full = False  # the transport (over TLS: the TLS layer) paused writing
        self._tcp_full = False  # over TLS: the TCP transport's buffer is full (_watch_tcp)
        self._backlogged = False  # over TLS: some of the answer waits to be handed to the TLS layer (_pump)
        self._moved = 0.0  # over TLS, closing: when its client last took some of the answer (_close_once_sent)
        self._lingering: asyncio.Transport | None = None  # plain, lingering over an unread body: its transport
        self._chunks = 0  # chunks of the body being received
        self._heads = 0  # request heads completed on this connection
        self._beyond = False  # bytes came after its last request that began no new one (yet)
        self._reserve = False
        self._refused = False
        self._address = ""
        self._body_pending = False  # a request's head is in and its body is still arriving
        self._linger_left = -1  # bytes still read and dropped while lingering; -1: not lingering
        self._linger_timer: asyncio.TimerHandle | None = None
        # not yet answered, in arrival order (a pipelined connection's answers complete in that order too)
        self._requests: deque[tuple[RequestResponseCycle, CallSlot]] = deque()
        self._upgrading = False  # a TLS connection still in its handshake
        self._switch_asked = False  # its request asked to switch protocols: the parser has stopped
        self._lost = False
        self._counted = False  # in ``clients`` (from its connection_made to its connection_lost)

    # -- the connection cap --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._upgrading:  # the TLS layer's handshake is done: HTTP from now on, through it
            self._upgrading = False
            self.transport = _ClosedWritesDropped(  # type: ignore[assignment]
                transport, self._linger, self._watch_tcp, TLS_WRITE_PIECE
            )
            self.flow = FlowControl(transport)
            self.scheme = "https"
            return
        super().connection_made(_ClosedWritesDropped(transport, self._linger))  # type: ignore[arg-type]
        self._address = self.client[0] if self.client else ""
        clients = self.clients
        address = clients.by_address.get(self._address)
        if address is None:
            address = clients.by_address[self._address] = _Address()
        address.connections.add(self)
        clients.counts.add(self._address)
        clients.ordinary += 1
        self._counted = True
        if clients.ordinary + len(clients.reserve) > self.limits.max_connections:
            self._admit()
        if self.transport.is_closing():
            return
        self._track(idle=True)
        self._arm_head_timer()
        if self.tls is not None:
            self._start_tls(transport, self.tls)

    def _start_tls(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Put the TLS layer between the admitted TCP connection and this protocol, at once, with what is
        left of the head deadline for the handshake (``server.tls_layer``). The layer calls
        ``connection_made`` again with its transport once the handshake is done."""
        left = self.opened_at + self._head_seconds() - time.monotonic()
        self._upgrading = True
        self._tcp = raw
        try:
            wrap_tls(
                self.loop,
                raw,
                self,
                context,
                left,
                self._handshake_done,
                # a backstop: ``_close_tls`` ends every close before (a slow reader's at ``body_timeout``)
                shutdown_seconds=self.limits.body_timeout + TLS_STALL_SECONDS,
            )
        except Exception as e:  # no memory for the TLS layer: this one connection is closed
            log.info("closed a connection whose TLS layer could not be made: %r", e)
            self._upgrading = False
            raw.abort()
            self.connection_lost(None)

    def _handshake_done(self, failed: bool) -> None:
        """A handshake that failed, timed out or lost its client ends the connection here (the TLS
        layer tells the application only about connections it completed)."""
        if failed or self._upgrading:
            if failed:
                log.debug("closed a connection whose TLS handshake did not complete")
            self._upgrading = False
            self.transport.abort()
            self.connection_lost(None)

    def _busy(self) -> bool:
        """In the middle of a request: its head is in and its answer is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _track(self, idle: bool) -> None:
        """Put this connection where the choice of one to close looks (``_Clients``): called wherever it
        may have started sending a request or its body, or (``idle``) opened or finished a request."""
        if self._counted and not self._reserve:
            clients = self.clients
            clients.by_address[self._address].track(self, idle)
            if idle:
                clients.free.push(self, clients.ordinary)

    def _free(self) -> bool:
        """An ordinary open connection not in the middle of a request (idle, or still sending its head)."""
        return not self._reserve and not self._lost and not self._busy() and not self.transport.is_closing()

    def _admit(self) -> None:
        """Make room for this connection past ``max_connections``: evict an idle one, else take a place in
        the probe reserve, else close this one."""
        clients = self.clients
        ordinary = clients.ordinary - 1  # this one is not yet in the reserve
        if (
            ordinary < self.limits.max_connections
            or self._cut_oldest_closing()
            or self._displace()
            or self._close_oldest_free()
        ):
            return
        reserve = [c for c in clients.reserve if c is not self]  # at most PROBE_RESERVE
        if len(reserve) < PROBE_RESERVE or self._close_oldest_idle(reserve) or self._close_oldest_stale(reserve):
            self._reserve = True
            clients.ordinary -= 1
            clients.reserve.add(self)
            self.timeout_keep_alive = min(self.timeout_keep_alive, RESERVE_KEEP_ALIVE_SECONDS)
            log.info("all %d connections are busy (--max-connections): one more for probes only", ordinary)
            return
        if count := clients.turned_away.due():
            note = clients.turned_away.note(count)
            log.warning(
                "refused a connection: all %d open ones are busy (--max-connections)%s", ordinary + len(reserve), note
            )
        self.transport.close()

    def _cut_oldest_closing(self) -> bool:
        """Cut the oldest ordinary connection the server is closing whose client has taken nothing of the rest
        of its answer for ``CLOSING_IDLE_SECONDS`` (a TLS connection, ``_close_tls``), or sent nothing more
        of the body it is reading past for as long once its answer has reached the client (a plain one
        lingering, ``_start_lingering``), or
        whose address gives way to this one's (``fairness.gives_way``): it is answered, and holds its slot
        only for a client that reads slowly or not at all, or sends a body it was told it need not send. A
        client still taking its answer, or still sending the body it is reading past (a client that sends
        its whole body before it reads the answer: cut, it lost the answer, outside attack rt45), from an
        address holding no more than this one's keeps it (outside attack rt29: new connections past the cap
        cut an honest slow reader's answer). At most
        ``CLOSING_LOOKED_AT`` are looked at; False when none qualifies."""
        counts, now = self.clients.counts, time.monotonic()
        mine = counts.of[self._address] - 1
        for closing in itertools.islice(list(self.clients.cutting), CLOSING_LOOKED_AT):
            tcp = closing._tcp if closing._tcp is not None else closing._lingering
            if tcp is None or tcp.is_closing():
                self.clients.cutting.pop(closing, None)
                continue
            idle = now - closing._moved >= CLOSING_IDLE_SECONDS  # over TLS, taken nothing; lingering, sent nothing
            if tcp is closing._lingering:  # its answer must have reached the client: a reset would lose it
                idle = idle and not tcp.get_write_buffer_size() and not _unacknowledged(tcp)
            if idle or (closing._address != self._address and gives_way(counts.of[closing._address], mine)):
                self.clients.cutting.pop(closing, None)
                tcp.abort()
                return True
        return False

    def _displace(self) -> bool:
        """Close a connection of the address holding the most, when it holds at least two more than this
        connection's address (``fairness.gives_way``): one idle or still sending, else one whose client
        does not read its answer (dropped unread), else one whose request only waits at its model
        (withdrawn, answered, then closed); False when it does not or has none to give."""
        counts = self.clients.counts
        heaviest = counts.heaviest()
        held = counts.of[heaviest]
        if heaviest == self._address or not gives_way(held, counts.of[self._address] - 1):
            return False
        address = self.clients.by_address[heaviest]
        chosen = address.idle.first() or address.sending.first()
        stalled = address.stalled.first() if chosen is None else None
        if chosen is not None:
            chosen._give_way()
        elif stalled is not None:
            stalled._drop_unread()
        elif not _withdraw_newest_waiting(address.connections):
            return False
        self._displaced(heaviest, held)
        return True

    def _close_oldest_free(self) -> bool:
        """Close the oldest ordinary connection not in the middle of a request of an address holding at
        least as many connections as this one's (this one counted): a new connection never closes a
        connection of an address holding fewer. (A client whose waiting request was withdrawn for another
        address comes straight back; it closed that address's new connection, idle until its request
        arrived, and the other client got no answer.) False when there is none.

        When this address holds one connection (this one), every address qualifies: the oldest of the
        port's. Else the oldest of each address holding at least as many: at most (open connections) /
        (this address's) of them."""
        clients = self.clients
        mine = clients.counts.of[self._address]
        if mine <= 1:
            oldest = clients.free.first()
        else:
            firsts = (clients.by_address[a].free.first() for a in clients.counts.holding_at_least(mine))
            oldest = min((c for c in firsts if c is not None and c is not self), key=_opened, default=None)
        if oldest is None or oldest is self:
            return False
        log.debug("closed the oldest idle connection to make room (--max-connections %d)", self.limits.max_connections)
        oldest._close_for_room()
        return True

    def _waiting_requests(self) -> list[tuple[RequestResponseCycle, CallSlot]]:
        """The request of this connection being handled, when it only waits at its model (queued, or for
        room for its text; nothing of it run: ``InferenceCall.only_waiting``), as (its cycle, its slot)."""
        if self._reserve or self.transport.is_closing():
            return []
        return [
            (cycle, slot)
            for cycle, slot in self._requests
            if slot.call is not None and not cycle.response_started and slot.call.only_waiting()
        ]

    def _displaceable(self) -> bool:
        """Idle, or still sending its request's head or body: no request of it is being served or answered."""
        if self._reserve or self.transport.is_closing() or self.pipeline:
            return False
        if not self._busy():
            return True
        return self._body_timer is not None and self.cycle is not None and not self.cycle.response_started

    def _sending(self) -> bool:
        return self._head_started or self._busy()

    def _stalled(self) -> bool:
        """Writing an answer its client does not read (writing paused, its send deadline running)."""
        return self._send_timer is not None and not self._reserve and not self.transport.is_closing()

    def _drop_unread(self) -> None:
        """Close this connection for another address's: its client has not read the answer being written
        (an outside attack, rt16, kept every slot of one server this way: pipelined requests for answers it
        never read, each connection "being answered" until --body-timeout, and other addresses got 503).
        The unread answer and the requests queued behind it are dropped."""
        log.info("closed a connection whose client does not read its answer, to let another address in")
        self._abort_answer()

    def cut_unfinished_answer(self) -> bool:
        """Abort this connection when an answer is still being written to it (the server stops, its drain
        has ended: left to the listeners' close, uvicorn would cancel the answer with an ERROR traceback per
        connection, outside attacks rt34 and rt41); whether it did."""
        if self.cycle is None or self.cycle.response_complete or self.transport.is_closing():
            return False
        self._abort_answer()
        return True

    def _abort_answer(self) -> None:
        """Close at once, dropping the answer being written and the requests queued behind it."""
        self._refused = True
        self._cancel_timers()
        self.pipeline.clear()
        self.transport._transport.abort()  # type: ignore[attr-defined]  # the unread answer is not flushed

    def _give_way(self) -> None:
        """Close this connection for another address's; a request it was sending is answered 503."""
        if not self._sending():
            self._cancel_timers()
            self._close_for_room()
            return
        if self.cycle is not None and self._busy():
            self.cycle.response_started = True  # nothing else may answer on this connection now
        self._refuse(
            "503 Service Unavailable",
            "every connection is taken (--max-connections) and this client address holds the most; this one "
            "was closed to let another client in; retry later",
            "retry-after: 1\r\n",
        )

    def _displaced(self, address: str, held: int) -> None:
        """Count a connection closed for another address; one WARNING per burst."""
        throttle = self.clients.displaced
        if displaced := throttle.due():
            log.warning(
                "every connection is taken (--max-connections %d): closed %d connection(s) of %s, the address "
                "holding the most (%d), to let other addresses in (reported every %g s at most)",
                self.limits.max_connections,
                displaced,
                address,
                held,
                throttle.every,
            )

    def _close_oldest_idle(self, connections: list[GuardedHttpProtocol]) -> bool:
        idle = [c for c in connections if not c._busy() and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.opened_at)
        log.debug("closed the oldest idle connection to make room (--max-connections %d)", self.limits.max_connections)
        oldest._close_for_room()
        return True

    def _close_for_room(self) -> None:
        """Close this idle connection to make room. One still in its TLS handshake leaves the count at
        once: the TLS layer reports its end only a few loop turns later, and a burst of new connections
        would otherwise be admitted against a count full of connections already closed."""
        self.transport.close()
        if self._upgrading:
            self._upgrading = False
            self.connection_lost(None)

    def _close_oldest_stale(self, reserve: list[GuardedHttpProtocol]) -> bool:
        """Close the oldest reserve connection open for more than ``RESERVE_STALE_SECONDS``, busy or not: a
        probe or a scrape is done by then, so it is a client that does not read its answers (or pipelines
        request after request), and it must not keep the next probe out."""
        now = time.monotonic()
        stale = [c for c in reserve if now - c.opened_at > RESERVE_STALE_SECONDS and not c.transport.is_closing()]
        if not stale:
            return False
        oldest = min(stale, key=lambda c: c.opened_at)
        log.info("closed a probe-reserve connection open for %.1f s to make room for a probe", now - oldest.opened_at)
        oldest.transport.abort()  # its unread answer is dropped, not flushed
        return True

    def _refuse(self, status: str, message: str, extra: str = "") -> None:
        """Answer ``status`` with a JSON error and close, before the request reaches the application."""
        self._refused = True
        self._read_no_more_tls()
        self._cancel_timers()
        self.transport.write(_error_response(status, message, extra))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:  # a TLS connection that fails its handshake is ended here and by the TLS layer
            return
        self._lost = True
        self._cancel_timers()
        self.clients.cutting.pop(self, None)
        self._lingering = None
        if self._counted:
            self._counted = False
            clients = self.clients
            address = clients.by_address[self._address]
            address.connections.discard(self)
            if not address.connections:
                del clients.by_address[self._address]
            clients.counts.remove(self._address)
            if self._reserve:
                clients.reserve.discard(self)
            else:
                clients.ordinary -= 1
                clients.free.trim(clients.ordinary)
        super().connection_lost(exc)
        if self._tcp is not None:  # over TLS: nothing of the TLS layer stays reachable from this protocol
            self._tcp = None
            writer = self.transport
            if isinstance(writer, _ClosedWritesDropped):
                writer.detach()

    # -- the request head ----------------------------------------------------------------------------
    def _head_seconds(self) -> float:
        limit = self.limits.header_timeout
        return min(limit, RESERVE_HEAD_SECONDS) if self._reserve else limit

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_seconds(), self._head_timed_out)

    # -- closing with the request body unread -----------------------------------------------------------
    def _linger(self) -> bool:
        """A connection closed while its request body is still arriving (an answer given early: a 413 to a
        compressed body too large, a client that asked for ``Connection: close``) would be reset by the
        kernel over the unread bytes, and the client would lose the answer. Instead its write side is shut
        (the answer goes out, then FIN), and what the client still sends is read and dropped until it
        closes, up to :data:`LINGER_BYTES` or :data:`LINGER_SECONDS`; then the connection is cut. Only an
        answer of the application's lingers: a connection closed to free its slot closes at once.
        Returns False (close now) when nothing of the request is left unread."""
        answered = self.cycle is not None and self.cycle.response_complete  # not a 408, 503 or 431 of ours
        self._close_tls()
        if not (self._body_pending and answered) or self._refused:
            return False
        return self._start_lingering()

    def _start_lingering(self) -> bool:
        """Shut the write side (the answer written goes out, then FIN) and read and drop what still arrives, up
        to :data:`LINGER_BYTES` or :data:`LINGER_SECONDS`, then cut; False when the transport cannot (TLS)."""
        raw = self.transport._transport  # type: ignore[attr-defined]  # the _ClosedWritesDropped's own
        if raw.is_closing() or not raw.can_write_eof():
            return False
        self._cancel_timers()
        self._linger_left = LINGER_BYTES
        raw.write_eof()
        raw.resume_reading()  # uvicorn may have paused reading while the app held the body
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, raw.abort)
        if self._counted and not self._reserve:
            # its slot may go to a new connection past the cap once its answer is delivered: 1,200 clients
            # that sent a head and a byte of body every 5 s, answered early (401, 413, 503) and lingering,
            # kept other addresses out of the cap (outside attack rt43)
            self._lingering = raw
            self._moved = time.monotonic()
            self.clients.cutting[self] = None
        return True

    def _close_tls(self) -> None:
        """Over TLS, end this connection, which the server closes, once its answer (and close_notify) has
        reached the client, reading and dropping undecrypted whatever arrives meanwhile.

        TLS cannot shut only its write side, and the TLS layer's close waits for the client's close_notify,
        decrypting all that arrives meanwhile: a body answered early, 1.25 GB in 2 s from one connection and 30
        such held probes 3.6 s (rt20); bytes that are no request, or more after the last request, 1.2 to 1.9 GB
        (rt22); after a clean close, what came in the 50 ms it read for close_notify, at full speed (rt26).
        Nothing more is decrypted now: the TCP transport's bytes go to a scratch buffer (``_Undecrypted``); not
        paused, which kept 12 to 18 KB of each connection for good under uvloop's TLS layer (rt23). Once all it
        was given is acknowledged the connection is closed (FIN: what the client sent is read, so no reset
        reaches a client that reads its answer late); one whose client takes nothing more for
        ``TLS_STALL_SECONDS`` is cut, and so, under ``--max-connections``, is the oldest such connection when
        a new one needs its slot (rt26: clients that never read held every slot 2 s each); one whose client
        takes its answer slowly is closed as it finishes (``body_timeout`` at most; rt26: a 4.7 MB answer read
        at 500 KB/s lost its last 0.5 MB when the TLS layer gave up 2 s after the close)."""
        tcp = self._tcp
        if tcp is None or tcp.is_closing() or self._closing_tls:
            return
        self._closing_tls = True
        self._read_no_more_tls()
        if self._counted and not self._reserve:
            self.clients.cutting[self] = None
        now = self._moved = time.monotonic()
        self.loop.call_later(TLS_CUT_CHECK_SECONDS, self._close_once_sent, tcp, now + self.limits.body_timeout, now, -1)

    def _read_no_more_tls(self) -> None:
        """Over TLS, decrypt nothing more this connection receives: it is read and dropped (``_Undecrypted``).
        Its close, which follows its answer, is ``_close_tls``'s."""
        tcp = self._tcp
        if tcp is not None and not tcp.is_closing() and not self._undecrypted:
            self._undecrypted = True
            tcp.set_protocol(_Undecrypted(tcp.get_protocol()))

    def _close_once_sent(self, tcp: asyncio.Transport, deadline: float, moved: float, before: int) -> None:
        """Close ``tcp`` once all it was given has reached the client (its buffer, the TLS layer's and the
        socket's send queue, which holds what is sent until the client acknowledges it, all empty); cut it
        when nothing of that has moved since ``moved`` for ``TLS_STALL_SECONDS``, or at ``deadline``."""
        if tcp.is_closing():
            return
        left = tcp.get_write_buffer_size() + self.transport.get_write_buffer_size() + _unacknowledged(tcp)
        now = time.monotonic()
        if not left:
            tcp.close()
            give_back_memory_later(self.loop, TRIM_AFTER_CUT_SECONDS)  # a flood of clean closes kept ~300 MB (rt32)
            return
        if before < 0 or left < before:
            moved = self._moved = now
        if now - moved >= TLS_STALL_SECONDS or now >= deadline:
            tcp.abort()  # what is left is dropped: its client does not take it
            give_back_memory_later(self.loop, TRIM_AFTER_CUT_SECONDS)
            return
        self.loop.call_later(TLS_CUT_CHECK_SECONDS, self._close_once_sent, tcp, deadline, moved, left)

    def _lingered(self, data: bytes) -> None:
        self._linger_left -= len(data)
        self._moved = time.monotonic()  # its client still sends: not one to cut for room (_cut_oldest_closing)
        if self._linger_left < 0:
            self.transport._transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._linger_left >= 0:
            self._lingered(data)
            return
        if self._refused or self._switch_asked:
            return
        if self._heads and not self._body_pending and not self._head_started:
            self._beyond = True  # until a request begins in them (on_message_begin)
        # the rest of a body answered early (a 413) is not the next request's head
        awaiting_head = not self._busy() and not self._body_pending
        in_body = self._body_pending
        if in_body:  # on_body takes the body's own bytes back out; on_chunk_complete starts again
            self._framing += len(data)
        # A head that began in an earlier read counts whole reads, also behind a request still being
        # answered (pipelined): it holds at most the limit and one read before it is refused.
        if awaiting_head or self._head_started:
            self._head_bytes += len(data)  # on_headers_complete resets it if the head ends in this data
        seen, heads = self._body_seen, self._heads
        closing = self.transport.is_closing()
        super().data_received(data)
        if not closing and self.transport.is_closing():
            # closed for what it sent (not HTTP: uvicorn's 400 "Invalid HTTP request"): what follows is not
            # wanted (over TLS, 30 clients sending junk had 12-15 GB decrypted in 15 s: rt22)
            self._read_no_more_tls()
            return
        if in_body and self._body_pending and self._framing > self.limits.max_header_bytes and not self._refused:
            self._framing_too_large()
            return
        if in_body and self._body_pending and heads == self._heads:  # this read was of the same body alone
            self._framing_total += len(data) - (self._body_seen - seen)
            if self._framing_total > self.limits.max_header_bytes + self._body_bytes and not self._refused:
                self._framing_outweighs_data()
                return
        if (
            not self._refused
            and self._head_bytes > self.limits.max_header_bytes
            and (self._head_started or (awaiting_head and not self._busy()))
            and not self.transport.is_closing()
        ):
            if self._busy():  # an answer is being written: no room for one more in between
                self._cut(f"a pipelined request head above {self.limits.max_header_bytes} bytes (--max-header-bytes)")
            else:
                self._head_too_large()
            return
        # Bytes that start no request (stray CRLFs) must not stop the clock: uvicorn has just
        # cancelled its keep-alive timer, and no other one may be running.
        if (
            self._head_timer is None
            and self._body_timer is None
            and self.timeout_keep_alive_task is None
            and not self._busy()
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self._arm_head_timer()

    # -- protocol upgrades: none ------------------------------------------------------------------------
    def _should_upgrade(self) -> bool:
        """Never: the server has no WebSocket (or other protocol) to switch to. uvicorn's switch hands the
        connection to a WebSocket protocol whose close never reaches ``connection_lost``: 1,016 WebSocket
        upgrades (each answered 403) kept their slots, and every client, probes included, was locked out
        of the HTTP port for good (outside attack rt16). A request that asks to switch is served as plain
        HTTP/1.1, as RFC 9110 lets a server do, and its connection closes after the answer."""
        return False

    def _unsupported_upgrade_warning(self) -> None:
        """The parser has stopped after a request asking to switch protocols (``Connection: upgrade``): what
        follows on the connection is not HTTP/1.1 any more, so it is dropped unread, and the connection
        closes once that request is answered (uvicorn logged two warnings here, then a 400 and a third
        warning when more bytes came)."""
        self._switch_asked = True
        self._read_no_more_tls()  # what follows is not HTTP/1.1 and is dropped unread (over TLS)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif not self.transport.is_closing():
            self.transport.close()

    def on_message_begin(self) -> None:
        if self._refused:  # the rest of a read that came after the refusal
            return
        self._head_fields = 0
        self._beyond = False
        if not self._busy():
            self._pipelined_bytes = 0
        super().on_message_begin()
        self._head_started = True
        self._arm_head_timer()
        self._track(idle=False)

    def on_url(self, url: bytes) -> None:
        """A piece of the request target: pipelined behind the request being answered, it counts with the
        heads' fields (a 60 KiB target under the 100-field limit would otherwise go uncounted, 32 times)."""
        if self._refused:
            return
        if self._busy() and self._count_pipelined(len(url)):
            return
        super().on_url(url)

    def _count_pipelined(self, size: int) -> bool:
        """Count ``size`` bytes of a request (head or body) pipelined behind the one being answered; whether
        that passed ``--max-header-bytes`` for the pipelined requests together, and the connection was cut."""
        self._pipelined_bytes += size
        if self._pipelined_bytes > self.limits.max_header_bytes:
            self._cut(f"requests pipelined behind a busy one above {self.limits.max_header_bytes} bytes together")
            return True
        return False

    def on_header(self, name: bytes, value: bytes) -> None:
        """A header field, counted as it is parsed: at most ``MAX_HEADER_FIELDS`` per head, and the heads
        pipelined behind the request being answered at most ``--max-header-bytes`` together. uvicorn parses
        every head of a read into Python objects (a 5-byte field takes 130 bytes); 31 pipelined heads of
        1,500 fields each per connection took 5.4 MB, 1.6 GB over 300 connections (outside attack rt15)."""
        if self._refused:
            return
        self._head_fields += 1
        # a head pipelined behind the request being answered
        if self._busy() and self._count_pipelined(len(name) + len(value) + 4):
            return
        if self._head_fields > MAX_HEADER_FIELDS:
            if self._busy():
                self._cut(f"a pipelined request head of more than {MAX_HEADER_FIELDS} header fields")
            else:
                log.info("refused a request head of more than %d header fields", MAX_HEADER_FIELDS)
                self._refuse(
                    "431 Request Header Fields Too Large",
                    f"the request head has more than {MAX_HEADER_FIELDS} header fields",
                )
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_started = False
        self._head_bytes = 0
        self._body_bytes = 0
        self._framing = 0
        self._framing_total = 0
        self._heads += 1
        self._chunks = 0
        head = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if head > self.limits.max_header_bytes:
            self._head_too_large()
            return
        if self.parser.should_upgrade() and announces_body(self.headers):
            # httptools stops before the body of a request that asks to switch protocols (as for a
            # WebSocket's), so it would reach the application empty: curl --http2 on an http:// URL sends
            # every POST so (outside attack rt18: a valid inference answered 400 "not valid JSON")
            log.info("refused a request with a body that asks to switch protocols")
            self._refuse(
                "400 Bad Request",
                "this request asks to switch protocols (Connection: upgrade) and has a body; the server speaks "
                "HTTP/1.1 and does not switch: send it without the Upgrade header (curl: --http1.1)",
            )
            return
        if self.url.split(b"?", 1)[0] in OPEN_PATHS and announces_body(self.headers):
            # The probes take no body, and they are open to all: a body sent to them would be read (and
            # counted in --max-inflight-bytes) for an anonymous client (4 anonymous heads of 67 MB to
            # /v2/health/live held the budget from every authenticated request for 60 s: rt20).
            log.info("refused a request with a body to a health probe")
            self._refused = True
            self._read_no_more_tls()
            message = "the health probes take no request body: send a GET without one"
            self.transport.write(_error_response("400 Bad Request", message))
            if not self._start_lingering():  # so that the client gets the answer before the close
                self._cancel_timers()
                self.transport.close()
            return
        if self._reserve and self.url.split(b"?", 1)[0] not in PROBE_PATHS:
            log.info("refused a request on a probe-reserve connection: every other connection is busy")
            self._refuse(
                "503 Service Unavailable",
                "every connection is busy (--max-connections); this one is kept for health probes and metrics; "
                "retry later",
                "retry-after: 1\r\n",
            )
            return
        slot = CallSlot()
        self.scope[CALL_SLOT] = slot  # type: ignore[literal-required]  # an extension key of ours
        super().on_headers_complete()
        while self._requests and self._requests[0][0].response_complete:
            self._requests.popleft()
        if self.cycle is not None and self.cycle.scope.get(CALL_SLOT) is slot:
            self._requests.append((self.cycle, slot))
        if len(self.pipeline) > MAX_PIPELINED:
            self._cut(f"more than {MAX_PIPELINED} requests pipelined behind the one being answered")
            return
        self._body_pending = True
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        self._track(idle=False)

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        self._body_seen += len(body)
        # the body of a request queued behind the one being answered counts with the queued heads: uvicorn
        # keeps it whole until its turn (240 KB a connection, outside --max-inflight-bytes: rt16)
        if self.pipeline and self.pipeline[0][0] is self.cycle and self._count_pipelined(len(body)):
            return
        if not self._refused:
            self._body_bytes += len(body)
            super().on_body(body)

    def on_chunk_complete(self) -> None:
        """A chunk of a chunked body is complete (the last one with its trailer fields): what it held beyond
        its data is counted from here again; past ``CHUNKS_FREE`` chunks they must average
        ``MIN_CHUNK_AVERAGE`` bytes."""
        self._framing = 0
        self._chunks += 1
        if self._chunks > CHUNKS_FREE and self._body_bytes < self._chunks * MIN_CHUNK_AVERAGE and not self._refused:
            log.info(
                "refused a chunked request body of more than %d chunks averaging under %d bytes",
                CHUNKS_FREE,
                MIN_CHUNK_AVERAGE,
            )
            self._refuse_body(
                "400 Bad Request",
                f"the request body's chunks average under {MIN_CHUNK_AVERAGE} bytes after {CHUNKS_FREE} of them; "
                "send larger chunks, or a Content-Length body",
            )

    def _framing_outweighs_data(self) -> None:
        """A chunked body's framing in all (chunk lines: their extensions) passed its data by more than
        ``--max-header-bytes``. Neither the data limits (``--max-request-bytes``, the chunk average) nor the
        framing limit per chunk saw it: 256-byte chunks each with a 60,000-byte extension streamed 10 GB of
        framing from 30 connections in 15 s, never answered, probes 6.2 s (outside attack rt20). Clients send
        no or short extensions."""
        log.info("refused a chunked request body whose framing outweighs its data")
        self._refuse_body(
            "400 Bad Request",
            "the request body's chunk lines (chunk extensions) hold more bytes than its data; send chunks "
            "without extensions, or a Content-Length body",
        )

    def _framing_too_large(self) -> None:
        """A chunked body's framing passed ``--max-header-bytes`` since its last chunk: trailer fields (or a
        chunk line) that do not end. The parser keeps such a field as one bytes object it extends with each
        read (quadratic), which nothing else counted: 40 connections of 20 MiB of one trailer value held
        +801 MB and probes 15.6 s (outside attack rt16)."""
        log.info("refused a chunked request body whose framing passed %d bytes", self.limits.max_header_bytes)
        self._refuse_body(
            "431 Request Header Fields Too Large",
            f"the request body's chunk lines or trailer fields are larger than {self.limits.max_header_bytes} "
            "bytes (--max-header-bytes)",
        )

    def _refuse_body(self, status: str, message: str) -> None:
        """Refuse the request whose body is arriving: answered ``status`` when nothing of its answer went out
        yet and no request before it is still being answered, else the connection is closed (a refusal
        written ahead of an earlier request's answer would be read as that answer: rt18)."""
        cycle = self.cycle
        queued = bool(self.pipeline) and self.pipeline[0][0] is cycle
        if cycle is not None and not cycle.response_started and not queued and not self.transport.is_closing():
            cycle.response_started = True  # nothing else may answer on this connection now
            self._refuse(status, message)
            return
        self._refused = True
        self._cancel_timers()
        self.transport.close()

    def on_message_complete(self) -> None:
        self._body_pending = False
        if self._refused:
            return
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline:  # nothing queued any more: what was counted of the queued requests has run
            self._pipelined_bytes = 0
        answered_early = self._body_pending and self.cycle is not None and self.cycle.response_complete
        if answered_early and not self.transport.is_closing():
            # Answered before its body was in (a 413, 404, 405...): the rest of the body is not read on to keep
            # the connection (a 413 to a Content-Length of 10 GB read all 10 GB, unauthenticated on the probe
            # routes, and 30 such over TLS held probes 5.5 s: rt20). The connection closes, lingering.
            self.transport.close()
            return
        self._track(idle=True)  # or the next pipelined request, its body perhaps still arriving

    def refuse_unreceived(self, message: str) -> bool:
        """Answer 503 and close when this connection's request body is still arriving and nothing of its
        answer is sent (the server is stopping: left to the listeners' close, uvicorn would cancel its
        request and answer a plain 500 with a traceback in the log); whether it did."""
        if self._refused or not self._body_pending or self.transport.is_closing():
            return False
        if self.cycle is not None and self.cycle.response_started:
            return False
        log.info("refused a request whose body was still arriving: the server is stopping")
        self._refuse("503 Service Unavailable", message, "retry-after: 1\r\n")
        return True

    def _cut(self, why: str) -> None:
        """Close without an answer (one is being written, and a refusal cannot come between): for a client
        that pipelines past the limits. The requests queued behind the one being answered never run."""
        log.info("closed a connection: %s", why)
        self._refused = True
        self._cancel_timers()
        self.pipeline.clear()
        self.transport.close()

    def _head_too_large(self) -> None:
        log.info("refused a request head above %d bytes (--max-header-bytes)", self.limits.max_header_bytes)
        self._refuse(
            "431 Request Header Fields Too Large",
            f"the request head is larger than {self.limits.max_header_bytes} bytes (--max-header-bytes)",
        )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._busy():
            return
        if self._head_started:
            self.transport.write(
                _timeout_response(
                    f"the request head did not arrive within {self._head_seconds():g} s (--header-timeout)"
                )
            )
        self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.response_started = True  # nothing else may answer on this connection now
            self.transport.write(
                _timeout_response(
                    f"the request body did not arrive within {self.limits.body_timeout:g} s (--body-timeout)"
                )
            )
        log.info("closed a connection whose request body did not arrive within %g s", self.limits.body_timeout)
        self.transport.close()

    # -- the answer ---------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        """The transport's buffer (over TLS: the TLS layer's) is full: see ``_writing_blocked``."""
        self._layer_full = True
        self._writing_blocked()

    def resume_writing(self) -> None:
        self._layer_full = False
        if self._tcp is not None:
            self._pump()
        if not self._tcp_full and not self._backlogged:
            self._writing_unblocked()

    def _pump(self) -> None:
        """Over TLS: hand the TLS layer the answer's backlog a piece at a time while it takes more (until it
        pauses this protocol; its ``resume_writing`` pumps again). Writing stays blocked while there is a
        backlog, so the answer stays in the in-flight budget until the client has taken it."""
        writer = self.transport
        assert isinstance(writer, _ClosedWritesDropped)
        tcp = self._tcp
        while writer.backlog and not self._layer_full and tcp is not None and not tcp.is_closing():
            writer.write_piece()
        if writer.backlog and not self._backlogged:
            self._backlogged = True
            self._writing_blocked()
        elif not writer.backlog and self._backlogged:
            self._backlogged = False
            if not self._layer_full and not self._tcp_full:
                self._writing_unblocked()

    def _watch_tcp(self) -> None:
        """Over TLS, after a write: its backlog is pumped (``_pump``), and writing is blocked while the TCP
        transport's buffer is full too. The TLS layer pauses the application only for its own buffer, and a
        large answer moved to the TCP transport's at once, so uvicorn took it as sent: its bytes left the
        in-flight budget unread (outside attack rt29: 40 clients that read nothing of 60 MiB answers each, RSS
        +3.2 GB, where plain HTTP refused all but one)."""
        self._pump()
        tcp = self._tcp
        if tcp is None or self._tcp_full or tcp.is_closing():
            return
        if tcp.get_write_buffer_size() > TLS_WRITE_HIGH_WATER:
            self._tcp_full = True
            self._writing_blocked()
            self.loop.call_later(TLS_CUT_CHECK_SECONDS, self._tcp_drained)

    def _tcp_drained(self) -> None:
        """Unblock writing once the TCP transport's buffer is down to a quarter of ``TLS_WRITE_HIGH_WATER``
        (checked every ``TLS_CUT_CHECK_SECONDS``), or the connection has ended."""
        tcp = self._tcp
        if tcp is not None and not tcp.is_closing() and tcp.get_write_buffer_size() > TLS_WRITE_HIGH_WATER // 4:
            self.loop.call_later(TLS_CUT_CHECK_SECONDS, self._tcp_drained)
            return
        self._tcp_full = False
        if not self._layer_full and not self._backlogged:
            self._writing_unblocked()

    def _writing_blocked(self) -> None:
        """The client reads slower than the answer is written: it has ``body_timeout`` seconds to catch up,
        and meanwhile its connection may be closed for another address (``_displace``)."""
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.body_timeout, self._send_timed_out)
            if self._counted and not self._reserve:
                address = self.clients.by_address[self._address]
                address.stalled.push(self, len(address.connections))

    def _writing_unblocked(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        log.info("cut a connection that did not read its answer within %g s (--body-timeout)", self.limits.body_timeout)
        self.transport.abort()  # drops the unsent answer at once; close() would keep it until it is read

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer, self._send_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = self._send_timer = self._linger_timer = None


def _opened(connection: GuardedHttpProtocol) -> float:
    return connection.opened_at


def _withdraw_newest_waiting(connections: set[GuardedHttpProtocol]) -> bool:
    """Withdraw the newest request of ``connections`` that only waits at its model: it is answered 503 with
    ``Retry-After`` (``WITHDRAWN_MESSAGE``), then its connection closes; False when none only waits."""
    waiting = [(slot.call, cycle) for c in connections for cycle, slot in c._waiting_requests() if slot.call]
    for call, cycle in sorted(waiting, key=lambda found: found[0].started, reverse=True):
        if call.withdraw(ResourceExhaustedError(WITHDRAWN_MESSAGE)):
            cycle.keep_alive = False  # answered with "connection: close", then closed
            return True
    return False


class _Undecrypted(asyncio.BufferedProtocol):
    """What a TLS connection that the server is closing reads into (``_close_tls``): its bytes are dropped
    as they come, not decrypted; the end of the connection still reaches its TLS layer."""

    _scratch = bytearray(64 * 1024)  # one for all: what is read into it is never looked at

    def __init__(self, layer: asyncio.BaseProtocol) -> None:
        self.layer = layer

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes

    def pause_writing(self) -> None:
        self.layer.pause_writing()

    def resume_writing(self) -> None:
        self.layer.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.layer.connection_lost(exc)


TRIM_AFTER_CUT_SECONDS = 5.0
"""How long after a TLS connection was closed or cut the C allocator's free memory goes back to the system
(``malloc_trim``, on a worker thread; once for all the closes meanwhile): the TLS layer reads a client in
blocks of up to 256 KiB, and a flood of clients cut while sending left 300 to 650 MB free but kept (outside
attack rt24); a flood of clean closes, 270 to 300 MB (rt32)."""


def _unacknowledged(tcp: asyncio.Transport) -> int:
    """Bytes in ``tcp``'s socket send queue (sent or not) that the client has not acknowledged (Linux
    ``SIOCOUTQ``); 0 where that cannot be asked."""
    sock = tcp.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(queued, sys.byteorder, signed=True)


class _Refused(asyncio.Protocol):
    """The protocol of a connection no protocol could be made for: it is closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


REFUSED = _Refused()
"""Made in advance: a connection refused for want of memory needs no more of it."""


def guarded_http_protocol(
    limits: ConnectionLimits, tls: ssl.SSLContext | None = None
) -> Callable[..., asyncio.Protocol]:
    """The uvicorn ``http=`` protocol factory that enforces ``limits`` (``tls``: serve HTTPS with it)."""
    guarded: type[GuardedHttpProtocol] = type(
        "GuardedHttpProtocol", (GuardedHttpProtocol,), {"limits": limits, "clients": _Clients(), "tls": tls}
    )

    refusals = LogThrottle()

    def accept(*args: Any, **kwargs: Any) -> asyncio.Protocol:
        try:
            return guarded(*args, **kwargs)
        except Exception as e:  # MemoryError above all: refuse this one, keep the listener
            with contextlib.suppress(Exception):
                if refused := refusals.due():
                    log.warning(
                        "refused %d connection(s): a protocol could not be made (%r; reported every %g s at most)",
                        refused,
                        e,
                        refusals.every,
                    )
            return REFUSED

    return accept


# -- gRPC ------------------------------------------------------------------------------------------------


FILES_PER_GRPC_CONNECTION = 3
"""Open files a gRPC connection takes: the client's socket, and the two ends of the socket by which the
port's front (``server.grpc_front``) hands it on to grpc-core."""


def grpc_connection_cap(settings: ServerSettings) -> int:
    """``grpc_max_connections``, lowered to what the open-file limit leaves beside HTTP's connections.

    The same as HTTP's by default: past it an idle connection makes room (``server.grpc_front``; grpc
    itself refused every new one, so the cap was 10,000). An idle HTTP/2 connection holds about 21 KiB
    (grpc-core's and the front's); one waiting its turn for the front's checks holds its last read too, up
    to 256 KiB, so 1,000 of them hold at most about 280 MB.
    """
    http = connection_cap(settings.max_connections) + PROBE_RESERVE
    # three descriptors a gRPC connection: the client's, and both ends of the front's socket to grpc-core
    room = max(16, (raise_file_limit() - RESERVED_FILE_DESCRIPTORS - http) // FILES_PER_GRPC_CONNECTION)
    if settings.grpc_max_connections > room:
        log.info(
            "--grpc-max-connections %d is more than the open-file limit allows; using %d",
            settings.grpc_max_connections,
            room,
        )
        return room
    return settings.grpc_max_connections


GRPC_SEND_HEADROOM = 1024 * 1024
"""Bytes a gRPC response may take beyond ``--grpc-max-message-bytes``: the protobuf envelope (names,
shapes, length prefixes) of output tensors that take up to the limit themselves."""


def grpc_send_limit(settings: ServerSettings) -> int:
    """The largest message the gRPC server sends: tensors up to ``--grpc-max-message-bytes``, and their envelope."""
    return settings.grpc_max_message_bytes + GRPC_SEND_HEADROOM


GRPC_METADATA_SOFT_BYTES = 8 * 1024
GRPC_METADATA_HARD_BYTES = 16 * 1024
"""grpc-core's header list limits (name + value + 32 bytes a field), set here as its defaults are: past the
soft one it refuses a call with a chance that grows to certainty at the hard one (RESOURCE_EXHAUSTED), once
the client has acknowledged its SETTINGS (before, it serves every list: outside attack rt46). The
gRPC port's front closes a connection whose block decodes to the hard one or more (``grpc_front``): grpc-core
refuses such a call when it sees the block whole, but under load, reading it in pieces, it handed the call
to the handler with its fields cut at the limit (outside attack rt42 F1, repeated: 3,400 such calls in 17 s
queued ahead of other clients' calls)."""


def grpc_options(settings: ServerSettings, cap: int) -> list[tuple[str, int]]:
    """grpc.aio server options for the limits grpc enforces itself (see the module docstring); ``cap``: the
    most connections grpc-core takes (a backstop: the port's front holds :func:`grpc_connection_cap`)."""
    options = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        # Compressed request messages are inflated by the server (``MessageReception._inflated``), within
        # the message's room and off the event loop: grpc inflated them itself, at any ratio, before a
        # handler saw them (outside attack rt33: 32 messages of 61 KB of gzip, each 60 MiB inflated, held
        # gRPC probes 6.6 s).
        ("grpc.per_message_decompression", 0),
        ("grpc.max_send_message_length", grpc_send_limit(settings)),
        ("grpc.so_reuseport", 0),
        ("grpc.max_allowed_incoming_connections", cap),
        ("grpc.server_handshake_timeout_ms", max(1, int(settings.header_timeout * 1000))),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.max_metadata_size", GRPC_METADATA_SOFT_BYTES),
        ("grpc.absolute_max_metadata_size", GRPC_METADATA_HARD_BYTES),
        # Setting the stream limit also switches on grpc-core's "overload protection" (its defence against
        # HTTP/2 rapid reset): a connection's streams count against the limit until the server has freed
        # them, so a connection that wants more calls than the limit has some new calls refused
        # (REFUSED_STREAM: UNAVAILABLE; docs/limits.md, known gaps). It stays on: without it every stream a
        # client opens and resets at once is handled, and what grpcio keeps of each grew three times
        # faster (a bare grpc.aio server: 26 -> 128 MB against 26 -> 58 MB; outside attack rt21).
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
        # No bandwidth-delay probing: it grows every stream's window to megabytes, so a call that is
        # never read (a refused one) could still make grpc accept that much. Without it a stream holds
        # one initial window until its message is asked for; grpc then opens the window to the message.
        ("grpc.http2.bdp_probe", 0),
    ]
    if settings.grpc_max_connection_idle > 0:
        options.append(("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle * 1000)))
    if settings.grpc_max_connection_age > 0:
        options.append(("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(settings.grpc_max_connection_age_grace * 1000)))
    return options


Behaviour = Callable[..., Any]


class MessageReception(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc ships no type hints
    """The service's handlers, each receiving its call's request message itself: within a deadline,
    inside the byte budget.

    grpc receives a unary request's whole message before it calls the handler, and nothing bounds how
    long that takes or how many such messages it holds. For each method of ``handler`` (the service's
    generic handler) this hands grpc a *streaming-request* handler instead, which reserves
    ``max_message_bytes`` of the room for arriving messages (``arriving``, as large as the in-flight
    budget, shared fairly between clients: :class:`~onnxserve.server.message_room.MessageRoom`; waiting
    up to ``BUDGET_WAIT_SECONDS``, else RESOURCE_EXHAUSTED), then reads the one message
    within ``timeout`` seconds (else DEADLINE_EXCEEDED, and the stream is reset), holds the size that
    arrived in the in-flight budget (waiting as long, else RESOURCE_EXHAUSTED), then gives its place back
    (a message waiting for the budget stays counted there, and is never displaced), and calls the
    original handler with it, keeping no reference of its own to the message. ``UNREAD_METHODS`` (the
    server probes) are answered without receiving their (empty) message. A streaming-request call
    (ModelStreamInfer) receives each of its messages the same way (see :meth:`_streaming`).

    It is registered as the server's generic handler, not as an interceptor: grpc runs a chain of
    coroutines through every interceptor on every call, while a generic handler is one lookup (the
    wrapped handler of each method is made on its first call and kept). The bearer-token check, an
    interceptor, still comes first, so a refused call is never received.
    """

    def __init__(
        self,
        handler: grpc.GenericRpcHandler,
        budget: InflightBytes,
        max_message_bytes: int,
        timeout: float,
        message_wait: float = DEFAULT_MESSAGE_WAIT_SECONDS,
        queue: CoreQueue | None = None,
    ) -> None:
        self.handler = handler
        self.queue = queue  # grpc-core's queue as the gRPC front counts it: each call taken is told
        self.budget = budget
        # Messages grpc may be receiving, each counted at the largest size until it has arrived: a room of
        # their own as large as the budget, so that calls waiting for their messages (a stream between two
        # of them) never take the room of bodies and answers that are really held; shared fairly between
        # clients (server.message_room).
        self.arriving = MessageRoom(budget.limit, message_wait)
        self._arriving_full = (
            f"the server is receiving its limit of {budget.limit} bytes of gRPC messages at once (each counted at "
            f"--grpc-max-message-bytes until it has arrived; --max-inflight-bytes); retry later"
        )
        self.max_message_bytes = max_message_bytes
        self.timeout = timeout
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if self.queue is not None:  # grpc.aio took the call (grpc runs this for every call it takes)
            self.queue.taken(call_name(handler_call_details.invocation_metadata))
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self.handler.service(handler_call_details)
            if handler is None:  # not a method of the service: nothing kept for it
                return None
            # The wrappers keep no per-call state: one per served method.
            wrapped = self._wrapped[method] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler that receives ``handler``'s request messages within the budget and the deadline."""
        deserialize: Callable[[bytes], Any] | None = handler.request_deserializer
        if handler.request_streaming:
            return self._streaming(handler, deserialize)
        if method in UNREAD_METHODS and not handler.response_streaming:
            empty_behaviour: Behaviour = handler.unary_unary

            async def answer_unread(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
                return await empty_behaviour(deserialize(b"") if deserialize is not None else b"", ctx)

            return grpc.stream_unary_rpc_method_handler(
                answer_unread, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )

        sized = _sized(deserialize)

        if handler.response_streaming:
            stream_behaviour: Behaviour = handler.unary_stream

            async def receive_then_stream(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
                held, request = await self._receive(ctx)
                hold = Hold(self.budget, held, smallest=0)
                token = holding(hold)
                try:
                    async for response in stream_behaviour(request, ctx):
                        yield response
                        hold.release_answer()  # grpc has it
                finally:
                    stop_holding(token)
                    hold.release()

            return grpc.stream_stream_rpc_method_handler(
                receive_then_stream, request_deserializer=sized, response_serializer=handler.response_serializer
            )
        unary_behaviour: Behaviour = handler.unary_unary

        async def receive_then_answer(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
            held, request = await self._receive(ctx)
            hold = Hold(self.budget, held, smallest=0)  # the message, then also the answer, until the call ends
            token = holding(hold)
            answered = False
            try:
                # Only the handler keeps the message: it drops the bytes once decoded (see v2_grpc.servicer).
                behaviour = unary_behaviour(request, ctx)
                del request
                answer = await behaviour
                answered = True
                return answer
            finally:
                stop_holding(token)
                if answered:
                    # grpc keeps the serialized answer until the client has taken it (a client that never
                    # opens its flow-control window keeps it as long as it stays): held until the call ends.
                    ctx.add_done_callback(lambda _call: hold.release())
                else:
                    hold.release()

        return grpc.stream_unary_rpc_method_handler(
            receive_then_answer, request_deserializer=sized, response_serializer=handler.response_serializer
        )

    def _streaming(self, handler: grpc.RpcMethodHandler, deserialize: Callable[[bytes], Any] | None) -> Any:
        """A streaming-request handler whose every message is received like a unary call's.

        grpc aio receives a stream's next message only when the handler asks for it, so the handler is
        given an iterator that first reserves the largest message (RESOURCE_EXHAUSTED when there is no
        room), then reads within ``timeout``; the message's bytes stay reserved until the handler asks
        for the next one (it has answered this one by then) or the call ends.
        """

        sized = _sized(deserialize)

        async def reserved_messages(ctx: grpc.aio.ServicerContext, held: list[int]) -> AsyncIterator[Any]:
            while True:
                received = await self._receive(ctx, end_ok=True)
                if received is None:
                    return
                parts = list(received)
                del received
                held[0] = parts[0]
                yield parts.pop()  # the message, kept by its handler only (it drops the bytes once decoded)
                self.budget.release(held[0])
                held[0] = 0

        if handler.response_streaming:
            stream_behaviour: Behaviour = handler.stream_stream

            async def stream_within_budget(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
                held = [0]
                answers = Hold(self.budget, smallest=0)  # each answer, until grpc has it
                token = holding(answers)
                try:
                    async for response in stream_behaviour(reserved_messages(ctx, held), ctx):
                        yield response
                        answers.release_answer()
                finally:
                    stop_holding(token)
                    answers.release()
                    self.budget.release(held[0])

            return grpc.stream_stream_rpc_method_handler(
                stream_within_budget, request_deserializer=sized, response_serializer=handler.response_serializer
            )
        unary_behaviour: Behaviour = handler.stream_unary

        async def answer_within_budget(requests: AsyncIterator[Any], ctx: grpc.aio.ServicerContext) -> Any:
            held = [0]
            try:
                return await unary_behaviour(reserved_messages(ctx, held), ctx)
            finally:
                self.budget.release(held[0])

        return grpc.stream_unary_rpc_method_handler(
            answer_within_budget, request_deserializer=sized, response_serializer=handler.response_serializer
        )

    @overload
    async def _receive(self, ctx: grpc.aio.ServicerContext, end_ok: Literal[False] = False) -> tuple[int, Any]: ...

    @overload
    async def _receive(self, ctx: grpc.aio.ServicerContext, end_ok: bool) -> tuple[int, Any] | None: ...

    async def _receive(self, ctx: grpc.aio.ServicerContext, end_ok: bool = False) -> tuple[int, Any] | None:
        """The call's next request message and the bytes it keeps reserved; aborts the call otherwise.

        ``end_ok``: the end of the client's messages is no error (a streaming call); None then.
        """
        arriving = self.arriving
        reserved = min(self.max_message_bytes, arriving.limit) if arriving.limit else self.max_message_bytes
        # Set for the call's task: the codec threads serve clients in turn (``protocols.offload``).
        context.set_peer_host(context.grpc_peer_host(ctx.peer()))
        client = context.current_client()
        place = await arriving.enter(client, reserved, BUDGET_WAIT_SECONDS)
        if place is None:
            await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._arriving_full, _id(ctx))
            raise AssertionError("abort raises")
        try:
            try:
                # A timeout scope, not wait_for: no task of its own for every message read.
                async with asyncio.timeout(self.timeout):
                    received = await ctx.read()
            except TimeoutError:
                log.info("reset a gRPC call whose request message did not arrive within %g s", self.timeout)
                await ctx.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request message did not arrive within {self.timeout:g} s (--body-timeout)",
                    _id(ctx),
                )
            except MemoryError:  # grpc could not make the message's bytes: the client may retry later
                await ctx.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, no_memory("to receive this gRPC message").message, _id(ctx)
                )
            except asyncio.CancelledError:
                if not place.displaced:
                    raise
                # It gave its place to another call's message (server.message_room): ended here, by its own task.
                if (task := asyncio.current_task()) is not None:
                    task.uncancel()
                await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, DISPLACED, _id(ctx))
            place.arrived = True  # counted in the room until the budget takes it; never displaced now
            if received is grpc.aio.EOF:
                if end_ok:
                    return None
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without a request message", _id(ctx))
            size, request = received
            del received
            if isinstance(request, _Compressed):
                return await self._inflated(ctx, request, reserved, place)
            kept = min(size, reserved)
            # What arrived is held now: in the budget every request's bytes share (a moment's wait for room).
            if not await self.budget.reserve_within(kept, BUDGET_WAIT_SECONDS):
                del request  # dropped before the refusal, whose traceback keeps this frame
                await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, over_budget(self.budget.limit).message, _id(ctx))
            return kept, request
        finally:
            arriving.leave(place)

    async def _inflated(
        self, ctx: grpc.aio.ServicerContext, message: _Compressed, room: int, place: Place
    ) -> tuple[int, Any]:
        """A compressed message that has arrived, inflated within ``room`` (what its place in the room of
        arriving messages held: ``--grpc-max-message-bytes`` at most), in the codec threads past its first
        256 KiB (``protocols.inflation``), then read as its handler reads a message; the call aborted
        otherwise. Returned with the bytes it holds in the budget from here (the inflated message's, as an
        uncompressed message's are held); whatever else it reserved is given back.

        Its place in the room shrinks to its compressed bytes, and each inflated piece is held in the budget
        as it is made (RESOURCE_EXHAUSTED when the budget has no room): a message waiting for the codec
        threads no longer keeps a place of the largest message. Eight addresses each sending gzip messages
        that took the threads 0.7 s to decode kept the room (four places of 64 MiB in the default budget)
        full while they waited, and other clients' calls were refused RESOURCE_EXHAUSTED."""
        compressed = len(message.raw)
        self.arriving.shrink(place, compressed)
        held = 0
        pieces: list[bytes] = []

        def counted(piece: bytes) -> None:
            nonlocal held
            if not self.budget.reserve(len(piece), whole=held + len(piece)):
                raise over_budget(self.budget.limit)
            held += len(piece)
            pieces.append(piece)

        kept = 0
        try:
            inflater = Inflater(message.encoding, "gRPC message")
            try:
                await inflate(inflater, message.raw, room, counted)
                made = held
                if made <= room:
                    inflater.finish()
            except InvalidInputError as e:
                pieces.clear()
                if message.encoding == "deflate":  # a protobuf message that only looked like zlib's header
                    if not await self.budget.reserve_within(compressed, BUDGET_WAIT_SECONDS, whole=held + compressed):
                        await ctx.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED, over_budget(self.budget.limit).message, _id(ctx)
                        )
                    held += compressed
                    kept = compressed
                    return compressed, message.read(message.raw)
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message, _id(ctx))
                raise AssertionError("abort raises") from None
            except ResourceExhaustedError as e:
                pieces.clear()
                await ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message, _id(ctx))
                raise AssertionError("abort raises") from None
            if made > room:
                pieces.clear()
                await ctx.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the {message.encoding} request message inflates to more than {room} bytes "
                    "(--grpc-max-message-bytes)",
                    _id(ctx),
                )
            try:
                raw = b"".join(pieces)
            except MemoryError:  # under the address-space cap (outside attack rt56: UNKNOWN, and a traceback logged)
                pieces.clear()
                await ctx.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, no_memory("to inflate this gRPC message").message, _id(ctx)
                )
                raise AssertionError("abort raises") from None
            pieces.clear()
            kept = len(raw)
            return kept, message.read(raw)
        finally:
            self.budget.release(held - kept)


@dataclass(frozen=True)
class _Compressed:
    """A request message its client compressed, as it arrived; ``read`` reads the inflated message as the
    method's handler reads one."""

    raw: bytes
    encoding: str
    read: Callable[[bytes], Any]


def _sized(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], tuple[int, Any]]:
    """grpc's deserializer of a method's request messages: each message's size on the wire, and the message
    as the method reads it, or, compressed by its client, the compressed bytes (inflated by ``_receive``)."""

    def read(raw: bytes) -> Any:
        return deserialize(raw) if deserialize is not None else raw

    def sized(raw: bytes) -> tuple[int, Any]:
        encoding = message_encoding(raw)
        if encoding is not None:
            return len(raw), _Compressed(raw, encoding, read)
        return len(raw), read(raw)

    return sized


def _id(ctx: grpc.aio.ServicerContext) -> tuple[tuple[str, str]]:
    """The metadata of a refusal: the client's request id when usable, else a new one (made only then)."""
    given = (v for k, v in ctx.invocation_metadata() or () if k == context.REQUEST_ID_METADATA)
    return ((context.REQUEST_ID_METADATA, context.accept_request_id(next(given, None))),)
