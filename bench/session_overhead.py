"""The cost of ``ModelSession.run`` on a small numeric model, beside ONNX Runtime's own ``run``.

``ModelSession.run`` checks its outputs' shapes on ONNX Runtime's values before converting them
(``run_with_ort_values``), which must not make ordinary numeric runs slower. Prints microseconds per
run and the ratio. Usage: ``PYTHONPATH=src python -m bench.session_overhead [runs]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx.parser import parse_model

from onnxserve.core.runtime import ModelSession

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
add (float[n, 4] a, float[n, 4] b) => (float[n, 4] y) {
    y = Add(a, b)
}
"""


def _per_run_us(call: Callable[[], Any], runs: int) -> float:
    for _ in range(200):
        call()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(runs):
            call()
        rounds.append((time.perf_counter() - started) / runs * 1e6)
    return statistics.median(rounds)


def main(runs: int = 20000) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(parse_model(MODEL), path)
        raw = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session = ModelSession(path, name="add")
        x = np.ones((8, 4), np.float32)
        feeds = {"a": x, "b": x}
        options = ort.RunOptions()
        baseline = _per_run_us(lambda: raw.run(["y"], feeds, options), runs)
        ours = _per_run_us(lambda: session.run(feeds), runs)
        print(f"onnxruntime run      {baseline:8.1f} us")
        print(f"ModelSession.run     {ours:8.1f} us   ratio {ours / baseline:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
