"""Soak: mixed traffic, reloads and bad requests against a real ``onnxserve serve`` for a set time.

``make soak`` or ``python -m bench.soak [--minutes 10]``. The server runs as a subprocess in poll mode
over a temporary repository. Paced client threads send, all at once:

- KServe V2 REST JSON, V2 REST binary tensors, V2 gRPC and TF Serving REST requests to ``add``
  (each answer checked against numpy);
- requests to ``flip``, whose version 2 is added and removed every ``--reload-secs`` (the poll picks it
  up; each answer must come from version 1 or 2);
- text requests to the demo model (when ``models/minilm`` has been prepared, e.g. by ``make demo``);
- bad requests (malformed JSON and protobuf, unknown models, wrong shapes and datatypes, lying sizes),
  which must be refused with a 4xx / client-error code.

The server's RSS is sampled every second. The run fails (exit status 1) when any good request fails or
answers wrongly, any bad request gets a 5xx or a server error code, the RSS grows by more than
``--max-rss-growth-mib`` over the second half (median of the last samples against the median of the
first samples of that half, so the first half is warm-up), or the p99 latency of the steady traffic (the four
protocols to ``add``, pooled) in the last quarter exceeds ``--max-p99-ratio`` x its p99 in the second
quarter plus ``--p99-slack-ms``. The
summary is printed and written to ``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import onnx.parser
import orjson

from bench.server import HOST, free_port, log_tail, stop_process_group
from bench.settings import ROOT
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

RESULTS = ROOT / "bench" / "results"
SAMPLE_SECONDS = 1.0
EDGE_SAMPLES = 10
"""RSS samples whose median stands for the start (and the end) of the second half."""

Check = Callable[[], tuple[bool, str]]
"""One request: (as expected?, what was wrong)."""


@dataclass(frozen=True)
class Limits:
    max_rss_growth_mib: float = 64.0
    max_p99_ratio: float = 2.0
    p99_slack_ms: float = 25.0


@dataclass
class Record:
    kind: str
    at: float  # seconds since the start
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since the start, bytes)
    reloads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)


# --- models and repository ---------------------------------------------------------------------------


def _parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f'<ir_version: 9, opset_import: ["" : 17]>\n{text}')
    onnx.checker.check_model(model, full_check=True)
    return model


def add_model() -> onnx.ModelProto:
    return _parse(
        """
        add (float[batch, 16] a, float[batch, 16] b) => (float[batch, 16] sum) {
            sum = Add(a, b)
        }
        """
    )


def offset_model(offset: float) -> onnx.ModelProto:
    return _parse(
        f"""
        flip (float[batch, 1] x) => (float[batch, 1] y) {{
            shift = Constant <value = float[1] {{{offset}}}> ()
            y = Add(x, shift)
        }}
        """
    )


def write_version(base: Path, version: int, model: onnx.ModelProto) -> None:
    """``base/<version>/model.onnx``, written beside and renamed into place (never seen half-written)."""
    partial = base / f".{version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    onnx.save(model, partial / "model.onnx")
    partial.rename(base / str(version))


def prepare_repository(root: Path, text_model: Path | None) -> Path:
    write_version(root / "add", 1, add_model())
    write_version(root / "flip", 1, offset_model(1.0))
    entries: list[dict[str, Any]] = [
        {"name": "add", "base_path": "add", "max_batch_size": 8, "dynamic_batching": {"max_queue_size": 256}},
        {"name": "flip", "base_path": "flip", "max_batch_size": 4},
    ]
    if text_model is not None:
        shutil.copytree(text_model, root / "minilm" / "1")
        entries.append({"name": "minilm", "base_path": "minilm", "max_batch_size": 8})
    config = root / "config.json"
    config.write_bytes(orjson.dumps({"model_config_list": entries}))
    return config


# --- the server ----------------------------------------------------------------------------------------


class SoakServer:
    """``onnxserve serve --config CONFIG --model-control-mode poll`` on free loopback ports."""

    def __init__(self, config: Path, log: Path, poll_secs: float) -> None:
        self.config = config
        self.log = log
        self.poll_secs = poll_secs
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def start(self) -> None:
        command = [
            str(ROOT / ".venv" / "bin" / "onnxserve"),
            "serve",
            "--config",
            str(self.config),
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            str(self.poll_secs),
            "--log-level",
            "warning",
        ]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"onnxserve exited with status {self.process.returncode}:\n{log_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"onnxserve was not ready after 120 s:\n{log_tail(self.log)}")

    def rss(self) -> int:
        """The server's resident set in bytes (0 once it is gone)."""
        assert self.process is not None
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return 0
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


# --- traffic ---------------------------------------------------------------------------------------------


def _rows(rng: np.random.Generator) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rows = int(rng.integers(1, 4))
    a = rng.standard_normal((rows, 16)).astype(np.float32)
    b = rng.standard_normal((rows, 16)).astype(np.float32)
    return a, b


def _close(got: Any, want: np.ndarray[Any, Any]) -> bool:
    return bool(np.allclose(np.asarray(got, dtype=np.float32).reshape(want.shape), want, rtol=1e-5, atol=1e-6))


def v2_json(client: httpx.Client, rng: np.random.Generator) -> Check:
    def check() -> tuple[bool, str]:
        a, b = _rows(rng)
        tensors = [
            {"name": n, "shape": list(v.shape), "datatype": "FP32", "data": v.ravel().tolist()}
            for n, v in (("a", a), ("b", b))
        ]
        answer = client.post("/v2/models/add/infer", json={"inputs": tensors})
        if answer.status_code != 200:
            return False, f"{answer.status_code} {answer.text[:200]}"
        return _close(answer.json()["outputs"][0]["data"], a + b), "wrong sum"

    return check


def v2_binary(client: httpx.Client, rng: np.random.Generator) -> Check:
    def check() -> tuple[bool, str]:
        a, b = _rows(rng)
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": n,
                        "shape": list(v.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": v.nbytes},
                    }
                    for n, v in (("a", a), ("b", b))
                ],
                "outputs": [{"name": "sum", "parameters": {"binary_data": True}}],
            }
        )
        answer = client.post(
            "/v2/models/add/infer",
            content=header + a.tobytes() + b.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
        )
        if answer.status_code != 200:
            return False, f"{answer.status_code} {answer.text[:200]}"
        length = int(answer.headers["Inference-Header-Content-Length"])
        return _close(np.frombuffer(answer.content[length:], dtype=np.float32), a + b), "wrong sum"

    return check


def v2_grpc(channel: grpc.Channel, rng: np.random.Generator) -> Check:
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )

    def check() -> tuple[bool, str]:
        a, b = _rows(rng)
        request = pb.ModelInferRequest(model_name="add")
        for name, value in (("a", a), ("b", b)):
            request.inputs.add(name=name, datatype="FP32", shape=list(value.shape))
            request.raw_input_contents.append(value.tobytes())
        try:
            response = call(request, timeout=30)
        except grpc.RpcError as e:
            return False, f"{e.code()} {e.details()}"  # type: ignore[attr-defined]
        got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        return _close(got, a + b), "wrong sum"

    return check


def tf_serving(client: httpx.Client, rng: np.random.Generator) -> Check:
    def check() -> tuple[bool, str]:
        a, b = _rows(rng)
        instances = [{"a": ra.tolist(), "b": rb.tolist()} for ra, rb in zip(a, b, strict=True)]
        answer = client.post("/v1/models/add:predict", json={"instances": instances})
        if answer.status_code != 200:
            return False, f"{answer.status_code} {answer.text[:200]}"
        return _close(answer.json()["predictions"], a + b), "wrong sum"

    return check


def flip(client: httpx.Client, rng: np.random.Generator) -> Check:
    def check() -> tuple[bool, str]:
        x = float(rng.integers(0, 100))
        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [x]}]}
        answer = client.post("/v2/models/flip/infer", json=body)
        if answer.status_code != 200:
            return False, f"{answer.status_code} {answer.text[:200]}"
        version = answer.json()["model_version"]
        y = answer.json()["outputs"][0]["data"][0]
        return (version, y) in {("1", x + 1.0), ("2", x + 2.0)}, f"version {version} answered {y} for {x}"

    return check


SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Our team shipped the new search feature to every customer last week.",
    "Heavy rain and strong wind are expected across the northern coast tomorrow.",
)


def text(client: httpx.Client, rng: np.random.Generator) -> Check:
    sentences = itertools.cycle(SENTENCES)

    def check() -> tuple[bool, str]:
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [next(sentences)]}]}
        answer = client.post("/v2/models/minilm/infer", json=body)
        if answer.status_code != 200:
            return False, f"{answer.status_code} {answer.text[:200]}"
        return len(answer.json()["outputs"][0]["data"]) > 0, "empty answer"

    return check


def _bad_http() -> list[tuple[str, bytes, dict[str, str]]]:
    one = {"name": "a", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}
    return [
        ("/v2/models/add/infer", b"{not json", {}),
        ("/v2/models/add/infer", b"[" * 5000, {}),
        ("/v2/models/no_such_model/infer", orjson.dumps({"inputs": [one]}), {}),
        ("/v2/models/add/infer", orjson.dumps({"inputs": [{**one, "shape": [1, 15]}]}), {}),
        ("/v2/models/add/infer", orjson.dumps({"inputs": [{**one, "datatype": "INT8"}, {**one, "name": "b"}]}), {}),
        ("/v2/models/add/infer", orjson.dumps({"inputs": [{**one, "shape": [-1, 16]}]}), {}),
        ("/v2/models/add/infer", orjson.dumps({"inputs": [{**one, "shape": [2**62, 16]}]}), {}),
        (
            "/v2/models/add/infer",
            orjson.dumps({"inputs": [{**one, "data": None, "parameters": {"binary_data_size": 64}}]}) + b"\0" * 60,
            {"Inference-Header-Content-Length": "86"},
        ),
        ("/v2/models/add/infer", orjson.dumps({"inputs": [one], "parameters": {"timeout": "soon"}}), {}),
        ("/v1/models/add:predict", orjson.dumps({"instances": [{"a": [1.0]}]}), {}),
        ("/v1/models/add:predict", b"\x80\x04pickle", {"Content-Type": "application/python-pickle"}),
        ("/v2/repository/models/..%2F..%2Fetc/load", b"", {}),
    ]


def bad_requests(client: httpx.Client, channel: grpc.Channel, rng: np.random.Generator) -> Check:
    cases = itertools.cycle(_bad_http())
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
    )
    garbage = itertools.count()

    def check() -> tuple[bool, str]:
        if next(garbage) % 4 == 0:
            try:
                infer(rng.bytes(int(rng.integers(1, 200))), timeout=30)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                bad = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE)
                return not bad, f"malformed protobuf answered {code}"
            return True, ""  # random bytes can parse as a (useless) valid message
        path, body, headers = next(cases)
        answer = client.post(path, content=body, headers={"Content-Type": "application/json", **headers})
        return 400 <= answer.status_code < 500, f"{path}: {answer.status_code} {answer.text[:200]}"

    return check


def pace(kind: str, check: Check, per_second: float, run: Run, started: float, stop: threading.Event) -> None:
    interval = 1.0 / per_second
    due = time.perf_counter()
    while not stop.is_set():
        begun = time.perf_counter()
        try:
            ok, detail = check()
        except Exception as e:  # a transport failure is a failed request, never a crashed soak
            ok, detail = False, f"{type(e).__name__}: {e}"
        ended = time.perf_counter()
        run.add(Record(kind, begun - started, ended - begun, ok, "" if ok else detail))
        due += interval
        stop.wait(max(0.0, due - time.perf_counter()))


def reload_versions(base: Path, every: float, run: Run, stop: threading.Event) -> None:
    """Add version 2 of ``flip``, later remove it, and so on: the poll loads and unloads it each time."""
    while not stop.wait(every):
        if (base / "2").exists():
            gone = base / ".2.removed"
            (base / "2").rename(gone)
            shutil.rmtree(gone)
        else:
            write_version(base, 2, offset_model(2.0))
        run.reloads += 1


def sample_rss(server: SoakServer, run: Run, started: float, stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_SECONDS):
        run.rss.append((time.perf_counter() - started, server.rss()))


# --- the verdict -------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def analyse(run: Run, duration: float, limits: Limits) -> tuple[dict[str, Any], list[str]]:
    """The summary of a run, and why it failed (empty when it passed)."""
    failures: list[str] = []
    kinds = sorted({r.kind for r in run.records})
    per_kind: dict[str, Any] = {}
    for kind in kinds:
        mine = [r for r in run.records if r.kind == kind]
        wrong = [r for r in mine if not r.ok]
        early = [r.seconds for r in mine if r.ok and duration / 4 <= r.at < duration / 2]
        late = [r.seconds for r in mine if r.ok and r.at >= 3 * duration / 4]
        p99_early, p99_late = percentile(early, 99) * 1000, percentile(late, 99) * 1000
        per_kind[kind] = {
            "requests": len(mine),
            "failed": len(wrong),
            "p50_ms": round(percentile([r.seconds for r in mine], 50) * 1000, 2),
            "p99_ms_second_quarter": round(p99_early, 2),
            "p99_ms_last_quarter": round(p99_late, 2),
        }
        if wrong:
            failures.append(f"{kind}: {len(wrong)} of {len(mine)} requests failed, e.g. {wrong[0].detail}")
    # The drift verdict pools the steady kinds (same model, same work): one kind's p99 over a quarter
    # rests on a handful of samples and moves with whatever else the machine is doing.
    steady = [r for r in run.records if r.kind in STEADY and r.ok]
    early = [r.seconds for r in steady if duration / 4 <= r.at < duration / 2]
    late = [r.seconds for r in steady if r.at >= 3 * duration / 4]
    p99_early, p99_late = percentile(early, 99) * 1000, percentile(late, 99) * 1000
    if early and late and p99_late > p99_early * limits.max_p99_ratio + limits.p99_slack_ms:
        failures.append(
            f"p99 of {', '.join(STEADY)} drifted from {p99_early:.1f} ms (second quarter) "
            f"to {p99_late:.1f} ms (last quarter)"
        )
    second_half = [rss for at, rss in run.rss if at >= duration / 2 and rss > 0]
    growth_mib = 0.0
    if len(second_half) >= 2 * EDGE_SAMPLES:
        start = statistics.median(second_half[:EDGE_SAMPLES])
        end = statistics.median(second_half[-EDGE_SAMPLES:])
        growth_mib = (end - start) / 2**20
        if growth_mib > limits.max_rss_growth_mib:
            failures.append(f"RSS grew by {growth_mib:.1f} MiB in the second half (limit {limits.max_rss_growth_mib})")
    else:
        failures.append(f"too few RSS samples in the second half ({len(second_half)}): run longer")
    rss_all = [rss for _, rss in run.rss if rss > 0]
    summary = {
        "minutes": round(duration / 60, 2),
        "requests": len(run.records),
        "reloads": run.reloads,
        "steady_p99_ms": {"second_quarter": round(p99_early, 2), "last_quarter": round(p99_late, 2)},
        "rss_mib": {
            "first": round(rss_all[0] / 2**20, 1) if rss_all else 0,
            "max": round(max(rss_all) / 2**20, 1) if rss_all else 0,
            "last": round(rss_all[-1] / 2**20, 1) if rss_all else 0,
            "second_half_growth": round(growth_mib, 1),
        },
        "kinds": per_kind,
        "limits": limits.__dict__,
        "passed": not failures,
        "failures": failures,
    }
    return summary, failures


# --- main ----------------------------------------------------------------------------------------------------


STEADY = ("v2_json", "v2_binary", "v2_grpc", "tf_serving")
"""The traffic kinds whose pooled p99 must not drift: the same small model through each protocol."""

RATES = {
    "v2_json": 20.0,
    "v2_binary": 20.0,
    "v2_grpc": 20.0,
    "tf_serving": 20.0,
    "flip": 10.0,
    "text": 5.0,
    "bad": 10.0,
}
"""Requests per second of each traffic kind (about 100 in all: a soak, not a load test)."""


def soak(minutes: float, reload_secs: float, limits: Limits, text_model: Path | None, output: Path) -> int:
    duration = minutes * 60
    workdir = Path(tempfile.mkdtemp(prefix="onnxserve-soak-"))
    try:
        config = prepare_repository(workdir / "repo", text_model)
        server = SoakServer(config, RESULTS / "soak-server.log", poll_secs=min(1.0, reload_secs / 3))
        run = Run()
        stop = threading.Event()
        try:
            server.start()
            rng_seed = itertools.count(1)
            client = httpx.Client(base_url=server.http_url, timeout=30)
            channel = grpc.insecure_channel(f"{HOST}:{server.grpc_port}")
            checks: dict[str, Check] = {
                "v2_json": v2_json(client, np.random.default_rng(next(rng_seed))),
                "v2_binary": v2_binary(client, np.random.default_rng(next(rng_seed))),
                "v2_grpc": v2_grpc(channel, np.random.default_rng(next(rng_seed))),
                "tf_serving": tf_serving(client, np.random.default_rng(next(rng_seed))),
                "flip": flip(client, np.random.default_rng(next(rng_seed))),
                "bad": bad_requests(client, channel, np.random.default_rng(next(rng_seed))),
            }
            if text_model is not None:
                checks["text"] = text(client, np.random.default_rng(next(rng_seed)))
            started = time.perf_counter()
            threads = [
                threading.Thread(target=pace, args=(k, c, RATES[k], run, started, stop), daemon=True)
                for k, c in checks.items()
            ]
            threads.append(
                threading.Thread(
                    target=reload_versions, args=(workdir / "repo" / "flip", reload_secs, run, stop), daemon=True
                )
            )
            threads.append(threading.Thread(target=sample_rss, args=(server, run, started, stop), daemon=True))
            for thread in threads:
                thread.start()
            while time.perf_counter() - started < duration and server.alive():
                time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            alive = server.alive()
            client.close()
            channel.close()
        finally:
            stop.set()
            server.stop()
        summary, failures = analyse(run, duration, limits)
        if not alive:
            failures.append("the server process died")
            summary["passed"] = False
            summary["failures"] = failures
        summary["text_model"] = text_model is not None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(".partial")
    partial.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    partial.replace(output)
    sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.write(("soak passed" if not failures else "soak FAILED:\n  " + "\n  ".join(failures)) + "\n")
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--reload-secs", type=float, default=5.0, help="add or remove flip's version 2 this often")
    parser.add_argument("--max-rss-growth-mib", type=float, default=Limits.max_rss_growth_mib)
    parser.add_argument("--max-p99-ratio", type=float, default=Limits.max_p99_ratio)
    parser.add_argument("--p99-slack-ms", type=float, default=Limits.p99_slack_ms)
    parser.add_argument("--no-text", action="store_true", help="leave the demo text model out")
    parser.add_argument("--output", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.reload_secs <= 0:
        parser.error("--minutes and --reload-secs must be positive")
    demo = ROOT / "models" / "minilm" / "1"
    text_model = None if args.no_text or not (demo / "model.onnx").is_file() else demo
    limits = Limits(args.max_rss_growth_mib, args.max_p99_ratio, args.p99_slack_ms)
    return soak(args.minutes, args.reload_secs, limits, text_model, args.output)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
