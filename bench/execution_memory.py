"""What one execution of a text model takes in memory, measured beside ``core.attention_memory``'s estimate.
Usage: ``PYTHONPATH=src python -m bench.execution_memory [--json] [model.onnx ...] [ROWSxTOKENS ...]``
(default: the demo model, the shapes below; ``--json``: one line per model).

For each shape, in one process: the model loaded as the server loads it (``ModelSession``: onnxserve's
session options, CPU arena off; the C allocator's mmap threshold fixed as ``onnxserve serve`` fixes it,
unless ``MALLOC_MMAP_THRESHOLD_`` is set), a warm-up run, free memory given back, the kernel's peak RSS
reset (``/proc/self/clear_refs``), one execution of all-ones ``input_ids`` of that shape, then the peak
RSS above the resting size before it; the largest of two such executions. Several models are measured
one after another in the same process, as a server holds them. Prints measured and
estimated MB and their ratio (estimate / measured: above 1 is conservative).
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxserve.core.attention_memory import ExecutionMemory
from onnxserve.core.memory import fix_mmap_threshold, give_back_free_memory
from onnxserve.core.runtime import ModelSession

DEMO = Path("models/minilm/1/model.onnx")
SHAPES = [(1, 16), (8, 32), (32, 32), (32, 64), (64, 128), (32, 128), (8, 256), (16, 256), (32, 256), (8, 512)]
MB = 1e6
RUNS = 2


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_above_rest(session: ModelSession, rows: int, tokens: int) -> int:
    """Peak RSS of one execution of ``rows`` x ``tokens`` above the RSS before it."""
    ids = np.ones((rows, tokens), dtype=np.int64)
    names = {spec.name for spec in session.inputs}
    feeds = {name: ids for name in ("input_ids", "attention_mask") if name in names}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    gc.collect()
    give_back_free_memory()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
    rest = _status("VmRSS")
    outputs = session.run(feeds, [session.outputs[0].name])
    peak = _status("VmHWM")
    del outputs
    return peak - rest


def peak_of_runs(session: ModelSession, rows: int, tokens: int, runs: int = RUNS) -> int:
    """The largest of ``runs`` executions' peaks (the first run of a new shape and the next ones differ)."""
    return max(peak_above_rest(session, rows, tokens) for _ in range(runs))


def measure(model: Path, shapes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """``model``'s attention shape and, for each shape, the measured peak and the estimate (bytes)."""
    session = ModelSession(model)
    if session.attention is None:
        return {"model": str(model), "attention": None, "shapes": []}
    heads, widest = session.attention
    memory = ExecutionMemory(heads, widest)
    peak_above_rest(session, 2, 8)  # warm-up
    found = [
        {
            "rows": rows,
            "tokens": tokens,
            "measured": peak_of_runs(session, rows, tokens),
            "estimate": memory.bytes(rows, tokens),
        }
        for rows, tokens in shapes
    ]
    return {"model": str(model), "attention": [heads, widest], "shapes": found}


def main(argv: list[str]) -> None:
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    models = [Path(a) for a in argv if not a[0].isdigit()] or [DEMO]
    shapes = [(int(a.split("x")[0]), int(a.split("x")[1])) for a in argv if a[0].isdigit()] or SHAPES
    fix_mmap_threshold()
    for model in models:
        found = measure(model, shapes)
        if as_json:  # one line per model (tests/adversarial/test_estimate_architectures.py)
            print(json.dumps(found), flush=True)
            continue
        if found["attention"] is None:
            raise SystemExit(f"{model}: no attention found in the graph")
        heads, widest = found["attention"]
        print(f"{model}: {heads} heads, widest per-token tensor {widest}")
        print(f"{'rows x tokens':>14} {'measured MB':>12} {'estimate MB':>12} {'estimate/measured':>18}")
        for shape in found["shapes"]:
            measured, estimate = shape["measured"], shape["estimate"]
            ratio = estimate / measured if measured > 0 else float("inf")
            size = f"{shape['rows']} x {shape['tokens']}"
            print(f"{size:>14} {measured / MB:>12.1f} {estimate / MB:>12.1f} {ratio:>18.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
