"""The gRPC port's front: every gRPC connection's header blocks checked before grpc-core parses them.

grpc-core decodes every field of a call's header block (HPACK) before any handler or limit of ours runs,
and HPACK lets a client name a 4 KB field already in the compression table with one byte: a 7.6 KB block
of 4,000 such references is 16 MB for grpc-core to decode, about 10 ms of its CPU, and eight connections
sending such blocks back to back kept both cores of a 2-core box busy and other clients' gRPC calls
waiting past 10 s (outside attack rt33). No grpcio option bounds that work, so grpc-core no longer
listens on the gRPC port: this front does, and hands each connection's bytes on to grpc-core over a
private Unix socket, in both directions, unchanged but for one field it adds at the end of each call's
header block (the call's name in grpc-core's queue, which the front counts and bounds:
:mod:`onnxserve.server.core_queue`; past its bound a new call waits in the front), each header block going
on in one frame.

What the front looks at is the client's side of the HTTP/2 connection, frame by frame (its 9-byte headers;
payloads pass through): a header block (HEADERS and its CONTINUATION frames) is held until it is whole, then
decoded with the ``hpack`` library's decoder, which follows the connection's compression table, and passed on
only if it has at most ``MAX_HEADER_FIELDS`` fields, at most ``MAX_HEADER_LIST_BYTES`` decoded (counted as
HTTP/2 counts a header list: name, value and 32 bytes a field; under grpc-core's own hard limit) and at most
``MAX_HEADER_BLOCK_BYTES`` encoded. A block past these, one that does not decode, frames that break the order of
a header block, or a connection that does not start with HTTP/2's preface, close the connection at once: the
compression table is shared by the connection's calls, so a block cannot be dropped alone. grpc-core itself
refuses (RESOURCE_EXHAUSTED) a call whose header list reaches that limit once the client has acknowledged its
SETTINGS (before, it serves it), so the front's bounds only meet what no gRPC call should get through. A padded
HEADERS frame is refused too: grpc-core reads its padding as header fields. The checks take at most half of the
event loop's time (:class:`CheckShare`): past it, connections with bytes to check wait their turn, and one turn
checks at most ``DECODE_SLICE_BYTES`` of a connection's header blocks. A connection is also closed when it keeps
twice grpc-core's stream limit open after acknowledging it (``OVER_LIMIT``; ``EARLY_STREAMS`` before), sends
PINGs faster than ``PING_RATE`` after ``PING_BURST``, sends a header frame over ``MAX_HEADER_FRAME_BYTES``, or
leaves a header block unfinished past ``--header-timeout``.

The front holds the connection cap (``--grpc-max-connections``): it follows each connection's calls (opened by
the client's HEADERS, ended by grpc-core's END_STREAM or either side's RST_STREAM) and their flow-control
windows (:class:`onnxserve.server.grpc_calls.Calls`, from the frame headers of both sides and the client's
SETTINGS and WINDOW_UPDATE frames), and when a new connection would pass the cap, a connection that waits for
its client is closed to make room (:meth:`_Listener.make_room`): idle (no call open), sending (every call
waiting for its client's next request message) or stalled (every call's answer waiting for the client to read
it), the one longest so, from the client address holding the most connections when it holds at least two more
than the newcomer's (as on the HTTP port), else, idle or stalled, of the addresses holding at least as many as
the newcomer's; a connection with a call that runs is never closed for room, and when none can be, the
newcomer is closed. A connection stalled for ``--body-timeout`` is closed. The calls a client leaves
unanswered (reset, or left open when its connection goes, before grpc-core began to answer them) are counted
per address (:class:`onnxserve.server.abandoned_calls.AbandonedCalls`): past its budget, the address's new
connections are refused and a connection of its that leaves more is closed. grpc-core refused every connection
past its cap and closed an idle one only after ``--grpc-max-connection-idle`` (300 s), so 10,000 idle
connections locked gRPC callers out. The rest is grpc-core's, unchanged: its handshake timeout, stream limits,
keepalive and idle rules apply to the connection it gets from the front, one for each of the clients'. Over
TLS (``--tls-cert``) the front ends TLS (HTTP/2 by ALPN, client certificates when ``--tls-client-ca`` asks for
them) and grpc-core gets the decrypted bytes. grpc-core sees each connection as coming from a Unix socket
named for it (``unix-abstract:onnxserve-grpc-...``); :func:`onnxserve.protocols.context.grpc_peer_host`
answers the client's own address for that name (:func:`register_peer`), so per-client fairness and logs see
the client, not the front.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import itertools
import logging
import os
import secrets
import shutil
import socket
import ssl
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import hpack
import hpack.exceptions

from onnxserve.core.fairness import gives_way
from onnxserve.core.memory import give_back_memory_later
from onnxserve.log_throttle import LogThrottles
from onnxserve.protocols import context
from onnxserve.protocols.v2_grpc.servicer import SERVICE_NAME
from onnxserve.server.abandoned_calls import ADDRESS_CALLS, AbandonedCalls
from onnxserve.server.abandoned_calls import RATE as ABANDONED_RATE
from onnxserve.server.auth import OPEN_GRPC_METHODS
from onnxserve.server.connection_index import Counts
from onnxserve.server.connections import GRPC_METADATA_HARD_BYTES, TRIM_AFTER_CUT_SECONDS
from onnxserve.server.core_queue import CALL_FIELD, CoreQueue, Waiter, call_field
from onnxserve.server.grpc_calls import Calls, Messages
from onnxserve.server.listen import BACKLOG
from onnxserve.server.tls_layer import wrap_tls

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What every HTTP/2 client sends first (RFC 9113, 3.4)."""

MAX_HEADER_FIELDS = 100
"""The most fields in one header block (the HTTP port's limit too; Envoy's default ``max_headers_count``)."""

CALL_FIELD_BYTES = len(CALL_FIELD) + 20 + 32
"""What the field the front adds to each call's header block (``core_queue.CALL_FIELD``) counts, at most, in the
header list grpc-core sees."""

MAX_HEADER_LIST_BYTES = GRPC_METADATA_HARD_BYTES - 1 - CALL_FIELD_BYTES
"""The largest header list a block may decode to (name + value + 32 bytes per field): with the front's own field
added, just under grpc-core's hard limit, at which it refuses the call (RESOURCE_EXHAUSTED: "16384 vs. 16384")
when it sees the block whole (a bound of the limit itself let such lists through: outside attack rt46). At
twice that, the front passed blocks grpc-core would refuse, and under a flood of them grpc-core, reading each
in pieces, handed the calls to the handler with their fields cut at its limit: 3,400 calls in 17 s queued ahead of
other clients' (outside attack rt42 F1, repeated: a fresh channel's call waited 20 to 25 s, or was answered
CANCELLED when grpc-core's queue of calls not yet taken was full)."""

MAX_HEADER_BLOCK_BYTES = 32 * 1024
"""The most encoded bytes in one header block, its HEADERS and CONTINUATION frames together."""

MAX_HEADER_FRAME_BYTES = 16 * 1024
"""The largest HEADERS or CONTINUATION frame: HTTP/2's default frame size limit, which grpc-core keeps (its
SETTINGS name no other), so a larger one is grpc-core's FRAME_SIZE_ERROR anyway; the front holds a header
frame until it is whole, and a larger bound let each connection hold more (outside attack rt38)."""

DECODE_SLICE_BYTES = 4 * 1024
"""Encoded header bytes decoded in one turn of a connection (:class:`CheckShare`; a block is decoded whole,
so a turn decodes at least one); the rest waits for its next turn. The decoder takes 0.25 to 1.1 µs a byte:
about 1 to 5 ms a turn (a block of 16 KiB, up to 18 ms), which a cheap turn placed after it waits for
(30 flooding connections, queued first come first served: ServerReady on a fresh channel at most 0.46 s,
where 16 KiB turns gave 1.1 s)."""

FRAMES_PER_TURN = 64
"""Frames looked at in one turn of a connection (:class:`CheckShare`), a few tenths of a µs each outside header
blocks (a read of 256 KiB of empty frames is 29,000 of them); as many as :meth:`ClientFrames.pending_cost` looks
at, so that a turn's expected cost sees all it will decode (when the turn took 1,024 frames and its cost looked
at 64, a 16 KB block behind 64 WINDOW_UPDATE frames went in as one of 0.5 ms: 900 such connections held a
fresh channel's call 6.4 s, outside attack rt42)."""

HEADER_BYTE_SECONDS = 1.2e-6
FRAME_SECONDS = 0.5e-6
"""What a turn is expected to cost, for its place in the queue (:meth:`ClientFrames.pending_cost`): a byte of a
header block to decode (the decoder's slowest), a frame to look at."""

MAX_SETTINGS_BYTES = 600
"""The largest SETTINGS frame: 100 parameters, where HTTP/2 names 6 and a client sends each once. Each is read
(for the initial flow-control window), and a frame of 16 KiB, 2,730 of them, cost a turn far more than its
frame headers said."""

MAX_TABLE_SIZE = 4096
"""The largest compression table a client may ask for: HTTP/2's default, which grpc-core keeps (its SETTINGS
name no other). A client that asks for more is refused here, as grpc-core would refuse it."""

WRITE_PIECE = 64 * 1024
"""Bytes handed to a TLS connection's transport in one write (it encrypts each write whole into a buffer
that keeps its size: ``onnxserve.server.connections``, TLS_WRITE_PIECE)."""

HELD_HIGH_WATER = 256 * 1024
"""Checked bytes a connection may have waiting for its connection to grpc-core before the front stops
reading it."""

SENDING_TIMEOUTS = 2
"""A connection whose calls all wait for their requests is cut after this many times ``--body-timeout``."""

CLOSING_SECONDS = 2.0
"""How long a connection that grpc-core closed has to take what grpc-core wrote last before it is cut;
over TLS, also how long its close_notify may take."""

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8, 0x9
READ_WHOLE = {HEADERS: "header", CONTINUATION: "header", SETTINGS: "SETTINGS", WINDOW_UPDATE: "WINDOW_UPDATE"}
"""The client's frames the front holds until they are whole, to read their payload (and what a log line calls
them): header blocks, and the frames that set grpc-core's flow-control windows
(:class:`onnxserve.server.grpc_calls.Calls`)."""
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20

DEFAULT_MAX_STREAMS = 100
"""grpc-core's stream limit unless told (``--grpc-max-concurrent-streams``)."""

OVER_LIMIT = 2
"""How many times grpc-core's stream limit a connection may have open (the excess refused by grpc-core)
before it is closed."""

EARLY_STREAMS = 1000
"""Calls a connection may have open before it acknowledges the server's SETTINGS, which name the stream
limit: until then HTTP/2 sets none, and an honest client's first burst may pass the limit once."""

PING_BURST = 1000
PING_RATE = 100
"""PINGs a connection may send at once, and a second after: grpc clients send a keepalive PING at most every
10 s (grpc-core closes a connection that pings more often without calls) and a bandwidth-probing PING at
most once a round trip while an answer flows. A PING flood cost grpc-core both cores, each PING answered
before its GOAWAY for too many (outside attack rt38: other clients' calls waited up to 5.4 s)."""
FRAME_HEADER = 9


def abandoned_reason(budget: AbandonedCalls) -> str:
    """Why an address's connection is closed, or refused, for the calls it abandons (``abandoned_calls``)."""
    return (
        f"left more than {budget.rate:,.0f} calls a second unanswered (after {budget.burst:,.0f} at once), reset or "
        "with their connections closed: they wait in grpc-core's queue and crowd out other clients' calls "
        "(--grpc-max-abandoned-calls)"
    )


class Refused(Exception):
    """Why a connection is closed: a header block past the bounds, or HTTP/2 the front cannot follow.
    ``kind`` (default: the message) names the refusal for the log's throttle, without any number a
    client chooses."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = message if kind is None else kind


PROBE_PATHS = frozenset(f"/{SERVICE_NAME}/{method}".encode() for method in OPEN_GRPC_METHODS)
"""The health calls (ServerLive, ServerReady) that may pass calls waiting in the front for room in grpc-core's
queue (``core_queue.PROBE_ROOM``)."""


class _NewCall(NamedTuple):
    """A new call whose header block is whole, waiting in the front for room in grpc-core's queue."""

    stream: int
    block: bytes
    head: tuple[int, bytes]  # its HEADERS frame's flags that go on, its priority fields
    timeout: float | None
    queued: bool  # whether grpc-core queues it (:func:`queued`)
    probe: bool  # a health call (``PROBE_PATHS``)


class _FrameWalk:
    """What both sides' frame readers share: the payload of a frame being passed on, still to come."""

    def __init__(self) -> None:
        self._skip = 0  # payload bytes of a frame being passed on, still to come
        self._sink: Messages | None = None  # where they go: the gRPC messages of a call's DATA, followed

    def _pass_payload(self, view: memoryview, at: int, size: int) -> int:
        """Pass as much of the payload being skipped as lies in ``[at, size)`` of ``view``; the position
        after it."""
        taken = min(self._skip, size - at)
        self._skip -= taken
        if self._sink is not None:
            self._sink.take(view[at : at + taken])
            if not self._skip:
                self._sink = None
        return at + taken


class ClientFrames(_FrameWalk):
    """The client's side of one HTTP/2 connection, checked: :meth:`feed` bytes as they arrive, and get how
    many of them (from the start of what it was given, its held bytes first) may be handed on now."""

    def __init__(
        self, streams: Calls | None = None, max_streams: int = DEFAULT_MAX_STREAMS, queue: CoreQueue | None = None
    ) -> None:
        self.streams = Calls() if streams is None else streams
        """The calls open on the connection: opened by the client's HEADERS, ended by its RST_STREAM here
        and by grpc-core's END_STREAM or RST_STREAM (:class:`ServerFrames`); and their windows."""
        self._max_streams = max_streams  # grpc-core's SETTINGS_MAX_CONCURRENT_STREAMS
        self._acknowledged = False  # whether the client acknowledged grpc-core's SETTINGS (and so its limit)
        self._pings = float(PING_BURST)  # a token bucket of the client's PINGs
        self._pinged = time.monotonic()
        super().__init__()
        self._preface = True
        self._newest = 0  # the newest stream the client opened (HTTP/2 stream ids only grow)
        self._held = b""  # bytes read and not handed on: a partial frame header or header frame, or a slice's rest
        self._block: list[bytes] = []  # the fragments of the header block being received
        self._block_stream = 0  # its stream (0: none)
        self._block_bytes = 0
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_BYTES)
        self._decoder.max_allowed_table_size = MAX_TABLE_SIZE
        self._same_block: bytes | None = None  # the last block checked, if it left the table as it was
        self._same_table: tuple[int, int, object] = (0, 0, None)
        self._same_timeout: float | None = None
        self._same_queued = False
        self._same_probe = False
        self.abandoned = 0
        """Calls the client reset before grpc-core began to answer them (taken by the connection)."""
        self.queue = queue
        """grpc-core's queue of calls, as the front counts it (:mod:`onnxserve.server.core_queue`): each new call
        is named in it and waits for room (None: calls are neither named nor held)."""
        self.host = ""  # the client's address, for the queue
        self.waiter: Waiter | None = None  # its connection, for the queue
        self.names: dict[int, int] = {}  # the queue's name of each call handed on, by stream
        self._block_new = False  # the header block being received opens a call
        self._block_head: tuple[int, bytes] = (0, b"")  # its HEADERS frame's flags that go on, its priority fields
        self._parked: _NewCall | None = None  # a new call whose block is whole, waiting for room in the queue
        self.full = False
        """The last :meth:`feed` stopped at a new call: no room for it in grpc-core's queue (it waits, decoded,
        with what follows it)."""

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def unfinished(self) -> str | None:
        """What has begun and is not whole yet: "a header block" (its frames, or a frame, still coming) or
        another frame read whole ("a SETTINGS frame"); None if nothing."""
        held = self._held
        if self._block_stream:
            return "a header block"
        if self._skip or self._preface or len(held) < 4 or held[3] not in READ_WHOLE:
            return None
        name = READ_WHOLE[held[3]]
        return "a header block" if name == "header" else f"a {name} frame"

    def hold(self, data: bytes) -> None:
        """Keep ``data`` to be looked at later (``feed(b"")``), after what is held."""
        self._held += data

    def pending_cost(self) -> float:
        """The seconds the next ``feed(b"")`` is expected to take on what is held: the header blocks it will
        decode (those whose last frame is whole, their earlier frames included, within a slice as
        :meth:`feed` takes them) and its frames, up to ``FRAMES_PER_TURN`` as :meth:`feed` takes them. Frame
        headers only: a few µs."""
        held = self._held
        size = len(held)
        at = len(PREFACE) if self._preface else min(self._skip, size)
        block = self._block_bytes if self._block_stream else 0  # the block begun in earlier turns
        sliced = 0  # header frame bytes taken, as :meth:`feed` counts them against the slice
        decoded = 0
        frames = 0
        while size - at >= FRAME_HEADER:
            if frames == FRAMES_PER_TURN:
                break
            length = int.from_bytes(held[at : at + 3], "big")
            frames += 1
            if held[at + 3] in (HEADERS, CONTINUATION):
                if size - at < FRAME_HEADER + length or sliced >= DECODE_SLICE_BYTES:
                    break  # a frame that waits for its rest, or for the next turn
                sliced += length
                block += length
                if held[at + 4] & END_HEADERS:
                    decoded += block
                    block = 0
            at += FRAME_HEADER + length
        return decoded * HEADER_BYTE_SECONDS + frames * FRAME_SECONDS

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """What may be handed on now of the bytes held and ``data``, and whether bytes remain to be looked
        at without waiting for more (the slice of decoding was used up: call ``feed(b"")`` at the next
        turn). Raises :class:`Refused`."""
        work = self._held + data if self._held else data
        size = len(work)
        at = 0
        if self._preface:
            known = min(size, len(PREFACE))
            if work[:known] != PREFACE[:known]:
                raise Refused("it did not start with the HTTP/2 connection preface")
            if size < len(PREFACE):
                self._held = work
                return b"", False
            self._preface = False
            at = len(PREFACE)
        view = memoryview(work)
        decoded = 0
        frames = 0
        more = False
        self.full = False
        pieces: list[bytes] = []  # what is handed on, where the front added a field to a block
        start = 0  # the first byte of ``work`` to hand on not yet in ``pieces``
        if self._parked is not None:  # a new call waited for room: it goes on first, or still waits
            released = self._release()
            if released is None:
                self.full = True
                self._held = work
                return b"", False
            pieces.append(released)
        while at < size:
            if self._skip:
                at = self._pass_payload(view, at, size)
                continue
            if size - at < FRAME_HEADER:
                break
            if frames == FRAMES_PER_TURN:
                more = True
                break
            frames += 1
            length = int.from_bytes(work[at : at + 3], "big")
            kind, flags = work[at + 3], work[at + 4]
            stream = int.from_bytes(work[at + 5 : at + 9], "big") & 0x7FFFFFFF
            if kind in READ_WHOLE:
                if length > MAX_HEADER_FRAME_BYTES:
                    raise Refused(
                        f"a {READ_WHOLE[kind]} frame of {length:,} bytes (at most {MAX_HEADER_FRAME_BYTES:,})",
                        "frame size",
                    )
                if kind == SETTINGS and length > MAX_SETTINGS_BYTES:
                    raise Refused(
                        f"a SETTINGS frame of {length:,} bytes (at most {MAX_SETTINGS_BYTES:,}: HTTP/2 names 6)",
                        "frame size",
                    )
                if size - at < FRAME_HEADER + length:
                    break
                if kind in (SETTINGS, WINDOW_UPDATE):
                    if self._block_stream:
                        raise Refused("a frame other than CONTINUATION inside a header block")
                    self._flow_frame(kind, flags, stream, work[at + FRAME_HEADER : at + FRAME_HEADER + length])
                    at += FRAME_HEADER + length
                    continue
                if decoded >= DECODE_SLICE_BYTES:
                    more = True
                    break
                decoded += length
                block = self._header_frame(kind, flags, stream, work[at + FRAME_HEADER : at + FRAME_HEADER + length])
                if self.queue is not None:  # header frames go on made anew, once their block is whole
                    pieces.append(work[start:at])
                    start = at + FRAME_HEADER + length
                    if block is not None:
                        pieces.append(block)
                at += FRAME_HEADER + length
                if self._parked is not None:
                    self.full = True  # a new call, and no room for it: it waits, and what follows it
                    break
            else:
                if self._block_stream:
                    raise Refused("a frame other than CONTINUATION inside a header block")
                if kind == DATA:
                    if length:
                        self._sink = self.streams.client_data(stream, bool(flags & PADDED))
                    if flags & END_STREAM:
                        self.streams.client_ended(stream)
                elif kind == RST_STREAM:
                    self.abandoned += self.streams.unanswered(stream)
                    self.streams.end(stream)
                elif kind == PING and not flags & ACK:
                    self._ping()
                at += FRAME_HEADER
                self._skip = length
        self._held = work[at:]
        if pieces:
            pieces.append(work[start:at])
            return b"".join(pieces), more
        return (work[:at] if at < size else work), more

    def _name(self, stream: int, name: int) -> None:
        """Keep ``stream``'s name in the queue (the names of calls no longer counted there forgotten now and
        then)."""
        names = self.names
        names[stream] = name
        if len(names) > 2 * self._max_streams + 16 and self.queue is not None:
            queued = self.queue.queued
            self.names = {s: n for s, n in names.items() if queued(n)}

    def _header_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> bytes | None:
        """Take a header frame. With grpc-core's queue followed, the frames its block goes on in once it is
        whole (:meth:`_made_anew`; None before); else None."""
        if kind == HEADERS:
            if self._block_stream:
                raise Refused("a HEADERS frame inside another header block")
            if stream == 0:
                raise Refused("a HEADERS frame on stream 0")
            if flags & PADDED:
                # grpc-core reads a HEADERS frame's padding as header fields (outside attack rt38: a block
                # seen here as one field reached it as 30,000), and no gRPC client pads
                raise Refused("a padded HEADERS frame (gRPC clients do not pad header blocks)")
            start = 5 if flags & PRIORITY else 0
            if len(payload) < start:
                raise Refused("a HEADERS frame shorter than its priority fields")
            fragment = payload[start:]
            if stream % 2 == 0:
                # a client opens odd streams only (RFC 9113, 5.1.1); grpc-core ignores a HEADERS frame on an
                # even one without a word, so such a "call" was open for good here, never answered: connections
                # holding one were busy, never closed for room nor cut (outside attack rt44: every newcomer
                # locked out, with 60 bytes a connection)
                raise Refused("a HEADERS frame on an even stream id (a client opens odd ones)", "even stream")
            self._block_new = stream > self._newest
            if self._block_new:  # a new call (a lower id is trailers, or a stream that has ended)
                self._open(stream)
                if self.queue is None:  # else once it goes on (:meth:`_release`): one that waits is not open yet
                    self.streams.open(stream)
            if flags & END_STREAM:
                self.streams.client_ended(stream)
            self._block_stream = stream
            self._block_bytes = 0
            self._block_head = (flags & (END_STREAM | PRIORITY), payload[:start])
        else:
            if self._block_stream != stream or stream == 0:
                raise Refused("a CONTINUATION frame outside its header block")
            fragment = payload
        self._block_bytes += len(fragment)
        if self._block_bytes > MAX_HEADER_BLOCK_BYTES:
            raise Refused(f"a header block of more than {MAX_HEADER_BLOCK_BYTES:,} bytes", "header block size")
        self._block.append(fragment)
        if flags & END_HEADERS:
            block = b"".join(self._block)
            self._block.clear()
            self._block_stream = 0
            timeout, queued, probe = self._check_block(block)
            if self.queue is not None and self._block_new:
                self._parked = _NewCall(stream, block, self._block_head, timeout, queued, probe)
                return self._release()
            if timeout is not None:
                self.streams.deadline(stream, timeout)
            if self.queue is not None:
                return self._made_anew(stream, block, self._block_head)
        return None

    def _release(self) -> bytes | None:
        """The waiting new call's frames if there is room for it in grpc-core's queue now (the front decides
        once its block is whole, knowing its method: a health probe passes calls that wait), named at the end
        of its block (``CALL_FIELD``), counted if grpc-core queues it; None if it waits on. It is open from
        here (a client that goes while its call waits left nothing in grpc-core's queue: not an abandoned call),
        and its deadline begins here, as grpc-core's does when it gets the block."""
        call, queue = self._parked, self.queue
        assert call is not None
        assert queue is not None
        if not queue.admits(self.host, self.waiter, call.probe):
            return None
        self._parked = None
        name = queue.handed_on(self.host, counted=call.queued, probe=call.probe)
        if call.queued:
            self._name(call.stream, name)
        self.streams.open(call.stream)  # a call that waited in the front and went nowhere was never open
        if call.head[0] & END_STREAM:
            self.streams.client_ended(call.stream)
        if call.timeout is not None:
            self.streams.deadline(call.stream, call.timeout)
        return self._made_anew(call.stream, call.block + call_field(name), call.head)

    @staticmethod
    def _made_anew(stream: int, block: bytes, head: tuple[int, bytes]) -> bytes:
        """The frames a whole header block goes on in: one HEADERS frame (``head``: its flags and priority
        fields as the client sent them), as many CONTINUATION frames as it takes past HTTP/2's 16 KiB. A new
        call's block ends with its name (:meth:`_release`). In the block's one frame: grpc-core drops the
        fields of the frames that follow one with a field it refuses (an upper-case name, a ``-bin`` value
        not base64, ``grpc-encoding: bogus``) and still queues the call; named in a frame of its own, such
        calls were taken unnamed and stayed counted, holding other clients' calls (outside attack rt50: 17 to
        22 of 60 probes past 5 s)."""
        flags, priority = head
        payload = priority + block
        stream_id = stream.to_bytes(4, "big")
        frames = []
        kind = HEADERS
        for at in range(0, max(len(payload), 1), MAX_HEADER_FRAME_BYTES):
            piece = payload[at : at + MAX_HEADER_FRAME_BYTES]
            last = at + MAX_HEADER_FRAME_BYTES >= len(payload)
            frames.append(
                len(piece).to_bytes(3, "big")
                + bytes([kind, (flags if kind == HEADERS else 0) | (END_HEADERS if last else 0)])
                + stream_id
                + piece
            )
            kind = CONTINUATION
        return b"".join(frames)

    def _flow_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == WINDOW_UPDATE:
            self.streams.client_window_update(stream, payload)
        elif flags & ACK:
            self._acknowledged = True
        else:
            self.streams.client_settings(payload)

    def _open(self, stream: int) -> None:
        """A new call on ``stream``, the newest (opened in ``streams`` once it goes on); the connection is
        closed when it would have twice grpc-core's stream limit open once the client has acknowledged that
        limit (before, ``EARLY_STREAMS``). grpc-core refuses the calls past its limit itself (REFUSED_STREAM),
        for a few µs each, and an honest client never opens them; a client that opens them back to back is
        not one: a flood of them held other clients' calls (outside attack rt38)."""
        limit = OVER_LIMIT * self._max_streams if self._acknowledged else max(self._max_streams, EARLY_STREAMS)
        if len(self.streams) >= limit:
            raise Refused(
                f"{limit} calls open at once (the server allows {self._max_streams}: SETTINGS_MAX_CONCURRENT_STREAMS)",
                "stream limit",
            )
        self._newest = stream

    def _ping(self) -> None:
        now = time.monotonic()
        self._pings = min(float(PING_BURST), self._pings + (now - self._pinged) * PING_RATE)
        self._pinged = now
        if self._pings < 1:
            raise Refused(f"PINGs faster than {PING_RATE} a second (after {PING_BURST} at once)", "pings")
        self._pings -= 1

    def _table(self) -> tuple[int, int, object]:
        """What tells the compression table's states apart: its size limit, its entries, its newest entry
        (held, so that no other entry can later have its identity)."""
        table = self._decoder.header_table
        entries = table.dynamic_entries
        return table.maxsize, len(entries), entries[0] if entries else None

    def _check_block(self, block: bytes) -> tuple[float | None, bool, bool]:
        """Decode ``block`` and refuse it past the bounds; its ``grpc-timeout`` in seconds (None: none),
        whether grpc-core queues a call it opens (:func:`queued`), and whether that is a health probe
        (``PROBE_PATHS``). A block the same as the last one checked,
        decoded from the same table it left as it was (a client's next call with the same headers, every
        field in the table), decodes the same: it is not decoded again."""
        table = self._table()
        if block == self._same_block and _same_table(table, self._same_table):
            return self._same_timeout, self._same_queued, self._same_probe
        try:
            fields = list(self._decoder.decode(block, raw=True))
        except hpack.exceptions.OversizedHeaderListError:
            raise Refused(
                f"a header list of more than {MAX_HEADER_LIST_BYTES:,} bytes decoded", "header list size"
            ) from None
        except (hpack.exceptions.HPACKError, IndexError, ValueError) as e:
            raise Refused(f"a header block that does not decode ({type(e).__name__})", "undecodable") from None
        if len(fields) > MAX_HEADER_FIELDS:
            raise Refused(f"a header block of {len(fields):,} fields (at most {MAX_HEADER_FIELDS})", "header fields")
        timeout = None
        paths = []
        for name, value in fields:
            if name == b"grpc-timeout":  # grpc-core keeps the last (outside attack rt49: "1H" then "1m")
                timeout = grpc_timeout(value)
            elif name == b":path":
                paths.append(value)
        queues = queued(fields)
        probe = len(paths) == 1 and paths[0] in PROBE_PATHS  # given twice: not known which grpc-core keeps
        if _same_table(self._table(), table):
            self._same_block, self._same_table = block, table
            self._same_timeout, self._same_queued, self._same_probe = timeout, queues, probe
        else:
            self._same_block = None
        return timeout, queues, probe


TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
"""gRPC's ``grpc-timeout`` units (the gRPC over HTTP/2 protocol: at most 8 digits and one of these)."""

NO_DEADLINE_DIGITS = 12
"""A ``grpc-timeout`` of more significant digits than this is decades in any unit: no deadline to follow."""


def grpc_timeout(value: bytes | str) -> float | None:
    """A ``grpc-timeout`` value in seconds, read as leniently as grpc-core reads it (spaces anywhere, any
    number of digits: outside attack rt49 sent ``" 1m"`` and ``000000001m``, which grpc-core honoured and a
    strict reading missed); 0.0 for one that is not a timeout at all (its call counts as past its deadline
    whenever grpc-core ends it unanswered); None for a deadline too far off to matter."""
    raw = (value.encode("latin-1") if isinstance(value, str) else bytes(value)).replace(b" ", b"").replace(b"\t", b"")
    digits, unit = raw[:-1].lstrip(b"0") or b"0", raw[-1:]
    if not raw[:-1].isdigit() or unit not in TIMEOUT_UNITS:
        return 0.0
    if len(digits) > NO_DEADLINE_DIGITS:
        return None
    return int(digits) * TIMEOUT_UNITS[unit]


QUEUED_FIELDS = {b":method": {b"POST"}, b"te": {b"trailers"}, b":scheme": {b"http", b"https"}}
"""Fields grpc-core requires of a call, with the values it accepts, before it queues the call (else it resets
it or answers it at once, unseen by the application; grpcio 1.85, tried field by field). Of a field given more
than once the last counts, but every ``te`` must be ``trailers`` (grpc-core refuses a bad one among good ones:
outside attack rt51)."""


def queued(fields: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether grpc-core queues a call with these header ``fields`` for the application: ``QUEUED_FIELDS``
    right, a ``:path``, and an ``:authority`` or a ``host``. A call it refuses unqueued is not counted in its
    queue (``core_queue``): counted, a client sending such calls filled the count with calls that were never
    there."""
    seen: dict[bytes, bytes] = {}
    for name, value in fields:
        if name == b"te" and seen.get(name, b"trailers") != b"trailers":
            continue  # a bad one stays
        seen[name] = value
    return (
        all(seen.get(name) in values for name, values in QUEUED_FIELDS.items())
        and b":path" in seen
        and (b":authority" in seen or b"host" in seen)
    )


def _same_table(a: tuple[int, int, object], b: tuple[int, int, object]) -> bool:
    """Whether two looks at a compression table (``ClientFrames._table``) saw the same table: the same size
    limit and number of entries, and the same newest entry object. Compared by identity: an entry added
    again with the same name and value is a new entry (it evicts another), and compared by value the
    front took a block that did so for one that left the table as it was, and its table and grpc-core's
    parted (outside attack rt40)."""
    return a[0] == b[0] and a[1] == b[1] and a[2] is b[2]


class ServerFrames(_FrameWalk):
    """grpc-core's side of one connection, looked at for its answers: frame headers only, payloads skipped.
    A call's answer begins with grpc-core's HEADERS, its DATA take the client's windows, and the call ends
    with grpc-core's END_STREAM (its trailers) or an RST_STREAM."""

    def __init__(self, streams: Calls) -> None:
        super().__init__()
        self.streams = streams
        self._partial = b""  # a frame header cut by the end of a read

    def feed(self, data: bytes) -> None:
        work = self._partial + data if self._partial else data
        at, size = 0, len(work)
        view = memoryview(work)
        while at < size:
            if self._skip:
                at = self._pass_payload(view, at, size)
                continue
            if size - at < FRAME_HEADER:
                break
            length = int.from_bytes(work[at : at + 3], "big")
            kind, flags = work[at + 3], work[at + 4]
            if kind in (RST_STREAM, GOAWAY):  # read up to the error code, which counts
                needed = FRAME_HEADER + (4 if kind == RST_STREAM else 8)
                if length < needed - FRAME_HEADER:
                    pass  # grpc-core sends no such frame
                elif size - at < needed:
                    break
                elif kind == RST_STREAM:
                    stream = int.from_bytes(work[at + 5 : at + 9], "big") & 0x7FFFFFFF
                    self.streams.server_reset(stream, int.from_bytes(work[at + 9 : at + 13], "big"))
                else:
                    self.streams.server_goaway(int.from_bytes(work[at + 9 : at + 13], "big") & 0x7FFFFFFF)
            elif kind in (DATA, HEADERS):
                stream = int.from_bytes(work[at + 5 : at + 9], "big") & 0x7FFFFFFF
                if kind == DATA:
                    sink = self.streams.server_data(stream, length)
                    self._sink = sink if length and not flags & PADDED else None
                else:
                    self.streams.server_headers(stream, bool(flags & END_STREAM))
            self._skip = length
            at += FRAME_HEADER
        self._partial = work[at:] if at < size else b""


NAME_PREFIX = "onnxserve-grpc-"
NAME_TRIES = 4


def _named_socket() -> tuple[socket.socket, str]:
    """A Unix socket bound to an abstract name of 96 random bits, and that name (grpc-core's peer name for
    the connection). Abstract names have no permissions, and the bound ones are listed for every user in
    /proc/net/unix: names a local user could guess (a process id and a counter) let one bind the next
    ones first and shut every client out (outside attack rt39). A name taken meanwhile is drawn again."""
    for _ in range(NAME_TRIES):
        name = NAME_PREFIX + secrets.token_hex(12)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return sock, name
    raise OSError(errno.EADDRINUSE, f"{NAME_TRIES} random socket names were all taken")


class _Backend(asyncio.Protocol):
    """The front's connection to grpc-core for one client connection."""

    def __init__(self, client: FrontConnection) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.answer(data)

    def eof_received(self) -> bool:
        return False  # grpc-core closed: so does the client's connection, once its answers are written

    def pause_writing(self) -> None:
        self.client.pause_client()

    def resume_writing(self) -> None:
        self.client.resume_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_lost()


class CheckShare:
    """The share of the event loop the front's frame checks may take, and who checks next.

    Checking costs the event loop's thread: decoding a header block, a few microseconds a field. Without
    a bound, connections sending a flood of small calls past their stream limit (each refused by grpc-core,
    for a few microseconds of its own) kept the loop busy decoding them, and the calls of other clients,
    whose handlers run on the same loop, waited for the whole flood (outside attack rt38: ServerReady on a
    fresh channel 9.6 s in a 10 s flood). The checks may take ``SHARE`` of the loop's time (a token bucket
    of seconds, at most ``BURST`` saved); past it, a connection with bytes to check stops being read and
    waits its turn: a turn is one connection's read, or a slice of it (``DECODE_SLICE_BYTES`` of header
    blocks, ``FRAMES_PER_TURN`` frames).

    Turns go by fair queuing on the check time each connection has used: a connection starts its turn at
    the virtual time its last turn ended at (or now, if that is past) and is expected to end it that turn's
    cost later (:meth:`ClientFrames.pending_cost`, from the frames it holds); the smallest expected end
    goes first, the virtual time moves to the start of the turn given, and the connection's own time
    moves on by what its turn took. So a connection that has used little (a new one, a probe, a client of
    small calls) goes ahead of those that used much, and a cheap turn ahead of a dear one. In first-come
    order, 900 connections each with a few 28 KB blocks queued made a new connection's preface wait past
    grpc-core's 10 s handshake deadline (outside attack rt40); ordered by start alone, a fresh channel's
    second flight (its call, after the server's SETTINGS) waited for a turn of each of the hundreds whose
    start was as small, each decoding a whole block: 4 to 13 s."""

    SHARE = 0.5
    BURST = 0.02
    TURNS_SECONDS = 0.002
    """Turns are given several to a pass of the event loop, up to this long: one a pass, cheap turns (a
    probe's call, a partial frame) went at the loop's pace, a few ms a pass under load, and a fresh
    channel's call waited 4 s behind 500 of them."""

    def __init__(self) -> None:
        self._tokens = self.BURST
        self._updated = time.perf_counter()
        self._queue: list[tuple[float, int, float, FrontConnection]] = []  # a heap by expected virtual end
        self._order = itertools.count()  # ties: first come first
        self._now = 0.0  # the virtual time: the latest start of a turn given
        self._handle: asyncio.Handle | None = None

    def _refill(self) -> None:
        now = time.perf_counter()
        self._tokens = min(self.BURST, self._tokens + (now - self._updated) * self.SHARE)
        self._updated = now

    def may_check(self) -> bool:
        """Whether a connection may check its bytes now (else it waits its turn with those waiting)."""
        if self._queue:
            return False
        self._refill()
        return self._tokens > 0

    def spend(self, connection: FrontConnection, seconds: float, turn: bool) -> None:
        """``connection`` checked for ``seconds``: in its ``turn`` (its virtual time moves on by that), or
        at once, nobody waiting (no debt)."""
        self._tokens -= seconds
        connection.checked_until = (connection.checked_until + seconds) if turn else self._now

    def wait(self, connection: FrontConnection, cost: float) -> None:
        """Queue ``connection`` for a turn expected to take ``cost`` seconds."""
        start = max(self._now, connection.checked_until)
        connection.checked_until = start
        heapq.heappush(self._queue, (start + cost, next(self._order), start, connection))
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None or not self._queue:
            return
        self._refill()
        delay = 0.0 if self._tokens > 0 else -self._tokens / self.SHARE
        self._handle = asyncio.get_running_loop().call_later(delay, self._turn)

    def _turn(self) -> None:
        """Give turns, in order, while the share lasts, for at most ``TURNS_SECONDS`` of this pass of the loop."""
        self._handle = None
        until = time.perf_counter() + self.TURNS_SECONDS
        while self._queue:
            self._refill()
            if self._tokens <= 0:
                break
            _, _, start, connection = heapq.heappop(self._queue)
            self._now = max(self._now, start)
            connection.take_turn()  # it may wait again, at its new virtual time
            if time.perf_counter() >= until:
                break
        self._schedule()


IDLE, SENDING, STALLED, BUSY = "idle", "sending", "stalled", "busy"
"""What a connection is doing (:meth:`FrontConnection._look`): no call open; every open call waiting for its
client's next request message (``Calls.sending``: a unary call's message still coming, a stream between two
messages); every open call waiting for its client to read its answer (``Calls.stalled``, or the front's
writes to the client paused); else busy."""


class _Waiting:
    """The connections in one state that may be closed for room, longest in it first, all and by address."""

    def __init__(self, order: Iterator[int]) -> None:
        self.all: dict[FrontConnection, int] = {}  # each with its place in the order it came in (``order``)
        self.by_address: dict[str, dict[FrontConnection, None]] = {}
        self._order = order

    def add(self, connection: FrontConnection) -> None:
        self.all[connection] = next(self._order)
        self.by_address.setdefault(connection.host, {})[connection] = None

    def discard(self, connection: FrontConnection) -> None:
        if self.all.pop(connection, None) is not None:
            by_address = self.by_address[connection.host]
            del by_address[connection]
            if not by_address:
                del self.by_address[connection.host]

    def first(self, host: str | None = None) -> FrontConnection | None:
        """The longest in this state (of ``host``'s connections, if given)."""
        return next(iter(self.all if host is None else self.by_address.get(host, {})), None)

    def first_of(self, hosts: Iterable[str]) -> FrontConnection | None:
        """The longest in this state of the connections of ``hosts``."""
        firsts = (self.first(host) for host in hosts)
        return min((c for c in firsts if c is not None), key=self.all.__getitem__, default=None)


class _Listener:
    """What the connections of one front share: where grpc-core listens, the cap, the log throttles."""

    def __init__(
        self,
        socket_path: str,
        cap: int,
        tls: ssl.SSLContext | None,
        handshake_seconds: float,
        max_streams: int,
        stall_seconds: float,
    ) -> None:
        self.socket_path = socket_path
        self.cap = cap
        self.max_streams = max_streams
        self.tls = tls
        self.handshake_seconds = handshake_seconds
        self.stall_seconds = stall_seconds
        self.open: set[FrontConnection] = set()
        self.counts = Counts()  # connections by client address
        order = itertools.count()  # one for all states: which came into its state first, across them
        self.waiting = {state: _Waiting(order) for state in (IDLE, SENDING, STALLED)}  # those that may make room
        self.refusals = LogThrottles(keys=16)
        self.share = CheckShare()
        self.abandoned = AbandonedCalls()
        self.address_calls_cap = ADDRESS_CALLS
        self.address_calls: dict[str, int] = {}  # calls grpc-core has not begun to answer, by client address
        self.queue: CoreQueue | None = None  # grpc-core's queue of calls, as counted (None: not followed)

    def count_calls(self, host: str, change: int) -> int:
        """Add ``change`` to ``host``'s calls not yet answered; its total now."""
        total = self.address_calls.get(host, 0) + change
        if total:
            self.address_calls[host] = total
        else:
            self.address_calls.pop(host, None)
        return total

    def add(self, connection: FrontConnection) -> None:
        self.open.add(connection)
        self.counts.add(connection.host)
        self.waiting[IDLE].add(connection)

    def remove(self, connection: FrontConnection) -> None:
        if connection in self.open:
            self.open.discard(connection)
            self.counts.remove(connection.host)
            for waiting in self.waiting.values():
                waiting.discard(connection)

    def moved(self, connection: FrontConnection, was: str, now: str) -> None:
        """``connection`` went from state ``was`` to ``now``: last among those in ``now`` that may make room."""
        if was in self.waiting:
            self.waiting[was].discard(connection)
        if now in self.waiting:
            self.waiting[now].add(connection)

    def make_room(self, host: str) -> FrontConnection | None:
        """The connection to close for a new one from ``host`` when the cap is reached: never a busy one. Of
        the address holding the most connections when it holds at least two more than ``host``
        (``core.fairness.gives_way``), the longest idle, else the longest sending, else the longest stalled
        (as on the HTTP port: idle, sending its request, not reading its answer); else the one idle or stalled
        longest of the addresses holding at least as many as ``host`` (a connection sending its request gives
        way to another address only; across idle and stalled by how long, so that a newcomer still in its
        handshake, idle, is not closed for a stalled client's reconnection before the older stalled ones:
        outside attack rt42); None when there is none such (the new connection is refused)."""
        mine = self.counts.of.get(host, 0)
        if self.counts.most and gives_way(self.counts.most, mine):
            heaviest = self.counts.heaviest()
            for waiting in self.waiting.values():
                if (connection := waiting.first(heaviest)) is not None:
                    return connection
        candidates = []
        for state in (IDLE, STALLED):
            waiting = self.waiting[state]
            connection = waiting.first() if mine <= 1 else waiting.first_of(self.counts.holding_at_least(mine))
            if connection is not None:
                candidates.append((waiting.all[connection], connection))
        return min(candidates, key=lambda candidate: candidate[0])[1] if candidates else None


class FrontConnection(asyncio.Protocol):
    """One client connection on the gRPC port, handed on to grpc-core once checked."""

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.streams = Calls()
        self.frames = ClientFrames(self.streams, listener.max_streams, listener.queue)
        self.frames.waiter = self
        self.answers = ServerFrames(self.streams)
        self.state = IDLE
        self._writing_paused = False  # the client's transport holds more than it takes
        self._stall_timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0  # when it began to wait for its client (sending or stalled), the loop's time
        self.transport: Any = None  # the client's (through the TLS layer over TLS)
        self.raw: asyncio.Transport | None = None  # the client's TCP transport
        self.backend: asyncio.Transport | None = None
        self.peer_name: str | None = None
        self.host = ""
        self.closed = False
        self._waiting: bytes = b""  # checked bytes for grpc-core before its connection is made
        self._client_paused: set[str] = set()  # why reading the client is paused
        self._opening: asyncio.Task[None] | None = None
        self._block_timer: asyncio.TimerHandle | None = None
        self._waiting_turn = False  # in the queue of :class:`CheckShare` (what it read waits in ``frames``)
        self._waiting_room = False  # its next call waits for room in grpc-core's queue (``core_queue``)
        self._backend_reached = False  # its connection to grpc-core was made
        self._client_ended = False  # the client ended its side (EOF): grpc-core's is still to end, once held bytes go
        self.checked_until = 0.0  # its virtual time in :class:`CheckShare`
        self._counted = 0  # its calls not yet answered, as counted in its address's total (``address_calls``)

    # -- the client's side ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.raw is not None:  # the TLS layer's handshake is done: its transport from now on
            self.transport = transport
            self._connect()
            return
        self.raw = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.host = self.frames.host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        listener = self.listener
        if listener.abandoned.barred(self.host):
            reason = abandoned_reason(listener.abandoned)
            self._refuse_quietly("abandoned refusal", f"refused gRPC connection(s) from an address that {reason}")
            transport.abort()  # type: ignore[attr-defined]
            self.closed = True
            return
        if len(listener.open) >= listener.cap:
            victim = listener.make_room(self.host)
            if victim is None:
                self._refuse_quietly(
                    "connection cap",
                    f"refused gRPC connection(s): {listener.cap:,} are open (the cap), each with a call open",
                )
                transport.abort()  # type: ignore[attr-defined]
                self.closed = True
                return
            self._refuse_quietly(
                "room",
                f"closed idle gRPC connection(s), or ones whose client read nothing of its answers, to make room "
                f"({listener.cap:,} open: the cap)",
            )
            victim._close(abort=True)
        listener.add(self)
        if listener.tls is None:
            self.transport = transport
            self._connect()
            return
        try:
            wrap_tls(
                self.loop,
                transport,  # type: ignore[arg-type]
                self,
                listener.tls,
                listener.handshake_seconds,
                self._handshake_done,
                shutdown_seconds=CLOSING_SECONDS,
            )
        except Exception as e:  # no memory for the TLS layer: this one connection is closed
            log.info("closed a gRPC connection whose TLS layer could not be made: %r", e)
            self._close(abort=True)

    def _handshake_done(self, failed: bool) -> None:
        if failed or self.transport is None:
            self._close(abort=True)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._waiting_turn:  # reading is paused: at most what the transport had read before
            self.frames.hold(data)
            return
        if self._waiting_room:  # read on, so that a client that goes is seen to (up to a bound: then paused)
            self.frames.hold(data)
            if self.frames.held > HELD_HIGH_WATER:
                self._pause_client("room")
            return
        self._check(data)

    def _check(self, data: bytes, turn: bool = False) -> None:
        """Check and hand on ``data`` (and what the frame checks hold) now, or wait for a turn (``turn``:
        this is the connection's turn)."""
        share = self.listener.share
        if not turn and not share.may_check():
            self.frames.hold(data)
            self._wait_turn()
            return
        started = time.perf_counter()
        try:
            passed, more = self.frames.feed(data)
        except Refused as e:
            self._refuse(e)
            return
        finally:
            share.spend(self, time.perf_counter() - started, turn)
        if passed:
            self._hand_on(passed)
        if self.frames.full:
            self._wait_room()
        cap = self.listener.address_calls_cap
        if self._recount() > cap > 0:
            self._refuse(
                Refused(
                    f"its address has more than {cap:,} calls waiting for the server at once, over its connections "
                    "(--grpc-max-address-calls)",
                    "address calls",
                )
            )
            return
        if self.frames.abandoned:
            calls, self.frames.abandoned = self.frames.abandoned, 0
            if self._abandoned(calls):
                return
        self._look()
        self._watch_block()
        if more:  # the rest of this read (reading waits) at this connection's next turn
            self._wait_turn()
        if self._client_ended:
            self._end_backend()

    def _watch_block(self) -> None:
        """A header block (or another frame the front reads whole) must be whole within ``--header-timeout``
        of the read that began it: the front holds it until then (up to 48 KiB), where grpc-core, which sees
        nothing of it, would keep such a connection for ``--grpc-max-connection-idle``."""
        if self.frames.unfinished:
            if self._block_timer is None:
                self._block_timer = self.loop.call_later(self.listener.handshake_seconds, self._block_timed_out)
        elif self._block_timer is not None:
            self._block_timer.cancel()
            self._block_timer = None

    def _block_timed_out(self) -> None:
        self._block_timer = None
        what = self.frames.unfinished
        if self.closed or not what:
            return
        if self._waiting_turn or self._waiting_room:  # the front's wait, not the client's
            self._watch_block()
            return
        seconds = self.listener.handshake_seconds
        self._refuse(Refused(f"{what} not whole {seconds:g} s after it began (--header-timeout)", "slow block"))

    def _wait_turn(self) -> None:
        self._waiting_turn = True
        self._pause_client("turn")
        self.listener.share.wait(self, self.frames.pending_cost())

    def _wait_room(self) -> None:
        if self._waiting_room or self.listener.queue is None:
            return
        queue = self.listener.queue
        self._waiting_room = True
        if self.frames.held > HELD_HIGH_WATER:
            self._pause_client("room")
        queue.wait(self)
        self._look()
        self._refuse_quietly(
            "queue full",
            f"held new gRPC calls in the front: {len(queue):,} calls are waiting in grpc-core's queue for the server "
            f"(--grpc-max-queued-calls {queue.limit:,}); they go on as it takes calls",
        )

    def room(self) -> None:
        """Its waiting call may go on to grpc-core (``core_queue``)."""
        self._waiting_room = False
        if self.closed:
            return
        self._look()
        self._resume_client("room")
        if not self._waiting_turn:
            self._check(b"")

    def take_turn(self) -> None:
        """Check what waited (:class:`CheckShare` calls this when the connection's turn comes)."""
        self._waiting_turn = False
        if self.closed:
            return
        self._resume_client("turn")
        self._check(b"", turn=True)

    def eof_received(self) -> bool:
        if self.listener.tls is None and self.backend is not None and self.backend.can_write_eof():
            self._client_ended = True
            self._end_backend()
            return True
        return False  # over TLS a connection cannot stay half open: it closes (asyncio warned at each)

    def _end_backend(self) -> None:
        """The client ended its side: so does grpc-core's connection, once what the front holds of the client's
        bytes (a call waiting for room in grpc-core's queue, or for its turn to be checked) has gone on (a
        write after the end failed, and stopped the calls waiting behind it: outside attack rt50)."""
        if self._client_ended and not (self._waiting_room or self._waiting_turn) and self.backend is not None:
            self._client_ended = False
            with contextlib.suppress(Exception):
                self.backend.write_eof()  # grpc-core answers what it has, then closes

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.backend is not None:
            self.backend.pause_reading()
        self._look()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self.backend is not None and not self.closed:
            self.backend.resume_reading()
        self._look()

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(abort=True)

    # -- grpc-core's side ----------------------------------------------------------------------------
    def _connect(self) -> None:
        try:
            sock, name = _named_socket()
        except OSError as e:
            self._refuse_quietly("socket", f"closed gRPC connection(s): no socket to grpc-core ({e})")
            self._close(abort=True)
            return
        self.peer_name = name
        context.register_peer(name, self.host)
        self._opening = self.loop.create_task(self._open_backend(sock))  # held: the loop keeps weak references

    async def _open_backend(self, sock: socket.socket) -> None:
        try:
            await self.loop.sock_connect(sock, self.listener.socket_path)
            transport, _ = await self.loop.create_unix_connection(lambda: _Backend(self), sock=sock)
        except Exception as e:  # grpc-core gone (stopping) or out of room: the client goes too
            sock.close()
            self._refuse_quietly("backend", f"closed gRPC connection(s): grpc-core did not take it ({e!r})")
            self._close(abort=True)
            return
        if self.closed:
            transport.abort()
            return
        self.backend = transport
        self._backend_reached = True
        if self._waiting:
            waiting, self._waiting = self._waiting, b""
            transport.write(waiting)

    def _hand_on(self, data: bytes) -> None:
        if self.backend is None:
            self._waiting += data
            if len(self._waiting) > HELD_HIGH_WATER:
                self._pause_client("connecting")
            return
        self._resume_client("connecting")
        self.backend.write(data)

    def answer(self, data: bytes) -> None:
        """grpc-core's bytes for the client."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.answers.feed(data)
        self._not_queued()
        self._recount()
        if self.streams.expired or self.streams.broken:
            calls = self.streams.expired + self.streams.broken
            self.streams.expired = self.streams.broken = 0
            if self._abandoned(calls):
                return
        self._look()
        if self.listener.tls is None or len(data) <= WRITE_PIECE:
            transport.write(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), WRITE_PIECE):
            transport.write(bytes(view[start : start + WRITE_PIECE]))

    def pause_client(self) -> None:
        self._pause_client("backend")

    def resume_client(self) -> None:
        self._resume_client("backend")

    def backend_lost(self) -> None:
        self.backend = None
        if not self.closed:
            # grpc-core closed the connection: for a client's protocol error it first ends every open call with
            # trailers alone, and those calls stay in its queue (outside attack rt47 H1: 12,500 a second
            # uncounted, other clients' calls answered CANCELLED); graceful closes end calls with answers
            self.listener.abandoned.charge(self.host, self.streams.recently_cut_short())
            self._close(abort=False)  # grpc-core closed it (GOAWAY, idle, age, stop): what it wrote goes out

    def _not_queued(self, everything: bool = False) -> None:
        """Tell the queue of the calls grpc-core never queued: refused (REFUSED_STREAM), past the last stream of
        its GOAWAY, or (``everything``) all the calls handed on, when none reached it."""
        queue = self.listener.queue
        streams = self.streams
        if queue is None or not (streams.never_queued or streams.last_stream is not None or everything):
            return
        names = self.frames.names
        for stream in streams.never_queued:
            if (name := names.pop(stream, None)) is not None:
                queue.never_queued(name)
        streams.never_queued.clear()
        last = -1 if everything else streams.last_stream
        if last is not None:
            for stream in [stream for stream in names if stream > last]:
                queue.never_queued(names.pop(stream))

    # -- shared --------------------------------------------------------------------------------------
    def _abandoned(self, calls: int) -> bool:
        """Charge ``calls`` the connection left unanswered (reset, or expired unseen) to its address; past the
        address's budget the connection is closed (True)."""
        if not self.listener.abandoned.charge(self.host, calls):
            return False
        self._refuse(Refused(f"its address {abandoned_reason(self.listener.abandoned)}", "abandoned"))
        return True

    def _recount(self) -> int:
        """Bring its address's count of calls not yet answered up to date; the address's total."""
        unanswered = 0 if self.closed else self.streams.unanswered()
        change, self._counted = unanswered - self._counted, unanswered
        return self.listener.count_calls(self.host, change)

    def _look(self) -> None:
        """Follow what the connection is doing (``IDLE``, ``SENDING``, ``STALLED``, ``BUSY``: some calls
        waiting for their requests and the others for their client to read count as stalled). A connection
        that waits for its client (sending or stalled, in turn or together) for ``--body-timeout`` is cut, as
        an HTTP connection whose client does not read its answer, or does not send its body, is."""
        if self.closed:
            return
        calls = self.streams
        if self._waiting_room:  # a call of its waits for the server (``core_queue``), however idle it looks
            state = BUSY
        elif not calls:
            state = IDLE
        elif self._writing_paused or calls.waiting:  # every call unread, or some unread and the rest sending
            state = STALLED
        else:
            state = SENDING if calls.sending else BUSY
        if state == self.state:
            return
        self.listener.moved(self, self.state, state)
        self.state = state
        if state in (SENDING, STALLED):
            if self._stall_timer is None:
                self._waiting_since = self.loop.time()
                self._stall_timer = self.loop.call_later(self.listener.stall_seconds, self._waited_too_long)
        elif self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _waited_too_long(self) -> None:
        """Cut the connection: stalled for ``--body-timeout``, or sending for ``SENDING_TIMEOUTS`` times that
        (each call's message has its own ``--body-timeout``, which ends the call with DEADLINE_EXCEEDED
        first: the cut is for a client that opens the next message-less call as each ends)."""
        self._stall_timer = None
        if self.closed or self.state not in (SENDING, STALLED):
            return
        seconds = self.listener.stall_seconds
        if self.state == STALLED:
            message = f"its client read nothing of its calls' answers for {seconds:g} s (--body-timeout)"
        else:
            left = self._waiting_since + SENDING_TIMEOUTS * seconds - self.loop.time()
            if left > 0:
                self._stall_timer = self.loop.call_later(left, self._waited_too_long)
                return
            message = f"its calls waited for their requests for {SENDING_TIMEOUTS * seconds:g} s (--body-timeout x 2)"
        self._refuse(Refused(message, "waited"))

    def _pause_client(self, why: str) -> None:
        if not self._client_paused and self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        self._client_paused.add(why)

    def _resume_client(self, why: str) -> None:
        if why not in self._client_paused:
            return
        self._client_paused.discard(why)
        if not self._client_paused and self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    def _refuse(self, refusal: Refused) -> None:
        self._refuse_quietly(refusal.kind, f"closed a gRPC connection from {self.host or 'a client'}: {refusal}")
        self._close(abort=True)

    def _refuse_quietly(self, kind: str, message: str) -> None:
        throttle = self.listener.refusals.of(kind)
        if count := throttle.due():
            log.warning("%s%s", message, throttle.note(count))

    def _close(self, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        # however it goes (the client left, the front or grpc-core closed it: outside attack rt47 had grpc-core
        # close 12,500 calls a second uncounted), the calls grpc-core has not begun to answer stay in its queue
        self.listener.abandoned.charge(self.host, self.streams.unanswered())
        self._recount()  # closed: its calls leave its address's count
        for timer in (self._block_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self.listener.remove(self)
        if self.listener.queue is not None:
            self.listener.queue.discard(self)
        if self.peer_name is not None:
            context.forget_peer(self.peer_name)
        backend, self.backend = self.backend, None
        if not self._backend_reached:
            self._not_queued(everything=True)  # its calls waited for a connection to grpc-core, and go with it
        elif backend is not None and backend.get_write_buffer_size():
            # what it handed on goes to grpc-core before the close: calls counted in grpc-core's queue reach it
            # (and are taken from it, dead); grpc-core ends them as their connection closes
            backend.close()
            self.loop.call_later(CLOSING_SECONDS, backend.abort)
        elif backend is not None:
            backend.abort()
        transport = self.transport if self.transport is not None else self.raw
        if transport is not None:
            if abort:
                transport.abort()
                if self.raw is not None and self.raw is not transport:
                    self.raw.abort()
            else:
                transport.close()
                # what grpc-core wrote last (its GOAWAY) goes out, to a client that reads it: one that does
                # not is cut, so that no closed connection lingers beyond the cap
                self.loop.call_later(CLOSING_SECONDS, self._cut)
        self._waiting = b""
        if self.listener.tls is not None:
            # the TLS layer's buffers of the connections closed meanwhile go back to the system (3,000 idle
            # TLS connections took 180 MB, and most of it stayed after they closed: outside attack rt41)
            give_back_memory_later(self.loop, TRIM_AFTER_CUT_SECONDS)

    def _cut(self) -> None:
        for transport in (self.transport, self.raw):
            if transport is not None:
                transport.abort()


FOLDER_PREFIX = "onnxserve-grpc-"
"""The private folders of grpc-core's sockets in TMPDIR: ``onnxserve-grpc-<pid>-<random>``."""


def _remove_stale_folders() -> None:
    """Remove this user's private socket folders whose server process is gone (killed, or crashed: a clean
    stop removes its own), so that TMPDIR does not fill with them."""
    root = Path(tempfile.gettempdir())
    uid = os.getuid()
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for entry in entries:
        pid, _, rest = entry.name.removeprefix(FOLDER_PREFIX).partition("-")
        if not entry.name.startswith(FOLDER_PREFIX) or not pid.isdigit() or not rest:
            continue
        try:
            info = entry.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (OSError, OverflowError):
            continue


class GrpcFront:
    """The gRPC port: a listening socket whose connections go, checked, to grpc-core's private socket."""

    def __init__(
        self,
        cap: int,
        tls: ssl.SSLContext | None,
        handshake_seconds: float,
        max_streams: int,
        stall_seconds: float,
        abandoned_calls: int = int(ABANDONED_RATE),
        address_calls: int = ADDRESS_CALLS,
        queue: CoreQueue | None = None,
    ) -> None:
        """``handshake_seconds``: ``--header-timeout``; ``max_streams``: grpc-core's stream limit;
        ``stall_seconds``: ``--body-timeout``, how long a connection may leave its answers unread;
        ``abandoned_calls``: ``--grpc-max-abandoned-calls``, the calls an address may abandon a second and at
        once (0: no limit); ``address_calls``: ``--grpc-max-address-calls``, the calls not yet answered an
        address may have at once (0: no limit); ``queue``: grpc-core's queue of calls as the front counts it, which
        names each call and holds new ones when it is full (``core_queue``; None: no such bound)."""
        _remove_stale_folders()
        # mode 0700: only this user may connect to grpc-core
        self._folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
        self.socket_path = str(self._folder / "grpc.sock")
        self._listener = _Listener(self.socket_path, cap, tls, handshake_seconds, max_streams, stall_seconds)
        self._listener.abandoned = AbandonedCalls(abandoned_calls, abandoned_calls)
        self._listener.address_calls_cap = address_calls
        self._listener.queue = queue
        self._server: asyncio.AbstractServer | None = None

    @property
    def backend_address(self) -> str:
        """Where grpc-core listens (a grpc address)."""
        return f"unix:{self.socket_path}"

    async def start(self, sock: socket.socket) -> None:
        """Take connections on the listening socket ``sock`` (its backlog kept: asyncio listens again, with 100
        unless told, and a burst of 940 new connections had up to 697 reset by the kernel: outside attack
        rt54)."""
        loop = asyncio.get_running_loop()
        listener = self._listener
        self._server = await loop.create_server(lambda: FrontConnection(listener), sock=sock, backlog=BACKLOG)

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    def close_connections(self) -> None:
        """Close every connection still open (after grpc-core stopped, they have nothing more to say)."""
        for connection in list(self._listener.open):
            connection._close(abort=True)
        shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def open_connections(self) -> int:
        return len(self._listener.open)
