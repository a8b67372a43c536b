"""Log lines a client can repeat at will, against a real server process (outside attack rt24).

- Every error answered with a path hidden from the client wrote a WARNING: 20,338 lines (4.35 MB) in 10 s
  over HTTP, 9,966 over gRPC, from four clients asking for a model version or a model named ``/etc/a/b``.
- Every batch that one request's values failed wrote an INFO line: 323 lines in 10 s.

Each kind is now reported at most every 10 s, with how many there were since its last line.

- grpc-core wrote an INFO line of its own to stderr for every failed TLS handshake on the gRPC port: 36,716
  lines (7.8 MB) in 8 s from plaintext connections. The server keeps grpc-core's lines to ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
import requests
from harness import MODEL_INFER, CappedServer, serve_config
from raw_h2 import RawGrpcConnection

import models
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from waiting import wait_until

REPEATS = 200

EVERY_SECONDS = 2.0
"""How often a kind of line may be written: ``--log-repeat-seconds`` (10 s by default)."""

HIDDEN = "not_found error answered with a path hidden"

FAILED_BATCH = re.compile(r"model lookup/1: a batch of \d+ failed")

COUNTED = re.compile(r"\(([\d,]+) such since the last line; reported every 2 s at most\)")


def _lookup(repository: Path, *extra: str) -> CappedServer:
    models.write_version(repository, "lookup", 1, models.lookup_model())
    entry = {
        "name": "lookup",
        "base_path": "lookup",
        "max_batch_size": 8,
        "dynamic_batching": {"max_queue_delay_us": 20_000, "preferred_batch_sizes": [4]},
    }
    return serve_config(repository, [entry], "--log-repeat-seconds", str(EVERY_SECONDS), *extra)


def _lines(server: CappedServer, kind: Callable[[str], bool]) -> list[str]:
    return [line for line in server.log().splitlines() if kind(line)]


def _reported(lines: list[str]) -> int:
    """How many events ``lines`` report: one each, or the count their throttle adds."""
    counts = (COUNTED.search(line) for line in lines)
    return sum(int(found.group(1).replace(",", "")) if found else 1 for found in counts)


def _at_most(started: float) -> int:
    """How many lines of a kind may have been written since ``started``: one, then one an interval."""
    return 2 + int((time.monotonic() - started) / EVERY_SECONDS)


def _hidden(line: str) -> bool:
    return HIDDEN in line


def _failed_batch(line: str) -> bool:
    return FAILED_BATCH.search(line) is not None


def _refused_on_both_ports(server: CappedServer, times: int) -> None:
    """``times`` HTTP requests and ``times`` gRPC calls answered NOT_FOUND with a path hidden."""
    with requests.Session() as session:
        for _ in range(times):
            answer = session.get(f"{server.http_url}/web/api/models/lookup/diff?a=/etc/a/b&b=1", timeout=30)
            assert answer.status_code == 404, answer.text
            assert "<path>" in answer.json()["error"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        metadata = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        for _ in range(times):
            with pytest.raises(grpc.RpcError) as refused:
                metadata(pb.ModelMetadataRequest(name="/etc/a/b"), timeout=30)
            assert refused.value.code() is grpc.StatusCode.NOT_FOUND
            assert "<path>" in str(refused.value.details())


def test_errors_answered_with_a_path_hidden_are_logged_a_few_times_with_their_count(tmp_path: Path) -> None:
    with _lookup(tmp_path) as server:
        started = time.monotonic()
        _refused_on_both_ports(server, REPEATS)
        flood = _lines(server, _hidden)
        assert 1 <= len(flood) <= _at_most(started), flood[:5]  # before: 400
        assert "'/etc/a/b'" in flood[0]  # the operator still sees what was hidden from the client
        time.sleep(EVERY_SECONDS)  # the next one is reported, with those counted since the last line
        answer = requests.get(f"{server.http_url}/web/api/models/lookup/diff?a=/etc/a/b&b=1", timeout=30)
        assert answer.status_code == 404, answer.text
        wait_until(lambda: len(_lines(server, _hidden)) > len(flood), what="the next line")
        lines = _lines(server, _hidden)
    assert COUNTED.search(lines[len(flood)]), lines[len(flood)]
    assert _reported(lines) == 2 * REPEATS + 1  # every one, in a handful of lines


async def _rounds(url: str, rounds: int) -> list[int]:
    """``rounds`` times four requests at once, two of them with an index outside the table: the batches
    they are merged into fail, and run again one request at a time."""
    bodies = [
        {"inputs": [{"name": "index", "shape": [1, 1], "datatype": "INT64", "data": [index]}]} for index in (0, 7, 2, 9)
    ]
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=4)) as client:
        for _ in range(rounds):
            answers = await asyncio.gather(*(client.post(url, json=body) for body in bodies))
            statuses += [answer.status_code for answer in answers]
    return statuses


def test_failed_batches_are_logged_a_few_times_with_their_count(tmp_path: Path) -> None:
    with _lookup(tmp_path) as server:
        url = f"{server.http_url}/v2/models/lookup/infer"
        started = time.monotonic()
        statuses = asyncio.run(_rounds(url, REPEATS // 4))
        assert statuses == [200, 400, 200, 400] * (REPEATS // 4)
        flood = _lines(server, _failed_batch)
        assert 1 <= len(flood) <= _at_most(started), flood[:5]  # before: one a failed batch
        time.sleep(EVERY_SECONDS)
        for _ in range(50):  # until a batch fails again (four requests at once are almost always merged)
            asyncio.run(_rounds(url, 1))
            if len(lines := _lines(server, _failed_batch)) > len(flood):
                break
        assert len(lines) == len(flood) + 1, lines
    found = COUNTED.search(lines[-1])
    assert found, lines[-1]  # the batches that failed meanwhile are counted in it
    assert _reported(lines) <= REPEATS // 4 + 50


def test_failed_tls_handshakes_on_the_grpc_port_write_nothing(
    tmp_path: Path, tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)  # the server sets grpc-core's level itself
    with _lookup(tmp_path, "--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"])) as server:
        before = len(server.log_lines)
        for _ in range(50):  # an HTTP/2 preface in plaintext: the TLS handshake fails
            with socket.create_connection((server.host, server.grpc_port), timeout=10) as sock:
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                with contextlib.suppress(OSError):
                    while sock.recv(4096):
                        pass
        ca = grpc.ssl_channel_credentials(tls_files["ca"].read_bytes())
        with grpc.secure_channel(server.grpc_target, ca) as channel:  # the port still serves over TLS
            ready = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=pb.ServerReadyRequest.SerializeToString,
                response_deserializer=pb.ServerReadyResponse.FromString,
            )
            assert ready(pb.ServerReadyRequest(), timeout=30).ready
        # a line of the server's own after them: stderr is one pipe, so grpc-core's lines would be before it
        answer = requests.get(
            f"https://{server.host}:{server.http_port}/web/api/models/lookup/diff?a=/etc/a/b&b=1",
            verify=str(tls_files["ca"]),
            timeout=30,
        )
        assert answer.status_code == 404
        wait_until(lambda: any(HIDDEN in line for line in server.log_lines[before:]), what="the server's line")
        written = server.log_lines[before:]
    assert not [line for line in written if "Handshake failed" in line], written[:3]  # before: one each
    assert len(written) <= 5, written


def test_calls_grpc_core_refuses_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc-core answers a call with an unknown ``grpc-encoding`` itself (INTERNAL, before any handler) and
    wrote an ERROR line of its own to stderr for each: 300 calls, 306 lines (outside attack rt34)."""
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)  # the server sets grpc-core's level itself
    with _lookup(tmp_path) as server:
        before = len(server.log_lines)
        connection = RawGrpcConnection(server.host, server.grpc_port)
        try:
            for _ in range(5):
                stream = connection.open_call(MODEL_INFER, (("grpc-encoding", "snappy"),))
                connection.send_whole(stream, b"\x00" * 16, compressed=True)
                while not connection.calls[stream].ended and not connection.closed:
                    connection.pump(1.0, once=True)
                assert connection.calls[stream].ended
        finally:
            connection.close()
        with grpc.insecure_channel(server.grpc_target) as channel:  # a line of the server's own after them
            metadata = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelMetadata",
                request_serializer=pb.ModelMetadataRequest.SerializeToString,
                response_deserializer=pb.ModelMetadataResponse.FromString,
            )
            with pytest.raises(grpc.RpcError):
                metadata(pb.ModelMetadataRequest(name="/etc/a/b"), timeout=30)
        wait_until(lambda: any(HIDDEN in line for line in server.log_lines[before:]), what="the server's line")
        written = server.log_lines[before:]
    assert not [line for line in written if "grpc-encoding" in line], written[:3]  # before: one a call
    assert len(written) <= 3, written
