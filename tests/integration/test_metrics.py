"""Prometheus ``/metrics``, request ids and JSON logs, against real servers on loopback ports.

A known mix of inference requests goes to a fresh server over KServe V2 REST, KServe V2 gRPC (unary
and stream) and TF Serving REST: answers, invalid inputs that reach a model, malformed bodies and
unknown models or versions that never do. ``/metrics`` is parsed with prometheus-client's own parser,
and every counter must equal what was sent, by model, version, protocol and status.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import models
from onnxserve.config import ServerConfig, parse_config
from onnxserve.core.manager import Catalog
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from waiting import wait_until

SERVICE = "/inference.GRPCInferenceService"
HEX_ID = re.compile(r"[0-9a-f]{32}")

Labels = tuple[str, str, str, str]  # model, version, protocol, status
Samples = dict[str, list[tuple[dict[str, str], float]]]


# --- helpers -----------------------------------------------------------------------------------------


def scrape(http: httpx.Client) -> Samples:
    """Every sample of ``/metrics``, parsed by prometheus-client, by sample name."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


KEYS = {
    "onnxserve_requests_total": ("model", "version", "protocol", "status"),
    "onnxserve_request_duration_seconds_count": ("model", "version", "phase"),
    "onnxserve_request_duration_seconds_sum": ("model", "version", "phase"),
    "onnxserve_model_state": ("model", "version", "state"),
}


def values(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    """The samples of ``name`` keyed by their labels' values (model, version, then the metric's own)."""
    keys = KEYS.get(name, ("model", "version"))
    found: dict[tuple[str, ...], float] = {}
    for labels, value in samples.get(name, []):
        assert set(labels) == set(keys), labels
        found[tuple(labels[k] for k in keys)] = value
    return found


def add_v2_json(rows: int, width: int = 16) -> dict[str, Any]:
    data = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
    return {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [rows, width], "data": data.reshape(-1).tolist()}
            for n in ("a", "b")
        ]
    }


def add_grpc(rows: int, model: str = "add", width: int = 16) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    data = np.ones((rows, width), dtype="<f4")
    for name in ("a", "b"):
        message.inputs.add(name=name, datatype="FP32", shape=[rows, width])
        message.raw_input_contents.append(data.tobytes())
    return message


def unary(channel: grpc.Channel, method: str) -> Any:
    return channel.unary_unary(
        f"{SERVICE}/{method}",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=lambda b: b,
    )


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def trailing_request_id(call: Any) -> str:
    found = [v for k, v in call.trailing_metadata() or () if k == "x-request-id"]
    assert len(found) == 1, call.trailing_metadata()
    return str(found[0])


@pytest.fixture
def server(start_server: Any, numeric_config: ServerConfig) -> RunningServer:
    """A fresh server: its counters start at zero."""
    running: RunningServer = start_server(numeric_config)
    return running


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http_url, timeout=30) as client:
        yield client


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_address) as ch:
        yield ch


# --- metrics -----------------------------------------------------------------------------------------


def send_known_mix(http: httpx.Client, channel: grpc.Channel) -> Counter[Labels]:
    """Send the mix; returns what the counters must say."""
    sent: Counter[Labels] = Counter()

    def expect(response: httpx.Response, status: int, labels: Labels) -> None:
        assert response.status_code == status, response.text
        sent[labels] += 1

    # KServe V2 REST
    for _ in range(3):
        expect(http.post("/v2/models/add/infer", json=add_v2_json(2)), 200, ("add", "1", "v2_rest", "ok"))
    fixed = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}]}
    for _ in range(2):
        expect(http.post("/v2/models/fixed/versions/1/infer", json=fixed), 200, ("fixed", "1", "v2_rest", "ok"))
    for _ in range(2):  # reaches the model: the core counts it
        bad_shape = add_v2_json(2, width=15)
        expect(http.post("/v2/models/add/infer", json=bad_shape), 400, ("add", "1", "v2_rest", "invalid_input"))
    malformed = http.post("/v2/models/add/infer", content=b"{not json", headers={"Content-Type": "application/json"})
    expect(malformed, 400, ("add", "", "v2_rest", "invalid_input"))
    expect(http.post("/v2/models/nope/infer", json=add_v2_json(1)), 404, ("", "", "v2_rest", "not_found"))
    expect(http.post("/v2/models/add/versions/7/infer", json=add_v2_json(1)), 404, ("add", "", "v2_rest", "not_found"))

    # KServe V2 gRPC, unary
    infer = unary(channel, "ModelInfer")
    for _ in range(2):
        infer(add_grpc(2))
        sent["add", "1", "v2_grpc", "ok"] += 1
    assert rpc_error(lambda: infer(b"\xff\xff\xff")).code() is grpc.StatusCode.INVALID_ARGUMENT
    sent["", "", "v2_grpc", "invalid_input"] += 1
    assert rpc_error(lambda: infer(add_grpc(1, model="nope"))).code() is grpc.StatusCode.NOT_FOUND
    sent["", "", "v2_grpc", "not_found"] += 1
    assert rpc_error(lambda: infer(add_grpc(1, width=15))).code() is grpc.StatusCode.INVALID_ARGUMENT
    sent["add", "1", "v2_grpc", "invalid_input"] += 1

    # KServe V2 gRPC, stream: one answer, one unknown model, one malformed message
    stream = channel.stream_stream(
        f"{SERVICE}/ModelStreamInfer",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    answers = list(stream(iter([add_grpc(2), add_grpc(1, model="nope"), b"\xff\xff\xff"])))
    assert [bool(a.error_message) for a in answers] == [False, True, True]
    sent["add", "1", "v2_grpc", "ok"] += 1
    sent["", "", "v2_grpc", "not_found"] += 1
    sent["", "", "v2_grpc", "invalid_input"] += 1

    # TF Serving REST
    for _ in range(2):
        expect(
            http.post("/v1/models/fixed:predict", json={"instances": [[1, 2, 3], [4, 5, 6]]}),
            200,
            ("fixed", "1", "tfserving_rest", "ok"),
        )
    expect(
        http.post("/v1/models/nope:predict", json={"instances": [[1]]}), 404, ("", "", "tfserving_rest", "not_found")
    )
    bad_json = http.post("/v1/models/fixed:predict", content=b"[", headers={"Content-Type": "application/json"})
    expect(bad_json, 400, ("fixed", "", "tfserving_rest", "invalid_input"))
    expect(
        http.post("/v1/models/fixed:regress", json={"examples": []}),
        400,
        ("fixed", "", "tfserving_rest", "invalid_input"),
    )
    expect(
        http.post("/v1/models/fixed/versions/1:predict", json={"instances": [[1, 2]]}),
        400,
        ("fixed", "1", "tfserving_rest", "invalid_input"),
    )

    # Not inference requests: never counted
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get("/v2/models/add").status_code == 200
    assert http.get("/v2/models/nope").status_code == 404
    assert http.get("/v1/models/fixed").status_code == 200
    assert http.get("/no/such/endpoint").status_code == 404
    unary(channel, "ServerLive")(pb.ServerLiveRequest())
    return sent


def test_counters_match_the_requests_sent(http: httpx.Client, channel: grpc.Channel) -> None:
    assert values(scrape(http), "onnxserve_requests_total") == {}
    sent = send_known_mix(http, channel)
    samples = scrape(http)

    counted = values(samples, "onnxserve_requests_total")
    assert counted == {labels: float(n) for labels, n in sent.items()}

    # every counted request is in the total histogram; queue and compute hold the answered ones
    per_version: Counter[tuple[str, str]] = Counter()
    answered: Counter[tuple[str, str]] = Counter()
    for (model, version, _, status), n in sent.items():
        per_version[model, version] += n
        if status == "ok":
            answered[model, version] += n
    counts = values(samples, "onnxserve_request_duration_seconds_count")
    assert {k[:2]: v for k, v in counts.items() if k[2] == "total"} == per_version
    for phase in ("queue", "compute"):
        assert {k[:2]: v for k, v in counts.items() if k[2] == phase} == answered
    sums = values(samples, "onnxserve_request_duration_seconds_sum")
    assert sums["add", "1", "total"] > 0
    assert sums["add", "1", "compute"] > 0

    # rows executed: add answered 3 x 2 rows over REST and 3 x 2 rows over gRPC
    assert values(samples, "onnxserve_batch_size_sum")["add", "1"] == 12
    assert 1 <= values(samples, "onnxserve_batch_size_count")["add", "1"] <= 6
    buckets = {labels["le"] for labels, _ in samples["onnxserve_batch_size_bucket"]}
    assert {"1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "+Inf"} <= buckets

    # scraping again counts nothing more
    assert values(scrape(http), "onnxserve_requests_total") == counted


def test_body_refusals_are_counted_on_inference_endpoints_only(http: httpx.Client) -> None:
    """A body refused before its endpoint runs (media type, encoding) is an error kind: answered with the
    status of the protocol's table and counted by the service when the path is an inference endpoint."""
    pickle = {"Content-Type": "application/pickle"}
    bad_gzip = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    assert http.post("/v2/models/add/infer", content=b"x", headers=pickle).status_code == 415
    assert http.post("/v1/models/fixed/versions/1:predict", content=b"x", headers=pickle).status_code == 415
    refused = http.post("/v2/models/nope/infer", content=b"not gzip", headers=bad_gzip)
    assert refused.status_code == 400
    assert "not valid gzip" in refused.json()["error"]
    assert http.post("/v2/repository/index", content=b"x", headers=pickle).status_code == 415  # not inference
    assert http.post("/no/such/endpoint", content=b"x", headers=pickle).status_code == 415
    assert values(scrape(http), "onnxserve_requests_total") == {
        ("add", "", "v2_rest", "unsupported_media_type"): 1.0,
        ("fixed", "1", "tfserving_rest", "unsupported_media_type"): 1.0,
        ("", "", "v2_rest", "invalid_input"): 1.0,
    }
    # and the server keeps serving
    assert http.post("/v2/models/add/infer", json=add_v2_json(1)).status_code == 200


def test_model_state_load_duration_and_queue_depth(http: httpx.Client, numeric_config: ServerConfig) -> None:
    samples = scrape(http)
    names = {m.name for m in numeric_config.model_config_list}
    state = values(samples, "onnxserve_model_state")
    for name in names:
        assert state[name, "1", "READY"] == 1
        assert state[name, "1", "LOADING"] == 0
        assert state[name, "1", "UNAVAILABLE"] == 0
    assert sum(state.values()) == len(names)  # exactly one state per version
    load = values(samples, "onnxserve_model_load_duration_seconds")
    assert set(load) == {(n, "1") for n in names}
    assert all(seconds > 0 for seconds in load.values())
    assert values(samples, "onnxserve_queue_depth") == {(n, "1"): 0 for n in names}


def _offset_body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}


def test_a_versions_series_leave_when_it_unloads(tmp_path: Path) -> None:
    """Outside attack rt25: /metrics kept every series of every version that ever served (about 83 lines a
    version: 100 versions deployed one after the other took it from 148 lines to 7,544). A version's series
    leave when it unloads; the model's own (``version=""``) and other versions' stay."""
    for name, offset in (("a", 1.0), ("b", 2.0)):
        models.write_version(tmp_path, name, 1, models.offset_model(offset))
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("a", "b")
    )
    catalog = Catalog(repository=tmp_path)
    server = start_in_background(catalog.read(), settings, catalog)
    try:
        with httpx.Client(base_url=server.http_url, timeout=30) as http:
            for name in ("a", "b"):
                assert http.post(f"/v2/models/{name}/versions/1/infer", json=_offset_body()).status_code == 200
            assert http.post("/v2/models/a/versions/7/infer", json=_offset_body()).status_code == 404

            def versions(samples: Samples) -> set[tuple[str, str]]:
                return {
                    (labels.get("model", ""), labels.get("version", ""))
                    for found in samples.values()
                    for labels, _ in found
                    if "version" in labels
                }

            assert {("a", "1"), ("b", "1"), ("a", "")} <= versions(scrape(http))
            assert http.post("/v2/repository/models/a/unload").status_code == 200
            wait_until(lambda: ("a", "1") not in versions(scrape(http)), what="version a/1's series to leave")
            samples = scrape(http)
            assert {("b", "1"), ("a", "")} <= versions(samples)  # the model's own series, the other model's
            requests = values(samples, "onnxserve_requests_total")
            assert requests["a", "", "v2_rest", "not_found"] == 1
            assert requests["b", "1", "v2_rest", "ok"] == 1
            assert values(samples, "onnxserve_model_state")["b", "1", "READY"] == 1
            assert http.post("/v2/repository/models/a/load").status_code == 200  # back: its series start again
            assert http.post("/v2/models/a/versions/1/infer", json=_offset_body()).status_code == 200
            assert values(scrape(http), "onnxserve_requests_total")["a", "1", "v2_rest", "ok"] == 1
    finally:
        server.stop()


def test_queue_depth_counts_waiting_requests(start_server: Any, tmp_path: Path) -> None:
    """Requests queued behind a slow batch show in the gauge while they wait, and leave it after."""
    models.write_version(tmp_path, "slowb", 1, models.slow_batch_model(20000))
    config = parse_config(
        {"model_config_list": [{"name": "slowb", "base_path": "slowb", "max_batch_size": 1}]}, "test", tmp_path
    )
    server: RunningServer = start_server(config)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 256], "data": [0.5] * 256}]}
    statuses: list[int] = []

    def call() -> None:
        with httpx.Client(base_url=server.http_url, timeout=120) as c:
            statuses.append(c.post("/v2/models/slowb/infer", json=body).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    deepest = 0.0
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        while any(t.is_alive() for t in threads):
            deepest = max(deepest, values(scrape(http), "onnxserve_queue_depth")["slowb", "1"])
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert statuses == [200] * 4
        assert deepest >= 1
        samples = scrape(http)
    assert values(samples, "onnxserve_queue_depth") == {("slowb", "1"): 0}
    assert values(samples, "onnxserve_batch_size_count") == {("slowb", "1"): 4}


def test_openmetrics_when_asked(http: httpx.Client) -> None:
    response = http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


# --- request ids -------------------------------------------------------------------------------------


def test_http_request_id_echoed_generated_or_replaced(http: httpx.Client) -> None:
    given = http.post("/v2/models/add/infer", json=add_v2_json(1), headers={"X-Request-ID": "client-42:a.b_C"})
    assert given.status_code == 200
    assert given.headers["x-request-id"] == "client-42:a.b_C"

    first = http.get("/v2/health/live").headers["x-request-id"]
    second = http.get("/v2/health/live").headers["x-request-id"]
    assert HEX_ID.fullmatch(first)
    assert HEX_ID.fullmatch(second)
    assert first != second

    longest = "r" * 64
    assert http.get("/v2/health/live", headers={"X-Request-ID": longest}).headers["x-request-id"] == longest
    too_long = http.get("/v2/health/live", headers={"X-Request-ID": "r" * 65})
    assert HEX_ID.fullmatch(too_long.headers["x-request-id"])
    # Outside attack: an id with spaces and brackets wrote a fake record inside its own log line.
    spoof = "x] ok. 2026-12-06 09:00:00,000 CRITICAL onnxserve.auth [y"
    assert HEX_ID.fullmatch(http.get("/v2/health/live", headers={"X-Request-ID": spoof}).headers["x-request-id"])
    with_space = http.get("/v2/health/live", headers={"X-Request-ID": "client id 42"})
    assert HEX_ID.fullmatch(with_space.headers["x-request-id"])
    not_printable = http.get("/v2/health/live", headers={"X-Request-ID": "tab\there"})
    assert HEX_ID.fullmatch(not_printable.headers["x-request-id"])
    not_ascii = http.get("/v2/health/live", headers={b"X-Request-ID": "caf\u00e9".encode("latin-1")})
    assert HEX_ID.fullmatch(not_ascii.headers["x-request-id"])


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v2/models/nope/infer", json.dumps(add_v2_json(1)).encode(), 404),
        ("POST", "/v2/models/add/infer", b"{not json", 400),
        ("POST", "/v1/models/fixed:predict", b"[", 400),
        ("GET", "/no/such/endpoint", b"", 404),
        ("DELETE", "/v2/health/live", b"", 405),
        ("GET", "/metrics", b"", 200),
    ],
)
def test_http_request_id_on_every_response(
    http: httpx.Client, method: str, path: str, body: bytes, status: int
) -> None:
    response = http.request(method, path, content=body, headers={"X-Request-ID": "err-1"})
    assert response.status_code == status
    assert response.headers["x-request-id"] == "err-1"
    generated = http.request(method, path, content=body)
    assert HEX_ID.fullmatch(generated.headers["x-request-id"])


def test_grpc_request_id_in_trailing_metadata(channel: grpc.Channel) -> None:
    infer = unary(channel, "ModelInfer")
    _, call = infer.with_call(add_grpc(1), metadata=(("x-request-id", "grpc-42"),))
    assert trailing_request_id(call) == "grpc-42"
    _, call = infer.with_call(add_grpc(1))
    assert HEX_ID.fullmatch(trailing_request_id(call))

    error = rpc_error(lambda: infer(add_grpc(1, model="nope"), metadata=(("x-request-id", "grpc-err"),)))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert trailing_request_id(error) == "grpc-err"
    error = rpc_error(lambda: infer(b"\xff\xff\xff", metadata=(("x-request-id", "x" * 129),)))
    assert HEX_ID.fullmatch(trailing_request_id(error))

    _, call = unary(channel, "ServerLive").with_call(pb.ServerLiveRequest(), metadata=(("x-request-id", "live"),))
    assert trailing_request_id(call) == "live"

    stream = channel.stream_stream(
        f"{SERVICE}/ModelStreamInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    responses = stream(iter([add_grpc(1)]), metadata=(("x-request-id", "stream-7"),))
    assert len(list(responses)) == 1
    assert trailing_request_id(responses) == "stream-7"


# --- JSON logs ---------------------------------------------------------------------------------------


def test_json_logs_carry_the_request_id(numeric_repository: Path) -> None:
    """``onnxserve serve --log-format json``: every stderr line is a JSON object; request lines carry the id."""
    command = [
        sys.executable,
        "-m",
        "onnxserve.cli",
        "serve",
        "--model-repository",
        str(numeric_repository),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--drain-timeout",
        "5",
    ]
    lines: list[str] = []
    ports: dict[str, str] = {}
    started = threading.Event()
    env = {**os.environ, "NO_COLOR": "1"}
    with subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env) as process:

        def read() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                lines.append(line)
                http_port = re.search(r"HTTP \(.*\) on http://127\.0\.0\.1:(\d+)", line)
                grpc_port = re.search(r"gRPC \(KServe V2\) on 127\.0\.0\.1:(\d+)", line)
                if http_port:
                    ports["http"] = http_port.group(1)
                if grpc_port:
                    ports["grpc"] = grpc_port.group(1)
                    started.set()
            started.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert started.wait(120), "".join(lines)
            assert "http" in ports, "".join(lines)
            with httpx.Client(base_url=f"http://127.0.0.1:{ports['http']}", timeout=30) as client:
                ok = client.post("/v2/models/add/infer", json=add_v2_json(1), headers={"X-Request-ID": "log-ok"})
                assert ok.status_code == 200
                missing = client.post("/v2/models/nope/infer", json=add_v2_json(1), headers={"X-Request-ID": "log-404"})
                assert missing.status_code == 404
                generated = client.get("/v2/health/ready").headers["x-request-id"]
            with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as ch:
                unary(ch, "ModelInfer")(add_grpc(1), metadata=(("x-request-id", "log-grpc"),))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                reader.join(timeout=10)
    assert process.returncode == 0, "".join(lines)

    records = []
    for line in lines:
        assert line.strip(), "an empty line on stderr"
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "request_id" in record:
            by_id.setdefault(record["request_id"], []).append(record)
    assert any("/v2/models/add/infer 200" in r["message"] for r in by_id["log-ok"]), by_id
    assert any("/v2/models/nope/infer 404" in r["message"] for r in by_id["log-404"]), by_id
    assert any("ModelInfer OK" in r["message"] for r in by_id["log-grpc"]), by_id
    assert generated in by_id
    assert any("serving model add" in r["message"] and "request_id" not in r for r in records)
    assert all(r["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"} for r in records)
