"""Outlier channels kept in float: the split computes what the MatMul computed, and only the named
MatMuls, on the channels that really stand out, are split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxserve.toolkit.outlier_channels import (
    CHANNELS,
    channel_peaks,
    outlier_channels,
    side_nodes,
    split_nodes,
    split_outliers,
)
from onnxserve.toolkit.quantize import quantize, settings_for


def two_matmuls(shared: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="second"),
    ]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "tokens", 4])]
    if shared:  # the first weight read by another node too: it must stay
        nodes.append(helper.make_node("MatMul", ["x", "w1"], ["z"], name="reader"))
        outputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", "tokens", 8]))
    graph = helper.make_graph(
        nodes,
        "two",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "tokens", 16])],
        outputs,
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:  # type: ignore[type-arg]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"x": x}))


def test_the_split_computes_the_same_and_drops_the_replaced_weight() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 16)).astype(np.float32)
    model = two_matmuls()
    split = split_outliers(model, {"first": [3, 11], "second": [], "absent": [1]})
    onnx.checker.check_model(split)
    assert split_nodes(split) == ["first"]  # an empty list or an unknown node: nothing rewritten
    assert {n.name for n in split.graph.node} >= {"first", "second", *side_nodes("first")}
    assert "w1" not in {t.name for t in split.graph.initializer}  # replaced by the inlier weight
    np.testing.assert_allclose(run(split, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    assert split_outliers(model, {"first": [16]}) == model  # a channel the weight does not have

    shared = two_matmuls(shared=True)
    kept = split_outliers(shared, {"first": [3]})
    assert "w1" in {t.name for t in kept.graph.initializer}
    for got, want in zip(run(kept, x), run(shared, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_only_channels_far_above_the_median_are_outliers() -> None:
    values = np.random.default_rng(2).uniform(-1, 1, (4, 5, 64))
    assert outlier_channels(channel_peaks(values)) == []  # alike channels
    values[1, 2, 7] = 30.0
    values[0, 0, 40] = -10.0
    assert outlier_channels(channel_peaks(values)) == [7, 40]  # largest first, sign ignored
    values[..., :20] *= 50.0
    assert len(outlier_channels(channel_peaks(values))) == CHANNELS  # at most this many


def test_int8_with_a_split_keeps_the_side_product_in_float(tmp_path: Path) -> None:
    src, dst = tmp_path / "two.onnx", tmp_path / "int8.onnx"
    onnx.save(two_matmuls(), str(src))
    quantize(src, dst, settings_for("int8", reduce_range=False), outliers={"first": [3]})
    ops = [(n.op_type, n.name) for n in onnx.load(str(dst)).graph.node]
    assert ("MatMul", "first_outliers") in ops  # the side product stays float
    assert sum(op == "MatMulInteger" for op, _ in ops) == 2  # both MatMuls per-tensor int8
    x = np.random.default_rng(3).standard_normal((2, 3, 16)).astype(np.float32)
    want = run(two_matmuls(), x)[0]
    got = run(onnx.load(str(dst)), x)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
