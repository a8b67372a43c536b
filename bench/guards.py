"""What issue 14's guards cost, beside what was there before them. Usage:
``PYTHONPATH=src python -m bench.guards [model.onnx] [--no-contents]`` (default: the demo model).

- Load time: ``ModelSession`` on the model as it is (no integer division to guard: the guard only looks)
  and on the same model with an int64 ``Div`` of two inputs added (guarded: served from a rewritten copy
  in memory), each beside what a load did before the guard (the file checked, then ONNX Runtime's session
  made from the file).
- Typed gRPC answers: a 15 M-element FP32 output put into ``fp32_contents`` as one Python list (before)
  and a slice at a time (``codec._fill_contents``): time and Python's peak allocation (tracemalloc).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxserve.core.runtime import ModelSession, check_onnx_file, create_session
from onnxserve.protocols.v2_grpc import codec
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

DEMO = Path("models/minilm/1/model.onnx")
ELEMENTS = 15_000_000


def _median_s(call: Callable[[], Any], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _with_integer_division(model_file: Path, folder: Path) -> Path:
    model = onnx.load(model_file)
    model.graph.input.extend(
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["k"]) for n in ("guard_a", "guard_b")]
    )
    model.graph.node.append(helper.make_node("Div", ["guard_a", "guard_b"], ["guard_q"]))
    model.graph.output.append(helper.make_tensor_value_info("guard_q", TensorProto.INT64, ["k"]))
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def _typed_answer(fill: Callable[[Any, np.ndarray], None]) -> tuple[float, int]:
    flat = np.full(ELEMENTS, 1.5, dtype=np.float32)
    tracemalloc.start()
    started = time.perf_counter()
    fill(pb.InferTensorContents().fp32_contents, flat)
    took = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return took, peak


def main() -> None:
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    model_file = Path(paths[0]) if paths else DEMO
    with tempfile.TemporaryDirectory() as folder:
        guarded_file = _with_integer_division(model_file, Path(folder))
        print(f"{'model':34s} {'before':>9s} {'ModelSession':>13s} {'ratio':>6s}")
        for label, path in (
            ("as it is (nothing to guard)", model_file),
            ("+ int64 Div of inputs (guarded)", guarded_file),
        ):
            plain = _median_s(lambda p=path: (check_onnx_file(p), create_session(p)))
            served = _median_s(lambda p=path: ModelSession(p))
            print(f"{label:34s} {plain:8.3f}s {served:12.3f}s {served / plain:5.2f}x")
    if "--no-contents" in sys.argv:
        return
    before = _typed_answer(lambda field, flat: field.extend(flat.tolist()))
    after = _typed_answer(codec._fill_contents)
    print(f"\n{ELEMENTS} FP32 into fp32_contents  {'time':>8s} {'Python peak':>12s}")
    print(f"{'one list (before)':34s} {before[0]:7.2f}s {before[1] / 1e6:9.0f} MB")
    print(f"{'a slice at a time (after)':34s} {after[0]:7.2f}s {after[1] / 1e6:9.0f} MB")
    print(f"{'ratio after/before':34s} {after[0] / before[0]:7.2f}x {after[1] / before[1]:10.3f}x")


if __name__ == "__main__":
    main()
