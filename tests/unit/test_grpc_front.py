"""The gRPC front's frame checks (server.grpc_front.ClientFrames): what an honest HTTP/2 client sends passes
unchanged however it is cut into reads, and decoding takes turns.

The client traffic is made by the ``h2`` library (a real HTTP/2 client state machine): the preface, its
SETTINGS, calls with metadata, messages, window updates, pings and resets.
"""

from __future__ import annotations

import asyncio
import random

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hpack import Encoder

from onnxserve.protocols.context import forget_peer, grpc_peer_host, register_peer
from onnxserve.protocols.v2_grpc.servicer import SERVICE_NAME
from onnxserve.server.core_queue import CALL_FIELD, MIN_BOUND, CoreQueue
from onnxserve.server.grpc_calls import Calls
from onnxserve.server.grpc_front import (
    DECODE_SLICE_BYTES,
    FRAME_SECONDS,
    FRAMES_PER_TURN,
    HEADER_BYTE_SECONDS,
    IDLE,
    PREFACE,
    STALLED,
    CheckShare,
    ClientFrames,
    Refused,
    ServerFrames,
    _Listener,
    grpc_timeout,
)

PATH = "/inference.GRPCInferenceService/ModelInfer"


def honest_client_bytes(calls: int = 20) -> bytes:
    """What a gRPC client sends for ``calls`` calls, some with large metadata split into CONTINUATION frames."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.max_outbound_frame_size = 1024  # larger header blocks go on in CONTINUATION frames
    sent = bytearray(client.data_to_send())
    for call in range(calls):
        stream = client.get_next_available_stream_id()
        metadata = [(f"x-meta-{i}", f"value-{call}-{i}" * (1 + call % 5) * 4) for i in range(call % 30)]
        client.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", PATH),
                (":authority", "127.0.0.1:8001"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *metadata,
            ],
        )
        message = b"\x00" + (200 * call).to_bytes(4, "big") + b"\x07" * (200 * call)
        for at in range(0, len(message), 1024):
            client.send_data(stream, message[at : at + 1024], end_stream=at + 1024 >= len(message))
        if call % 7 == 3:
            client.reset_stream(stream)
        if call % 5 == 0:
            client.ping(call.to_bytes(8, "big"))
        sent += client.data_to_send()
    return bytes(sent)


def passed_through(frames: ClientFrames, reads: list[bytes]) -> bytes:
    out = bytearray()
    for data in reads:
        passed, more = frames.feed(data)
        out += passed
        while more:
            passed, more = frames.feed(b"")
            out += passed
    return bytes(out)


def cut(data: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    reads, at = [], 0
    while at < len(data):
        size = rng.choice([1, 2, 5, 9, 10, 100, 4096, 70000])
        reads.append(data[at : at + size])
        at += size
    return reads


@pytest.mark.parametrize("seed", range(8))
def test_an_honest_client_passes_unchanged_however_it_is_read(seed: int) -> None:
    data = honest_client_bytes()
    assert b"\x09\x04\x00\x00" in data  # a CONTINUATION frame ending a block
    frames = ClientFrames()
    assert passed_through(frames, cut(data, seed)) == data
    assert frames.held == 0


def test_a_header_frame_is_held_until_it_is_whole() -> None:
    data = honest_client_bytes(1)
    frames = ClientFrames()
    headers_start = data.index(b"\x01\x04\x00\x00\x00\x01", len(PREFACE)) - 3  # the HEADERS frame of stream 1
    passed, more = frames.feed(data[: headers_start + 12])
    assert passed == data[:headers_start]  # the preface and SETTINGS go on; the partial block waits
    assert not more
    assert frames.held == 12


def header_frame(stream: int, block: bytes) -> bytes:
    """A HEADERS frame with END_STREAM and END_HEADERS."""
    return len(block).to_bytes(3, "big") + bytes([0x1, 0x5]) + stream.to_bytes(4, "big") + block


def data_frame(size: int, stream: int = 1) -> bytes:
    return size.to_bytes(3, "big") + bytes([0x0, 0x0]) + stream.to_bytes(4, "big") + b"\x00" * size


def test_decoding_takes_turns() -> None:
    """Blocks of several slices in one read are decoded a slice per turn, in order, nothing lost."""
    encoder = Encoder()
    blocks = [
        header_frame(1 + 2 * k, encoder.encode([(":path", PATH), (f"x-{k}", f"{k}" * 12000)], huffman=True))
        for k in range(6)
    ]
    data = PREFACE + b"".join(blocks)
    frames = ClientFrames()
    passed, more = frames.feed(data)
    total, turns = bytearray(passed), 1
    while more:
        passed, more = frames.feed(b"")
        total += passed
        turns += 1
    assert bytes(total) == data
    assert all(len(block) > DECODE_SLICE_BYTES for block in blocks)
    assert turns == len(blocks)  # a block is decoded whole: one a turn, each larger than a turn's slice


def test_a_block_past_the_field_count_is_refused() -> None:
    block = Encoder().encode([(f"x-{i}", "v") for i in range(101)])
    with pytest.raises(Refused, match="101 fields"):
        ClientFrames().feed(PREFACE + header_frame(1, block))


def test_peer_names_map_back_to_client_addresses() -> None:
    register_peer("onnxserve-grpc-1-ab-7", "10.1.2.3")
    try:
        assert grpc_peer_host("unix-abstract:onnxserve-grpc-1-ab-7") == "10.1.2.3"
        assert grpc_peer_host("unix-abstract:onnxserve-grpc-1-ab-8") is None
        assert grpc_peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    finally:
        forget_peer("onnxserve-grpc-1-ab-7")
    assert grpc_peer_host("unix-abstract:onnxserve-grpc-1-ab-7") is None


def server_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


@pytest.mark.parametrize("read_size", [1, 4, 9, 10, 1000])
def test_grpc_cores_answers_end_calls_however_they_are_read(read_size: int) -> None:
    """Trailers (HEADERS with END_STREAM) and RST_STREAM end calls; headers and DATA do not."""
    streams = Calls()
    for stream in (1, 3, 5, 7):
        streams.open(stream)
    answers = ServerFrames(streams)
    data = (
        server_frame(0x4, 0, 0, b"\x00\x03\x00\x00\x00\x64")  # SETTINGS
        + server_frame(0x1, 0x4, 1, b"\x88")  # response headers of call 1
        + server_frame(0x0, 0, 1, b"\x01" * 3000)  # its message, with bytes that look like frame headers
        + server_frame(0x1, 0x5, 1, b"\x88")  # its trailers
        + server_frame(0x3, 0, 3, b"\x00\x00\x00\x08")  # call 3 reset
        + server_frame(0x0, 0x1, 5, b"")  # DATA with END_STREAM: gRPC ends calls with trailers, not so
        + server_frame(0x1, 0x4, 7, b"\x88")  # call 7: headers only, still open
    )
    for at in range(0, len(data), read_size):
        answers.feed(data[at : at + read_size])
    assert set(streams) == {5, 7}


def test_a_client_reset_ends_its_call() -> None:
    frames = ClientFrames()
    block = Encoder().encode([(":path", PATH)])
    frames.feed(PREFACE + header_frame(1, block) + header_frame(3, Encoder().encode([(":path", PATH)])))
    assert set(frames.streams) == {1, 3}
    frames.feed(server_frame(0x3, 0, 3, b"\x00\x00\x00\x08"))
    assert set(frames.streams) == {1}


def test_client_resets_of_calls_grpc_core_has_not_answered_count_as_abandoned() -> None:
    """A call reset before grpc-core began its answer stays in grpc-core's queue (abandoned); one reset
    after its answer began does not; so does a call left open when the connection goes (``unanswered``)."""
    frames = ClientFrames()
    block = Encoder().encode([(":path", PATH)])
    frames.feed(PREFACE + header_frame(1, block) + header_frame(3, block) + header_frame(5, block))
    ServerFrames(frames.streams).feed(server_frame(0x1, 0x4, 3, b"\x88"))  # call 3's answer has begun
    assert frames.streams.unanswered() == 2
    frames.feed(server_frame(0x3, 0, 1, b"\x00\x00\x00\x08") + server_frame(0x3, 0, 3, b"\x00\x00\x00\x08"))
    assert frames.abandoned == 1
    assert frames.streams.unanswered() == 1  # call 5, open


def test_calls_grpc_core_ends_with_trailers_alone_are_counted() -> None:
    """Trailers alone (no answer begun) end a call short: what grpc-core sends each open call before it closes
    a connection for a client's error, the calls left in its queue; a call answered first is not counted."""
    streams = Calls()
    for stream in (1, 3, 5):
        streams.open(stream)
    ServerFrames(streams).feed(
        server_frame(0x1, 0x4, 1, b"\x88")  # call 1: its answer begins
        + server_frame(0x1, 0x5, 1, b"\x88")  # and ends
        + server_frame(0x1, 0x5, 3, b"\x88")  # call 3: trailers alone
        + server_frame(0x1, 0x5, 5, b"\x88")  # call 5: trailers alone
    )
    assert set(streams) == set()
    assert streams.recently_cut_short() == 2


def test_calls_waiting_are_counted_by_address() -> None:
    listener = _Listener("unused", 10, None, 10.0, 100, 60.0)
    assert listener.count_calls("10.0.0.1", 3) == 3
    assert listener.count_calls("10.0.0.2", 1) == 1
    assert listener.count_calls("10.0.0.1", -3) == 0
    assert listener.address_calls == {"10.0.0.2": 1}  # an address with none is forgotten


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1m", 0.001),
        (b"10S", 10.0),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"500u", 0.0005),
        (b"99999999n", 0.099999999),
        # read as grpc-core reads them (outside attack rt49): spaces anywhere, leading zeros, more digits
        (b" 1m", 0.001),
        (b"1 m", 0.001),
        (b"1m ", 0.001),
        (b"000000001m", 0.001),
        (b"1000000000n", 1.0),
    ],
)
def test_grpc_timeouts_are_read(value: bytes, seconds: float) -> None:
    assert grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"m", b"1", b"1x", b"-1S", b"1.5S", b"S1"])
def test_what_is_not_a_grpc_timeout_counts_as_past(value: bytes) -> None:
    assert grpc_timeout(value) == 0.0


def test_a_deadline_decades_off_is_none() -> None:
    assert grpc_timeout(b"9" * 5000 + b"S") is None  # no int of 5,000 digits is made either


def test_calls_grpc_core_ends_short_past_their_deadline_count_as_expired() -> None:
    """A call ended without an answer (trailers alone, or a reset) once its ``grpc-timeout`` has passed waited
    in grpc-core's queue unseen; one ended before, or answered, does not count."""
    frames = ClientFrames()
    encoder = Encoder()
    expiring = [(":path", PATH), ("grpc-timeout", "100S"), ("grpc-timeout", "1n")]  # grpc-core keeps the last
    lasting = [(":path", PATH), ("grpc-timeout", "100S")]
    frames.feed(
        PREFACE
        + header_frame(1, encoder.encode(expiring))
        + header_frame(3, encoder.encode(expiring))
        + header_frame(5, encoder.encode(lasting))
        + header_frame(7, encoder.encode(expiring))
    )
    ServerFrames(frames.streams).feed(
        server_frame(0x1, 0x5, 1, b"\x88")  # call 1: trailers alone, past its deadline
        + server_frame(0x3, 0, 3, b"\x00\x00\x00\x00")  # call 3: reset, past its deadline
        + server_frame(0x1, 0x5, 5, b"\x88")  # call 5: trailers alone, well before its deadline
        + server_frame(0x1, 0x4, 7, b"\x88")  # call 7: answered
        + server_frame(0x1, 0x5, 7, b"\x88")
    )
    assert frames.streams.expired == 2


def test_only_new_streams_open_calls() -> None:
    """HEADERS on a stream older than the newest (a client's trailers, or a call that has ended) opens
    nothing: a client cannot grow the connection's calls past the streams it really opened."""
    frames = ClientFrames()
    block = Encoder().encode([(":path", PATH)])
    frames.feed(PREFACE + header_frame(5, block))
    ServerFrames(frames.streams).feed(server_frame(0x1, 0x5, 5, b"\x88"))
    assert set(frames.streams) == set()
    frames.feed(header_frame(5, block) + header_frame(3, block))
    assert set(frames.streams) == set()
    frames.feed(header_frame(7, block))
    assert set(frames.streams) == {7}


def test_a_connection_with_twice_the_stream_limit_open_is_refused() -> None:
    """Once the client has acknowledged the server's SETTINGS (and so its limit of 100), a call past 200 open
    at once is refused; before, past 1,000 (HTTP/2 sets no limit until the SETTINGS arrive)."""
    block = Encoder().encode([(":path", PATH)])
    acknowledged = ClientFrames(max_streams=100)
    passed_through(acknowledged, [PREFACE + server_frame(0x4, 0x1, 0)])
    passed_through(acknowledged, [b"".join(header_frame(1 + 2 * k, block) for k in range(200))])
    assert len(acknowledged.streams) == 200
    with pytest.raises(Refused, match="200 calls open at once"):
        acknowledged.feed(header_frame(401, block))
    early = ClientFrames(max_streams=100)
    passed_through(early, [PREFACE + b"".join(header_frame(1 + 2 * k, block) for k in range(1000))])
    with pytest.raises(Refused, match="1000 calls open at once"):
        early.feed(header_frame(2001, block))


class Turns:
    """A stand-in for a front connection in the turn queue: it records its turns and spends what it is told."""

    def __init__(self, name: str, share: CheckShare, cost: float, log: list[str]) -> None:
        self.name, self.share, self.cost, self.log = name, share, cost, log
        self.checked_until = 0.0
        self.left = 0

    def take_turn(self) -> None:
        self.log.append(self.name)
        self.share.spend(self, self.cost, turn=True)  # type: ignore[arg-type]
        self.left -= 1
        if self.left > 0:
            self.share.wait(self, self.cost)  # type: ignore[arg-type]


def test_turns_go_to_connections_that_used_least() -> None:
    """Two heavy connections have turns queued; a light one that joins later has its turns before their
    later ones (fair queuing on check time), not behind all of them (first come first served)."""
    log: list[str] = []

    async def run() -> None:
        share = CheckShare()
        heavy = [Turns(f"heavy{k}", share, 0.01, log) for k in range(2)]
        for connection in heavy:
            connection.left = 5
            share.wait(connection, connection.cost)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        light = Turns("light", share, 0.0001, log)
        light.left = 3
        share.wait(light, light.cost)  # type: ignore[arg-type]
        while sum(c.left for c in [*heavy, light]) > 0:
            await asyncio.sleep(0.005)

    asyncio.run(run())
    first_light = log.index("light")
    assert log[first_light : first_light + 3] == ["light"] * 3, log
    assert len(log) - (first_light + 3) >= 4, log  # most heavy turns come after the light ones


def test_a_cheap_turn_goes_ahead_of_dear_turns_that_start_as_early() -> None:
    """Many connections whose turns start at the same virtual time, each about to decode a large block, and
    a light one that has used a little more (its first flight checked): ordered by start, the light one's
    next turn (a small call) waited for every dear turn (a fresh channel's call 4 to 13 s behind 900 of
    them, outside attack rt40); by expected end it goes first."""
    log: list[str] = []

    async def run() -> None:
        share = CheckShare()
        share._tokens = -1.0  # every connection queues: the share is spent for the next 2 s
        dear = [Turns(f"dear{k}", share, 0.004, log) for k in range(40)]
        for connection in dear:
            connection.left = 1
            share.wait(connection, connection.cost)  # type: ignore[arg-type]
        light = Turns("light", share, 0.0001, log)
        light.checked_until = 0.00002  # its first flight's turn
        light.left = 1
        share.wait(light, light.cost)  # type: ignore[arg-type]
        share._tokens = share.BURST
        while sum(c.left for c in [*dear, light]) > 0:
            await asyncio.sleep(0.005)

    asyncio.run(run())
    assert log[0] == "light", log


def test_the_expected_cost_of_a_turn_counts_whole_header_frames_and_frames() -> None:
    """What a turn is expected to cost: the header blocks whose last frame is whole in what is held (their
    earlier frames included: the block is decoded whole; frames still arriving cost nothing yet), and a
    little for each frame, however large its payload; past ``COST_LOOKAHEAD_FRAMES``, a turn of
    ``FRAMES_PER_TURN`` frames, the most a turn looks at."""
    frames = ClientFrames()
    frames.feed(PREFACE)
    block = Encoder().encode([(":path", PATH), ("x-pad", "p" * 3000)], huffman=False)
    whole = header_frame(1, block)
    frames.hold(data_frame(16000) * 8)
    only_data = frames.pending_cost()
    assert only_data == pytest.approx(8 * FRAME_SECONDS)
    frames.hold(whole)
    with_block = frames.pending_cost()
    assert with_block == pytest.approx(only_data + FRAME_SECONDS + len(block) * HEADER_BYTE_SECONDS)
    frames.hold(whole[:100])  # a frame whose rest has not come: not decoded in this turn
    assert frames.pending_cost() == pytest.approx(with_block + FRAME_SECONDS)
    split = ClientFrames()  # a block in two frames: decoded (all of it) at its last frame only
    split.feed(PREFACE)
    first, last = block[:2000], block[2000:]
    split.hold(len(first).to_bytes(3, "big") + bytes([0x1, 0x1]) + (1).to_bytes(4, "big") + first)
    assert split.pending_cost() == pytest.approx(FRAME_SECONDS)
    split.feed(b"")
    split.hold(len(last).to_bytes(3, "big") + bytes([0x9, 0x4]) + (1).to_bytes(4, "big") + last)
    assert split.pending_cost() == pytest.approx(FRAME_SECONDS + len(block) * HEADER_BYTE_SECONDS)
    tiny = ClientFrames()
    tiny.feed(PREFACE)
    tiny.hold(data_frame(0) * 5000)
    assert tiny.pending_cost() == pytest.approx(FRAMES_PER_TURN * FRAME_SECONDS)
    passed, more = tiny.feed(b"")
    assert more
    assert len(passed) == FRAMES_PER_TURN * 9


def test_a_turn_decodes_no_block_its_expected_cost_did_not_count() -> None:
    """A block behind a turn's worth of cheap frames is decoded in the next turn, whose expected cost counts
    it (outside attack rt42: the cost looked at 64 frames and the turn took 1,024, so a 16 KB block behind 64
    WINDOW_UPDATE frames went in as a turn of 0.5 ms and held others' calls seconds)."""
    frames = ClientFrames()
    frames.feed(PREFACE)
    update = (4).to_bytes(3, "big") + bytes([0x8, 0x0]) + (0).to_bytes(4, "big") + (1).to_bytes(4, "big")
    block = Encoder().encode([(":path", PATH), ("x-pad", "p" * 12000)], huffman=True)
    frames.hold(update * 64 + header_frame(1, block))
    more = True
    while more:  # turn by turn: the block is decoded in the turn whose expected cost counted it
        expected = frames.pending_cost()
        _, more = frames.feed(b"")
        decoded = 1 in frames.streams
        assert decoded == (expected >= len(block) * HEADER_BYTE_SECONDS), (expected, decoded)
        if decoded:
            break
    assert 1 in frames.streams


def test_a_block_that_adds_its_newest_entry_again_is_decoded_each_time() -> None:
    """A block that adds a copy of the table's newest entry evicts the oldest one: it changes the table
    though the newest entry looks the same. Each time it comes, the front's table must follow grpc-core's
    (a full decoder here): compared by value, the front skipped it as unchanged and the tables parted."""

    def literal(name: bytes, value: bytes) -> bytes:  # literal with incremental indexing, new name
        return b"\x40" + bytes([len(name)]) + name + bytes([len(value)]) + value

    frames, grpc_core = ClientFrames(), hpack.Decoder(max_header_list_size=1 << 30)
    frames.feed(PREFACE)

    def send(block: bytes, stream: int) -> None:
        passed_through(frames, [header_frame(stream, block)])
        list(grpc_core.decode(block, raw=True))

    send(b"".join(literal(b"x-old-%02d" % i, b"o" * 100) for i in range(30)), 1)  # 30 entries of 141 bytes
    newest = frames._decoder.header_table.dynamic_entries[0]
    again = literal(*newest)
    for k in range(40):
        send(again, 3 + 2 * k)
    assert list(frames._decoder.header_table.dynamic_entries) == list(grpc_core.header_table.dynamic_entries)


def test_flow_control_frames_are_read_whole() -> None:
    """SETTINGS and WINDOW_UPDATE frames are held until whole and read (the calls' windows follow them); a
    larger one than a frame may be is refused, and one left unfinished shows as such."""
    frames = ClientFrames()
    initial_window = (0x4).to_bytes(2, "big") + (0).to_bytes(4, "big")
    settings = len(initial_window).to_bytes(3, "big") + bytes([0x4, 0x0]) + (0).to_bytes(4, "big") + initial_window
    passed, _ = frames.feed(PREFACE + settings[:10])
    assert passed == PREFACE
    assert frames.unfinished == "a SETTINGS frame"
    passed, _ = frames.feed(settings[10:] + header_frame(1, Encoder().encode([(":path", PATH)])))
    assert settings in passed
    assert frames.unfinished is None
    assert frames.streams.initial_window == 0
    frames.streams.server_headers(1, end_stream=False)
    assert frames.streams.stalled
    update = (4).to_bytes(3, "big") + bytes([0x8, 0x0]) + (1).to_bytes(4, "big") + (100).to_bytes(4, "big")
    frames.feed(update)
    assert not frames.streams.stalled
    with pytest.raises(Refused, match="a SETTINGS frame of 606 bytes"):
        ClientFrames().feed(PREFACE + (606).to_bytes(3, "big") + bytes([0x4, 0x0]) + (0).to_bytes(4, "big"))
    with pytest.raises(Refused, match="a WINDOW_UPDATE frame of 16,386 bytes"):
        ClientFrames().feed(PREFACE + (16386).to_bytes(3, "big") + bytes([0x8, 0x0]) + (0).to_bytes(4, "big"))


def test_the_client_ending_its_side_is_followed() -> None:
    """A call's request ends with END_STREAM on its DATA (or its HEADERS): the call no longer waits for it."""
    frames = ClientFrames()
    block = Encoder().encode([(":path", PATH)])
    opened = len(block).to_bytes(3, "big") + bytes([0x1, 0x4]) + (1).to_bytes(4, "big") + block  # no END_STREAM
    frames.feed(PREFACE + opened)
    assert frames.streams.sending
    frames.feed(data_frame(5)[:4] + b"\x01" + data_frame(5)[5:])  # its message, with END_STREAM
    assert not frames.streams.sending
    frames.feed(header_frame(3, block))  # a call without a message: HEADERS with END_STREAM
    assert 3 in frames.streams
    assert not frames.streams.sending


def test_messages_are_counted_across_frames_and_reads() -> None:
    """A stream whose request message spans two DATA frames and three reads, answered by grpc-core in two
    DATA frames: it waits for its client only once the answer is whole (a stream between two messages)."""
    frames = ClientFrames()
    answers = ServerFrames(frames.streams)
    block = Encoder().encode([(":path", "/inference.GRPCInferenceService/ModelStreamInfer")])
    opened = len(block).to_bytes(3, "big") + bytes([0x1, 0x4]) + (1).to_bytes(4, "big") + block  # no END_STREAM
    request = b"\x00" + (3000).to_bytes(4, "big") + b"r" * 3000

    def data(stream: int, payload: bytes) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes([0x0, 0x0]) + stream.to_bytes(4, "big") + payload

    sent = PREFACE + opened + data(1, request[:1000]) + data(1, request[1000:])
    for piece in (sent[:70], sent[70:1500], sent[1500:]):
        frames.feed(piece)
    assert not frames.streams.sending  # its message is in: grpc-core's turn
    answer = b"\x00" + (100).to_bytes(4, "big") + b"a" * 100
    answers.feed(server_frame(0x1, 0x4, 1, b"\x88") + data(1, answer[:50]))
    assert not frames.streams.sending
    answers.feed(data(1, answer[50:]))
    assert frames.streams.sending


class Held:
    """A stand-in for a front connection in the listener's books: only its client's address."""

    def __init__(self, host: str) -> None:
        self.host = host


def test_room_goes_to_whoever_has_waited_for_its_client_longest() -> None:
    """Clients from as many addresses as there are places, each with a connection stalled since long, and a
    newcomer still in its handshake (idle): a stalled client's reconnection closes the oldest stalled
    connection, not the newcomer (outside attack rt42: idle ones went first, so the reconnecting holders
    closed the newcomers, and 7 of 53 got in)."""
    listener = _Listener("/nowhere", 3, None, 10.0, 100, 60.0)
    holders = [Held(f"10.0.0.{k}") for k in (1, 2)]
    for holder in holders:
        listener.add(holder)  # type: ignore[arg-type]
        listener.moved(holder, IDLE, STALLED)  # type: ignore[arg-type]
    newcomer = Held("10.0.0.3")
    listener.add(newcomer)  # type: ignore[arg-type]
    assert listener.make_room("10.0.0.1") is holders[0]


def test_pings_past_the_budget_close_the_connection() -> None:
    """1,000 PINGs at once pass (grpc-core answers them); the next one, within the same second, is refused."""
    frames = ClientFrames()
    ping = (8).to_bytes(3, "big") + bytes([0x6, 0x0]) + (0).to_bytes(4, "big") + bytes(8)
    passed_through(frames, [PREFACE + ping * 1000])
    with pytest.raises(Refused, match="PINGs faster than 100 a second"):
        passed_through(frames, [ping])


def requests_seen_by_grpc_core(data: bytes) -> list[list[tuple[str, str]]]:
    """The header lists of the calls in ``data`` (what the front hands on), as an HTTP/2 server (the ``h2``
    library's state machine, its own HPACK decoder) reads them."""
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8", validate_inbound_headers=False)
    )
    server.initiate_connection()
    requests = []
    for event in server.receive_data(data):
        if isinstance(event, h2.events.RequestReceived):
            requests.append([(str(name), str(value)) for name, value in event.headers])
    return requests


@pytest.mark.parametrize("seed", range(4))
def test_each_call_handed_on_is_named_at_the_end_of_its_header_block(seed: int) -> None:
    """With grpc-core's queue followed, each call's block gets the front's field last (a CONTINUATION frame
    after the block's last frame): an HTTP/2 server reads every call with the client's fields unchanged,
    in order, and the name; the names are the queue's, one per call, whatever the reads."""
    data = honest_client_bytes()
    queue = CoreQueue()
    frames = ClientFrames(queue=queue)
    frames.host = "10.0.0.1"
    passed = passed_through(frames, cut(data, seed))
    sent = requests_seen_by_grpc_core(data)
    seen = requests_seen_by_grpc_core(passed)
    assert len(seen) == len(sent) == 20
    names = []
    for client, handed_on in zip(sent, seen, strict=True):
        assert handed_on[:-1] == client
        field, name = handed_on[-1]
        assert field == CALL_FIELD.decode()
        names.append(int(name))
    assert len(set(names)) == 20
    assert all(queue.queued(name) for name in names)
    assert queue.by_address == {"10.0.0.1": 20}
    assert sorted(frames.names.values()) == sorted(names)


def call_block(encoder: Encoder, method: str = "POST", *extra: tuple[str, str], path: str = PATH) -> bytes:
    return encoder.encode(
        [
            (":method", method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "fields",
    [
        [(":method", "GET")],
        [(":method", "post")],
        [("te", "Trailers")],
        [(":scheme", "grpc")],
        [(":path", None)],
        [(":authority", None)],
        [("te", None)],
    ],
    ids=["get", "lowercase-post", "te-case", "scheme", "no-path", "no-authority", "no-te"],
)
def test_calls_grpc_core_refuses_unqueued_are_named_not_counted(fields: list[tuple[str, str | None]]) -> None:
    """A call grpc-core refuses before queueing it (grpcio 1.85, tried field by field: a method other than
    POST, a ``te`` other than ``trailers``, a scheme other than http or https, no path, no authority nor host)
    is named like any call (a call taken without a name is then known to be one that lost it) and not
    counted: it never waits in grpc-core's queue."""
    changes = dict(fields)
    base = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", PATH),
        (":authority", "x"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    kept = [(name, changes.get(name, value)) for name, value in base]
    block = Encoder().encode([(name, value) for name, value in kept if value is not None])
    queue = CoreQueue()
    frames = ClientFrames(queue=queue)
    data = PREFACE + header_frame(1, block)
    passed, _ = frames.feed(data)
    (request,) = requests_seen_by_grpc_core(passed)
    assert request[-1][0] == CALL_FIELD.decode()
    assert len(queue) == 0
    assert not frames.names


def test_a_host_field_stands_for_the_authority() -> None:
    encoder = Encoder()
    block = encoder.encode(
        [(":method", "POST"), (":scheme", "https"), (":path", PATH), ("host", "x"), ("te", "trailers")]
    )
    queue = CoreQueue()
    ClientFrames(queue=queue).feed(PREFACE + header_frame(1, block))
    assert len(queue) == 1


def test_a_new_call_waits_for_room_and_what_follows_it() -> None:
    """Past the bound, the next call waits in the front once its block is whole (decoded: the front knows its
    method), with everything after it (``full``); a trailers block or DATA of a call already handed on do not
    wait; once there is room the rest goes on."""
    queue = CoreQueue(4)  # 2 calls, and room for 2 probes
    frames = ClientFrames(queue=queue)
    frames.host = "10.0.0.1"
    encoder = Encoder()
    first = PREFACE + header_frame(1, call_block(encoder)) + header_frame(3, call_block(encoder))
    passed, more = frames.feed(first)
    assert len(queue) == 2
    assert not frames.full
    assert not more
    rest = data_frame(10, 3) + header_frame(5, call_block(encoder)) + data_frame(10, 5)
    passed, more = frames.feed(rest)
    assert passed == data_frame(10, 3)  # the DATA of call 3 goes on; call 5 and its DATA wait
    assert frames.full
    assert not more
    assert frames.held == len(data_frame(10, 5))
    assert 5 not in frames.streams  # not open until it goes on: a client that leaves abandons nothing
    assert frames.feed(b"") == (b"", False)  # still no room
    assert frames.full
    queue.taken(frames.names[1])
    passed, more = frames.feed(b"")
    assert not frames.full
    assert frames.held == 0
    assert 5 in frames.streams
    seen = requests_seen_by_grpc_core(first + data_frame(10, 3) + passed)
    assert [dict(request)[":path"] for request in seen] == [PATH] * 3
    assert frames.names[5] == int(dict(seen[2])[CALL_FIELD.decode()])
    assert passed.endswith(data_frame(10, 5))


def test_a_health_call_passes_calls_waiting_for_room() -> None:
    """grpc.aio slow (a bound of ``MIN_BOUND`` calls) and the queue at the bound: a client's model call waits in
    the front, another client's ServerReady goes on, named and counted; the model call goes on once calls are
    taken."""
    now = [100.0]
    queue = CoreQueue(400, clock=lambda: now[0])
    backlog = [queue.handed_on("x")]
    for _ in range(64):  # grpc.aio takes a call every 10 ms, with a backlog
        backlog.append(queue.handed_on("x"))
        now[0] += 0.01
        queue.taken(backlog.pop(0))
    assert queue.bound == MIN_BOUND
    counted = backlog + [queue.handed_on("x") for _ in range(MIN_BOUND - 1)]
    model, probe = ClientFrames(queue=queue), ClientFrames(queue=queue)
    model.host, probe.host = "10.0.0.1", "10.0.0.2"
    call = PREFACE + header_frame(1, call_block(Encoder())) + data_frame(10, 1)
    assert model.feed(call) == (PREFACE, False)
    assert model.full
    ready = PREFACE + header_frame(1, call_block(Encoder(), path=f"/{SERVICE_NAME}/ServerReady"))
    passed, _ = probe.feed(ready)
    assert not probe.full
    (request,) = requests_seen_by_grpc_core(passed)
    assert dict(request)[":path"] == f"/{SERVICE_NAME}/ServerReady"
    assert queue.queued(probe.names[1])
    for name in counted[: MIN_BOUND // 2 + 1]:
        queue.taken(name)
    passed, _ = model.feed(b"")
    assert not model.full
    assert [dict(request)[":path"] for request in requests_seen_by_grpc_core(PREFACE + passed)] == [PATH]


@pytest.mark.parametrize("read_size", [1, 7, 13, 1000])
def test_grpc_cores_refusals_of_calls_it_never_queued_are_followed(read_size: int) -> None:
    """An RST_STREAM of grpc-core's with REFUSED_STREAM on a call it has not answered says the call never
    reached its queue; so does a GOAWAY for the streams after its last one. PROTOCOL_ERROR and its kin do
    not (grpc-core resets a call so for a DATA frame past its window or with bad padding after queueing it:
    outside attack rt51): the call counts as abandoned instead; a CANCEL, neither (a call past its deadline,
    counted as such). However the frames are cut into reads."""
    streams = Calls()
    for stream in (1, 3, 5, 7, 9, 11, 13):
        streams.open(stream)
    data = (
        server_frame(0x1, 0x4, 1, b"\x88")  # call 1: answered, then reset
        + server_frame(0x3, 0, 1, (7).to_bytes(4, "big"))
        + server_frame(0x3, 0, 3, (7).to_bytes(4, "big"))  # REFUSED_STREAM
        + server_frame(0x3, 0, 5, (1).to_bytes(4, "big"))  # PROTOCOL_ERROR
        + server_frame(0x3, 0, 7, (2).to_bytes(4, "big"))  # INTERNAL_ERROR
        + server_frame(0x3, 0, 9, (8).to_bytes(4, "big"))  # CANCEL
        + server_frame(0x7, 0, 0, (11).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"debug")
    )
    answers = ServerFrames(streams)
    for at in range(0, len(data), read_size):
        answers.feed(data[at : at + read_size])
    assert streams.never_queued == [3]
    assert streams.broken == 2
    assert streams.last_stream == 11
    assert set(streams) == {11, 13}
