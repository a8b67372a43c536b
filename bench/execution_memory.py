"""What one execution of a text model takes in memory, measured beside ``core.attention_memory``'s estimate.
Usage: ``PYTHONPATH=src python -m bench.execution_memory [model.onnx] [ROWSxTOKENS ...]`` (default: the
demo model, the shapes below).

For each shape, in one process: the model loaded as the server loads it (``ModelSession``: onnxserve's
session options, CPU arena off; the C allocator's mmap threshold fixed as ``onnxserve serve`` fixes it,
unless ``MALLOC_MMAP_THRESHOLD_`` is set), a warm-up run, free memory given back, the kernel's peak RSS
reset (``/proc/self/clear_refs``), one execution of all-ones ``input_ids`` of that shape, then the peak
RSS above the resting size before it; the largest of two such executions. Prints measured and
estimated MB and their ratio (estimate / measured: above 1 is conservative).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

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


def main(argv: list[str]) -> None:
    model = Path(argv[0]) if argv and not argv[0][0].isdigit() else DEMO
    shapes = [tuple(int(n) for n in a.split("x")) for a in argv if a[0].isdigit()] or SHAPES
    fix_mmap_threshold()
    session = ModelSession(model)
    if session.attention is None:
        raise SystemExit(f"{model}: no attention found in the graph")
    heads, widest = session.attention
    memory = ExecutionMemory(heads, widest)
    peak_above_rest(session, 2, 8)  # warm-up
    print(f"{model}: {heads} heads, widest per-token tensor {widest}")
    print(f"{'rows x tokens':>14} {'measured MB':>12} {'estimate MB':>12} {'estimate/measured':>18}")
    for rows, tokens in shapes:
        measured = peak_of_runs(session, rows, tokens)
        estimate = memory.bytes(rows, tokens)
        ratio = estimate / measured if measured > 0 else float("inf")
        print(f"{f'{rows} x {tokens}':>14} {measured / MB:>12.1f} {estimate / MB:>12.1f} {ratio:>18.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
