"""The adaptive default against the hand-tuned layouts and the in-process ceilings (issue #18), side by side.

Three onnxserve servers are up for the whole run: ``default`` (bench/configs/default.json: no layout
settings, so the server chooses), ``batching off 1x2`` (bench/configs/batching_off.json) and
``batching on`` (bench/configs/batching_on.json). Every point runs once per round, round after round
(``bench.workloads.measure``), so a noisy minute lands on every side alike; each row is the median of
its rounds. Text is one ~12-word sentence per V2 ``text`` request (aiohttp closed loop); tensors are
``[1, 32]`` INT64 token tensors over V2 gRPC (perf_analyzer). The in-process ceilings: text through
``onnxserve.Pipeline`` (one call of one sentence on 2 threads; batches of 8 on 1 x 2 and 2 x 1),
tensors through ``session.run`` (batch 1 and 8, 1 x 2 and 2 x 1); each ratio is over the best of them
measured in the same run, and the server's own statistics (executions, batch sizes) are kept.

    PYTHONPATH=src .venv/bin/python -m bench.adaptive     # BENCH_REPEATS, BENCH_DURATION_S as make bench

``--sides default batching_off`` measures only those sides; each ``--before DIR/src`` adds
``default (DIR)``, the default config served from that source tree (e.g. ``git archive`` of the commit
before a change, unpacked in DIR), measured in the same rounds as the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import inprocess, workloads
from bench.data import SENTENCES, perf_analyzer_input, token_row
from bench.perf_analyzer import PerfAnalyzer
from bench.report import TEXT_PROTOCOL, Row
from bench.server import OnnxServer
from bench.settings import BENCH_DIR, Settings, from_env

SIDES = (
    ("default", "onnxserve default (adaptive)"),
    ("default_spinning", "onnxserve default, spinning on"),
    ("batching_off", "onnxserve batching off 1x2"),
    ("batching_on", "onnxserve batching_on.json"),
)
TEXT_CEILINGS = (inprocess.Candidate(1, 1, 2), inprocess.Candidate(8, 1, 2), inprocess.Candidate(8, 2, 1))
TENSOR_CEILINGS = (inprocess.Candidate(1, 1, 2), inprocess.Candidate(8, 1, 2), inprocess.Candidate(8, 2, 1))


def config_file(name: str, settings: Settings) -> Path:
    """bench/configs/NAME.json with only the minilm entry, its base path absolute."""
    document: dict[str, Any] = orjson.loads((BENCH_DIR / "configs" / f"{name}.json").read_bytes())
    entries = [
        dict(e, base_path=str(settings.models / "minilm"))
        for e in document["model_config_list"]
        if e["name"] == "minilm"
    ]
    target = settings.results_dir / "adaptive" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(orjson.dumps({"model_config_list": entries}, option=orjson.OPT_INDENT_2))
    return target


def share_priority(pid: int) -> None:
    """Put a server in this process's scheduling priority: a server starts its own session, so with
    autogroup scheduling (Linux's default) it would otherwise get its own group at nice 0, and the
    ``nice`` this bench runs under (or that other users' jobs run under) would not apply to it."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        nice = Path("/proc/self/autogroup").read_text().split("nice")[1].strip()
        Path(f"/proc/{pid}/autogroup").write_text(nice)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def row_json(row: Row) -> dict[str, Any]:
    s = row.summary
    server = [r.extra.get("server") for r in s.runs] if s is not None else []
    return {
        "workload": row.workload,
        "side": row.side,
        "protocol": row.protocol,
        "c": row.concurrency,
        "throughput": round(s.throughput, 1) if s else None,
        "p50_ms": round(s.p50_ms, 2) if s else None,
        "p99_ms": round(s.p99_ms, 2) if s else None,
        "ratio": round(row.ratio, 3) if row.ratio else None,
        "baseline": row.baseline.protocol if row.baseline is not None else None,
        "server": server,
        "failures": row.failures,
        "error": row.error,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", nargs="*", default=[name for name, _ in SIDES], choices=[n for n, _ in SIDES])
    parser.add_argument(
        "--before",
        type=Path,
        action="append",
        default=[],
        help="also serve the default config from this source tree (repeatable; labelled by its parent folder)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped bench stops its servers
    settings = from_env()
    row = token_row(settings.minilm / "tokenizer.json")
    tokens = perf_analyzer_input(row, settings.results_dir / "inputs" / "tokens32.json")
    pa = PerfAnalyzer(settings.pa_window_ms)
    sides = [(name, label, None) for name, label in SIDES if name in args.sides]
    for src in reversed(args.before):
        sides.insert(1, ("default", f"onnxserve default ({src.resolve().parent.name})", src))
    logs = settings.results_dir / "adaptive"
    servers = [
        OnnxServer(config_file(name, settings), logs / f"{name}{'-' + src.parent.name if src else ''}.log", label, src)
        for name, label, src in sides
    ]
    text_make = inprocess.text_calls(settings.minilm, SENTENCES)
    tensor_make = inprocess.token_tensor_calls(settings.minilm / "model.onnx", row)
    points: list[workloads.Point] = []
    text_ceilings = workloads.baseline_points(
        "text", "in-process", "Pipeline", "texts", TEXT_CEILINGS, text_make, settings.duration_s
    )
    tensor_ceilings = workloads.baseline_points(
        "tensors", "in-process", "session.run", "rows", TENSOR_CEILINGS, tensor_make, settings.duration_s
    )
    try:
        for server in servers:
            log(f"starting {server.name}")
            server.start()
            if server._process is not None:
                share_priority(server._process.pid)
        text_rows, tensor_rows = [], []
        for c in settings.concurrency:
            for server in servers:
                target = workloads.onnxserve_text_target(server, SENTENCES)
                point = workloads.text_point(target, server.name, TEXT_PROTOCOL, c, settings, server)
                text_rows.append(point[0])
                points.append(point)
        for c in settings.concurrency:
            for server, (name, _, _) in zip(servers, sides, strict=True):
                point = workloads.tensors_point(server, server.name, name == "batching_on", pa, tokens, c)
                tensor_rows.append(point[0])
                points.append(point)
        points[:0] = [*text_ceilings, *tensor_ceilings]
        workloads.measure(points, settings.repeats, log)
    finally:
        for server in servers:
            server.stop()
    # Ratios over the in-process batch-8 text ceiling (the issue's) and the best tensors layout.
    text_batch8 = [r for r, _ in text_ceilings if "batch 8" in r.protocol and r.summary is not None]
    best_text8 = max(text_batch8, key=lambda r: r.summary.throughput if r.summary else 0.0) if text_batch8 else None
    for r in text_rows:
        r.baseline = best_text8
    workloads.choose_baseline([r for r, _ in tensor_ceilings], tensor_rows)
    rows = [r for r, _ in points]
    out = settings.results_dir / "adaptive.json"
    out.write_text(json.dumps([row_json(r) for r in rows], indent=1))
    print("| workload | side | c | throughput | p50 ms | p99 ms | x ceiling | batches (size: executions) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        j = row_json(r)
        batches = ""
        if j["server"] and j["server"][-1]:
            s = j["server"][-1]
            batches = f"{s.get('mean_batch_rows')} rows/run {s.get('batch_sizes', '')}"
        ratio = f"{j['ratio']:.2f}" if j["ratio"] else ""
        side = f"{r.side} {r.protocol}" if r.side == "in-process" else r.side
        cells = [r.workload, side, r.concurrency, j["throughput"], j["p50_ms"], j["p99_ms"], ratio, batches]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
