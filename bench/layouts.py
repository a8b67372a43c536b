"""Candidate session layouts for the adaptive default (issue #18): memory and throughput, in-process.

Each candidate runs in its own child process (ONNX Runtime's process-wide thread pool can be set only
once, and RSS must be one layout's alone): it loads its sessions, warms them up, reports its RSS, then
runs the demo model (all-MiniLM-L6-v2, one 12-word sentence per row) for a few seconds in the ways the
adaptive scheduler would: one caller, one row (the c=1 latency); one caller, batch 8; two callers, each
batch 4 on its own session (or on the shared one). Rows per second are medians of ``--repeats`` runs.

    PYTHONPATH=src .venv/bin/python -m bench.layouts [--model models/minilm/1] [--seconds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CANDIDATES = {
    "one-2t": "one session, 2 threads (per-session pool): the reference RSS",
    "one-2t-shared-runs": "one session, 2 threads; two callers run it at once",
    "two-1t-copied": "two sessions, 1 thread each, weights copied (today's 2 x 1)",
    "two-1t-shared": "two sessions, 1 thread each, initializers shared (add_initializer)",
    "wide+two-1t-shared": "a 2-thread session + two 1-thread sessions, initializers shared",
    "wide+two-1t-shared-noprepack": "as above, session.disable_prepacking=1 on every session",
    "global-pool-2": "one process-wide intra-op pool of 2 threads; one session, two callers",
}

SHARED_MIN_BYTES = 1024

SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _shared_initializers(model_path: Path) -> tuple[Any, list[tuple[str, Any]]]:
    """The model with its initializers' data taken out, and one OrtValue per initializer to share."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    values = []
    for init in model.graph.initializer:
        if init.raw_data and len(init.raw_data) >= SHARED_MIN_BYTES:
            array = numpy_helper.to_array(init)
            values.append((init.name, ort.OrtValue.ortvalue_from_numpy(array)))
    return model, values


def _child(name: str, model_dir: Path, seconds: float, repeats: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    model_path = model_dir / "model.onnx"
    if name == "global-pool-2":
        ort.capi._pybind_state.set_global_thread_pool_sizes(2, 1)
    before = rss_mib()

    def options(threads: int, shared: list[tuple[str, Any]] | None = None, prepack: bool = True) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        for init_name, value in shared or []:
            so.add_initializer(init_name, value)
        return so

    sessions: list[Any] = []
    wide: Any = None
    if name in ("one-2t", "one-2t-shared-runs"):
        wide = ort.InferenceSession(str(model_path), options(2), providers=["CPUExecutionProvider"])
        sessions = [wide, wide]
    elif name == "two-1t-copied":
        sessions = [ort.InferenceSession(str(model_path), options(1), providers=["CPUExecutionProvider"]) for _ in "ab"]
    elif name == "global-pool-2":
        so = options(0)
        so.use_per_session_threads = False
        wide = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        sessions = [wide, wide]
    else:
        model, shared = _shared_initializers(model_path)
        # The proto keeps every initializer's data: ONNX Runtime refuses emptied ones ("data field count
        # (0) does not match") before add_initializer's shared values replace them.
        data = model.SerializeToString()
        del model
        prepack = not name.endswith("noprepack")
        if name.startswith("wide"):
            wide = ort.InferenceSession(data, options(2, shared, prepack), providers=["CPUExecutionProvider"])
        sessions = [
            ort.InferenceSession(data, options(1, shared, prepack), providers=["CPUExecutionProvider"]) for _ in "ab"
        ]
        del data
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def feeds(rows: int) -> dict[str, Any]:
        encodings = tokenizer.encode_batch([SENTENCE] * rows)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}

    one, four, eight = feeds(1), feeds(4), feeds(8)
    for s in {id(s): s for s in [*sessions, wide] if s is not None}.values():
        for _ in range(3):
            s.run(None, one)
            s.run(None, eight)
    import gc

    gc.collect()
    loaded = rss_mib()

    def loop(calls: list[Callable[[], Any]], rows: int) -> float:
        count = [0] * len(calls)
        stop = time.perf_counter() + seconds

        def run(i: int) -> None:
            while time.perf_counter() < stop:
                calls[i]()
                count[i] += 1

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(count) * rows / (time.perf_counter() - started)

    solo = wide or sessions[0]
    results: dict[str, list[float]] = {"c1 batch 1 (rows/s)": [], "1 caller batch 8": [], "2 callers batch 4": []}
    for _ in range(repeats):
        results["c1 batch 1 (rows/s)"].append(loop([lambda: solo.run(None, one)], 1))
        results["1 caller batch 8"].append(loop([lambda: solo.run(None, eight)], 8))
        results["2 callers batch 4"].append(
            loop([lambda: sessions[0].run(None, four), lambda: sessions[1].run(None, four)], 4)
        )
    return {
        "candidate": name,
        "what": CANDIDATES[name],
        "rss_before_mib": round(before, 1),
        "rss_loaded_mib": round(loaded, 1),
        "rss_after_runs_mib": round(rss_mib(), 1),
        **{k: round(statistics.median(v), 1) for k, v in results.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/minilm/1")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidate", choices=sorted(CANDIDATES))
    parser.add_argument("--only", nargs="*", choices=sorted(CANDIDATES))
    args = parser.parse_args()
    if args.candidate:
        print(json.dumps(_child(args.candidate, Path(args.model), args.seconds, args.repeats)))
        return 0
    rows = []
    for name in args.only or CANDIDATES:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.layouts",
                "--candidate",
                name,
                "--model",
                args.model,
                "--seconds",
                str(args.seconds),
                "--repeats",
                str(args.repeats),
            ],
            capture_output=True,
            text=True,
            env=os.environ,
            check=False,
        )
        if out.returncode != 0:
            print(name, "failed:", out.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = next((r["rss_loaded_mib"] for r in rows if r["candidate"] == "one-2t"), None)
    print("\n| layout | RSS loaded MiB | x one session | c=1 rows/s | batch 8, 1 caller | 2 callers x batch 4 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['rss_loaded_mib'] / reference:.2f}" if reference else "-"
        print(
            f"| {r['what']} | {r['rss_loaded_mib']} | {ratio} | {r['c1 batch 1 (rows/s)']} | "
            f"{r['1 caller batch 8']} | {r['2 callers batch 4']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
