"""Compressed gRPC request messages are inflated by the server within its limits, off the event loop.

grpc inflated a message flagged compressed (``grpc-encoding: gzip``) itself, at any ratio, before a
handler saw it: 61 KB of gzip made a 60 MiB ModelInfer message, and 32 such calls at once held gRPC probes
6.6 s, 8 connections sending them in turn 1.6 s at the median (outside attack rt33 F2), where the same
messages uncompressed kept probes under 0.5 s. The server turns grpc's inflation off and inflates each
message itself, in the codec threads past its first 256 KiB, refused past --grpc-max-message-bytes; real
clients (tritonclient's ``compression_algorithm``) are served as before.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import MODEL_INFER, CappedServer, serve_capped
from raw_h2 import RawGrpcConnection

import models
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

PROBE_BOUND = 1.0
ELEMENTS = 15 * 1024 * 1024  # 60 MiB of FP32 zeros: 61 KB of gzip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    repository = tmp_path_factory.mktemp("compressed")
    models.write_version(repository, "total", 1, models.total_model())
    with serve_capped(repository, "--grpc-max-message-bytes", str(64 * 1024**2)) as running:
        yield running


def _total_request(elements: int) -> bytes:
    request = pb.ModelInferRequest(model_name="total")
    request.inputs.add(name="x", datatype="FP32", shape=[elements])
    request.raw_input_contents.append(np.zeros(elements, np.float32).tobytes())
    return request.SerializeToString()


def _send_compressed(server: CappedServer, message: bytes, encoding: str = "gzip") -> tuple[int | None, str]:
    """One ModelInfer call over raw HTTP/2 whose message is ``message``, flagged compressed with ``encoding``;
    its grpc-status and message."""
    connection = RawGrpcConnection(server.host, server.grpc_port)
    try:
        stream = connection.open_call(MODEL_INFER, (("grpc-encoding", encoding),))
        connection.send_whole(stream, message, compressed=True)
        deadline = time.monotonic() + 120
        while not connection.calls[stream].ended and time.monotonic() < deadline and not connection.closed:
            connection.pump(1.0, once=True)
        outcome = connection.calls[stream]
        return outcome.status, outcome.message
    finally:
        connection.close()


def test_compressed_messages_that_inflate_a_thousandfold_leave_probes_answering(server: CappedServer) -> None:
    bomb = gzip.compress(_total_request(ELEMENTS), compresslevel=9)
    assert len(bomb) < 100_000
    outcomes: list[tuple[int | None, str]] = []

    def send() -> None:
        outcomes.append(_send_compressed(server, bomb))

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    slowest = 0.0
    while any(thread.is_alive() for thread in threads):
        slowest = max(slowest, server.grpc_probe_seconds(), server.probe_seconds(timeout=30))
    for thread in threads:
        thread.join(timeout=120)
    codes = {status for status, _ in outcomes}
    assert len(outcomes) == 16
    assert codes <= {grpc.StatusCode.OK.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}, outcomes
    assert grpc.StatusCode.OK.value[0] in codes  # the room and the budget let some through, one after another
    assert slowest < PROBE_BOUND  # before: 6.6 s with 32 of them
    assert server.alive(), server.log()[-2000:]


def test_a_compressed_message_past_the_message_limit_is_refused_as_it_inflates(tmp_path: Path) -> None:
    models.write_version(tmp_path, "total", 1, models.total_model())
    with serve_capped(tmp_path, "--grpc-max-message-bytes", str(1024**2)) as capped:
        status, message = _send_compressed(capped, gzip.compress(_total_request(512 * 1024)))  # 2 MiB inflated
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "the gzip request message inflates to more than 1048576 bytes (--grpc-max-message-bytes)" in message
        status, _ = _send_compressed(capped, gzip.compress(_total_request(1000)))
        assert status == grpc.StatusCode.OK.value[0]


@pytest.mark.parametrize(
    ("encoding", "message", "words"),
    [
        ("gzip", b"\x1f\x8b this is no gzip stream", "the gRPC message is not valid gzip data"),
        ("gzip", gzip.compress(b"", mtime=0) * 65, "the gzip gRPC message holds more than 64 members"),
        ("gzip", gzip.compress(b"x" * 1000)[:-20], "the gzip gRPC message ends before its compressed data does"),
    ],
)
def test_bad_compressed_messages_are_invalid_argument(
    server: CappedServer, encoding: str, message: bytes, words: str
) -> None:
    status, said = _send_compressed(server, message, encoding)
    assert status == grpc.StatusCode.INVALID_ARGUMENT.value[0], said
    assert words in said
    assert server.grpc_probe_seconds() < PROBE_BOUND


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_messages_a_grpc_client_compresses_are_served(server: CappedServer, compression: grpc.Compression) -> None:
    request = pb.ModelInferRequest(model_name="total")
    request.inputs.add(name="x", datatype="FP32", shape=[3])
    request.raw_input_contents.append(np.array([1.0, 2.0, 3.5], np.float32).tobytes())
    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = channel.unary_unary(
            MODEL_INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        answer = infer(request, timeout=30, compression=compression)
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [6.5]


def test_a_plain_message_that_looks_like_a_zlib_header_is_read_as_sent(server: CappedServer) -> None:
    """Field 15 as a varint (0x78) then a byte that makes the pair a multiple of 31: zlib's header, but no
    zlib stream; unknown fields are skipped, and the message is served."""
    request = pb.ModelInferRequest(model_name="total")
    request.inputs.add(name="x", datatype="FP32", shape=[1])
    request.raw_input_contents.append(np.array([2.0], np.float32).tobytes())
    plain = b"\x78\x01" + request.SerializeToString()  # 0x7801 % 31 == 0
    assert zlib.decompressobj().decompress(plain[:2]) == b""
    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = channel.unary_unary(MODEL_INFER, response_deserializer=pb.ModelInferResponse.FromString)
        answer = infer(plain, timeout=30)
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [2.0]
