"""Where a request's time goes in the server (issue #18): py-spy samples of a loaded onnxserve, by phase.

For each config (bench/configs/NAME.json, the minilm entry only) a server is started and loaded with
text (V2 ``text``, aiohttp closed loop) and tensors (``[1, 32]`` INT64 over V2 gRPC, perf_analyzer) at
each concurrency, while ``py-spy record --format raw`` samples every thread of the server (only samples
of threads on a CPU: idle threads are left out). Each sampled stack is put in one phase by its frames,
and the table gives each phase's share of the samples, with the load's throughput alongside.

    PYTHONPATH=src .venv/bin/python -m bench.where_time_goes [--configs default batching_off] [--seconds 6]

py-spy is on PyPI (``pip install py-spy``); it needs permission to read the server's memory (root, or
``kernel.yama.ptrace_scope`` 0).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx

from bench import loadgen, workloads
from bench.adaptive import config_file, share_priority
from bench.data import SENTENCES, perf_analyzer_input, token_row
from bench.perf_analyzer import PerfAnalyzer
from bench.server import OnnxServer
from bench.settings import from_env
from bench.stats import Sample

PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ONNX Runtime run", ("ModelSession.run (",)),
    ("tokenization", ("TextPipeline.tokenize", "encode_batch", "_tokenize (")),
    ("padding / merging", ("TextPipeline.tensors", "concatenate")),
    ("post-processing", ("TextPipeline.postprocess", "_split (", "_from_ort", "truncated_count")),
    ("protocol decode/encode", ("onnxserve/protocols/", "onnxserve/core/wire.py", "validation.py", "orjson")),
    ("HTTP server (uvicorn)", ("uvicorn", "httptools", "h11", "starlette")),
    ("gRPC server", ("grpc",)),
    (
        "scheduling / service",
        ("core/batching.py", "core/service.py", "core/observe", "core/registry", "core/statistics"),
    ),
    ("metrics", ("prometheus", "server/metrics")),
    ("thread hand-offs", ("asyncio/", "concurrent/futures", "threading.py")),
    ("event loop (native)", ("serve (onnxserve/server/lifecycle.py",)),
)
"""Phases and the frames that mark them; a sample goes to the phase of its innermost marked frame."""


def phase(stack: str) -> str:
    """The phase of one sampled stack: the first phase whose marker appears, innermost frames first."""
    frames = stack.split(";")[::-1]
    for frame in frames:
        for name, markers in PHASES:
            if any(m in frame for m in markers):
                return name
    return "other"


def record(pid: int, seconds: float, out: Path) -> threading.Thread:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [
        spy,
        "record",
        "-p",
        str(pid),
        "-d",
        str(int(seconds)),
        "-r",
        "250",
        "--format",
        "raw",
        "-o",
        str(out),
        "--threads",
        "--nonblocking",
    ]

    def run() -> None:
        subprocess.run(command, capture_output=True, check=False)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def shares(raw: Path) -> tuple[Counter[str], int]:
    counts: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return counts, 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        counts[phase(stack)] += int(n)
        total += int(n)
    return counts, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["default", "batching_off"])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", nargs="*", type=int, default=[1, 8, 32])
    args = parser.parse_args()
    settings = from_env()
    row = token_row(settings.minilm / "tokenizer.json")
    tokens = perf_analyzer_input(row, settings.results_dir / "inputs" / "tokens32.json")
    pa = PerfAnalyzer(int(args.seconds * 1000 / 3))
    out_dir = settings.results_dir / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in PHASES] + ["other"]
    print("| config | workload | c | throughput | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for name in args.configs:
        with OnnxServer(config_file(name, settings), out_dir / f"{name}.log", name) as server:
            assert server._process is not None
            pid = server._process.pid
            share_priority(pid)
            for workload in ("text", "tensors"):
                for c in args.concurrency:
                    raw = out_dir / f"{name}-{workload}-c{c}.txt"
                    spy = record(pid, args.seconds, raw)
                    sample: Sample
                    if workload == "text":
                        target = workloads.onnxserve_text_target(server, SENTENCES)
                        sample = loadgen.closed_loop(target, c, 0.0, args.seconds)
                    else:
                        batched = httpx.get(f"{server.http_url}/v2/models/minilm/config").json()["max_batch_size"] > 0
                        shape = [32] if batched else [1, 32]  # a batching model's --shape leaves out the batch dim
                        shapes = {n: shape for n in ("input_ids", "attention_mask", "token_type_ids")}
                        sample = pa.run("minilm", "grpc", server.grpc_address, c, shapes, tokens)
                    spy.join()
                    counts, total = shares(raw)
                    cells = [f"{100 * counts[n] / total:.0f} %" if total else "-" for n in names]
                    print(
                        f"| {name} | {workload} | {c} | {sample.throughput:.0f}/s p50 {sample.p50_ms:.1f} ms | "
                        + " | ".join(cells)
                        + " |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
