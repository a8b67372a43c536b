"""``diff_models`` on pairs of models built here that differ in known ways."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from onnxserve.errors import InvalidInputError, ModelLoadError
from onnxserve.toolkit import sample_inputs
from onnxserve.toolkit.diff import RunLimits, compare_outputs, diff_models
from onnxserve.toolkit.graph import node_ids
from onnxserve.toolkit.model_file import load_model

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 3)).astype(np.float32)
BIAS = RNG.standard_normal(3).astype(np.float32)


def mlp(
    weight: npt.NDArray[np.float32] = W,
    alpha: float = 0.1,
    opset: int = 17,
    names: tuple[str, str, str] = ("mm", "add", "act"),
    hidden: str = "h",
    extra_relu: bool = False,
) -> onnx.ModelProto:
    """y = LeakyRelu(x @ W + b) on x: float[batch, 4]; optionally a Relu after it."""
    last = "y0" if extra_relu else "y"
    nodes = [
        helper.make_node("MatMul", ["x", "W"], [hidden], name=names[0]),
        helper.make_node("Add", [hidden, "B"], ["z"], name=names[1]),
        helper.make_node("LeakyRelu", ["z"], [last], name=names[2], alpha=alpha),
    ]
    if extra_relu:
        nodes.append(helper.make_node("Relu", ["y0"], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_run(model: onnx.ModelProto, feeds: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feeds)]


def test_identical_models_have_no_differences() -> None:
    diff = diff_models(mlp(), mlp())
    assert diff.identical
    assert diff.nodes_matched == 3
    assert diff.numeric is not None
    assert diff.numeric.ran
    assert [o.max_abs_diff for o in diff.numeric.outputs] == [0.0]


def test_a_changed_weight_is_measured() -> None:
    changed = W.copy()
    changed[0, 1] += 0.5
    changed[2, 2] -= 0.25
    changed[3, 0] *= 3.0
    diff = diff_models(mlp(), mlp(weight=changed))

    assert not diff.nodes_added
    assert not diff.nodes_removed
    [init] = diff.initializers
    assert init.name == "W"
    assert init.change == "changed"
    assert init.stats is not None
    delta = np.abs(changed.astype(np.float64) - W.astype(np.float64))
    assert init.stats.max_abs_diff == pytest.approx(delta.max())
    assert init.stats.mean_abs_diff == pytest.approx(delta.mean())
    expected_l2 = np.linalg.norm(changed.astype(np.float64) - W) / np.linalg.norm(W.astype(np.float64))
    assert init.stats.relative_l2 == pytest.approx(expected_l2)
    assert init.stats.changed == 3
    assert init.stats.size == 12
    [node] = diff.nodes_changed
    assert node.a.id == "mm"
    assert node.reasons == ["weights"]
    assert diff.highlight_a() == {"mm": "changed"}
    assert diff.highlight_b() == {"mm": "changed"}


def test_the_numeric_comparison_matches_onnx_runtime() -> None:
    changed = W + RNG.standard_normal(W.shape).astype(np.float32) * 0.05
    a, b = mlp(), mlp(weight=changed)
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    diff = diff_models(a, b, samples={"x": x})
    assert diff.numeric is not None
    assert diff.numeric.ran
    assert not diff.numeric.generated
    [ya] = ort_run(a, {"x": x})
    [yb] = ort_run(b, {"x": x})
    [out] = diff.numeric.outputs
    fa, fb = ya.astype(np.float64).ravel(), yb.astype(np.float64).ravel()
    assert out.name == "y"
    assert out.shape_a == [5, 3] == out.shape_b
    assert out.max_abs_diff == pytest.approx(np.abs(fa - fb).max())
    assert out.max_abs_diff > 0
    assert out.mean_abs_diff == pytest.approx(np.abs(fa - fb).mean())
    # the one comparer's cosine: the lowest over rows (one row per input), not one over the whole tensor
    rows = [
        float(r @ s / (np.linalg.norm(r) * np.linalg.norm(s))) for r, s in zip(ya.astype(np.float64), yb, strict=True)
    ]
    assert out.cosine == pytest.approx(min(rows))
    assert out.agreement == pytest.approx(np.mean(ya.argmax(axis=1) == yb.argmax(axis=1)))


def test_an_added_node_is_added_and_unmapped() -> None:
    diff = diff_models(mlp(), mlp(extra_relu=True))
    assert [(n.id, n.op_type) for n in diff.nodes_added] == [("relu", "Relu")]
    assert not diff.nodes_removed
    assert [n.id for n in diff.unmapped] == ["relu"]
    # The LeakyRelu now writes y0 instead of y, which it still computes the same way: not a change.
    assert not diff.nodes_changed
    assert diff.highlight_b() == {"relu": "added"}


def test_a_renamed_but_identical_node_is_matched_by_structure() -> None:
    a = mlp()
    b = mlp(names=("matmul_renamed", "add", "act"), hidden="hidden_renamed")
    diff = diff_models(a, b)
    assert not diff.nodes_added
    assert not diff.nodes_removed
    assert not diff.nodes_changed
    assert [(x.id, y.id) for x, y in diff.nodes_renamed] == [("mm", "matmul_renamed")]
    assert ("mm", "matmul_renamed", "structure") in diff.matched


def test_nameless_nodes_are_matched_by_structure() -> None:
    text = """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[n, 3] x) => (float[n, 3] y) {
            a = Relu(x)
            b = Sigmoid(a)
            y = Add(a, b)
        }
    """
    changed = text.replace("b = Sigmoid(a)", "b = Tanh(a)")
    diff = diff_models(onnx.parser.parse_model(text), onnx.parser.parse_model(changed))
    assert [n.id for n in diff.nodes_removed] == ["Sigmoid_1"]
    assert [n.id for n in diff.nodes_added] == ["Tanh_1"]
    # The Tanh writes the tensor the Sigmoid wrote: it replaces it; the Add reading it is the same node.
    assert [([r.id for r in x.replaces], x.b.id) for x in diff.replacements] == [(["Sigmoid_1"], "Tanh_1")]
    assert not diff.nodes_changed
    assert [(a, b, by) for a, b, by in diff.matched] == [
        ("Relu_0", "Relu_0", "structure"),
        ("Add_2", "Add_2", "structure"),
    ]


def test_a_changed_attribute_is_reported_with_both_values() -> None:
    diff = diff_models(mlp(alpha=0.1), mlp(alpha=0.3))
    [node] = diff.nodes_changed
    assert node.a.id == "act"
    assert node.reasons == ["attributes"]
    assert node.matched_by == "name"
    [attribute] = node.attributes
    assert attribute.name == "alpha"
    assert float(attribute.a or "nan") == pytest.approx(0.1)
    assert float(attribute.b or "nan") == pytest.approx(0.3)
    assert not diff.initializers


def test_signature_changes_are_listed_and_block_generated_inputs() -> None:
    a = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[batch, 4] x) => (float[batch, 4] y) { y = Relu(x) }
        """
    )
    b = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[2, 4] x, float[2, 4] bias) => (float[2, 4] y, double[2, 4] wide) {
            r = Relu(x)
            y = Add(r, bias)
            wide = Cast <to = 11> (y)
        }
        """
    )
    diff = diff_models(a, b)
    changes = {(s.kind, s.name): (s.change, str(s.a), str(s.b)) for s in diff.signature}
    assert changes == {
        ("input", "x"): ("changed", "FLOAT[batch, 4]", "FLOAT[2, 4]"),
        ("input", "bias"): ("added", "None", "FLOAT[2, 4]"),
        ("output", "y"): ("changed", "FLOAT[batch, 4]", "FLOAT[2, 4]"),
        ("output", "wide"): ("added", "None", "DOUBLE[2, 4]"),
    }
    assert diff.numeric is not None
    assert not diff.numeric.ran
    assert diff.numeric.reason == "B needs inputs A does not have: bias"


def test_an_opset_change_is_a_version_change_only() -> None:
    diff = diff_models(mlp(opset=17), mlp(opset=18))
    assert [(v.what, v.a, v.b) for v in diff.versions] == [("opset:ai.onnx", "17", "18")]
    assert not diff.nodes_changed
    assert not diff.nodes_added
    assert not diff.signature


def test_generated_samples_respect_dims_and_index_ranges() -> None:
    model = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (int64[batch, seq] ids, int64[batch, seq] mask, float[batch, 3] extra) => (float[batch, seq, 4] y) {
            y = Gather(table, ids)
        }
        """
    )
    model.graph.initializer.append(numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table"))
    feeds = sample_inputs.generate(sample_inputs.signature(model.graph), sample_inputs.index_bounds([model.graph]))
    assert feeds["ids"].shape == feeds["mask"].shape == (2, 8)
    assert feeds["extra"].shape == (2, 3)
    assert feeds["extra"].dtype == np.float32
    assert feeds["ids"].dtype == np.int64
    assert feeds["ids"].min() >= 0
    assert feeds["ids"].max() < 10
    assert (feeds["mask"] == 1).all()  # not an index: ones, as an attention mask that keeps every token
    ort_run(model, feeds)  # the generated inputs are valid for the model


def test_quantized_weights_map_back_to_the_float_nodes(tmp_path: Path) -> None:
    weight = RNG.standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
            helper.make_node("Relu", ["h"], ["y"], name="act"),
        ],
        "q",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(weight, "W")],
    )
    plain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(plain, tmp_path / "plain.onnx")
    quantize_dynamic(tmp_path / "plain.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    quantized = load_model(tmp_path / "int8.onnx")

    diff = diff_models(load_model(tmp_path / "plain.onnx"), quantized)
    ids = node_ids(quantized.graph.node)
    added = {n.id for n in diff.nodes_added}
    assert added == {ids[k] for k, node in enumerate(quantized.graph.node) if node.name not in ("act",)}
    assert [n.id for n in diff.nodes_removed] == ["proj"]
    assert not diff.unmapped
    for replacement in diff.replacements:
        assert [r.id for r in replacement.replaces] == ["proj"], replacement
    [init] = diff.initializers
    assert init.name == "W"
    assert init.change == "quantized"
    assert set(init.b_names) == {"W_quantized", "W_scale", "W_zero_point"}
    tensors = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    scale = float(tensors["W_scale"])
    restored = (tensors["W_quantized"].astype(np.float64) - float(tensors["W_zero_point"])) * scale
    assert init.stats is not None
    assert init.stats.max_abs_diff == pytest.approx(np.abs(restored - weight).max())
    assert init.stats.max_abs_diff <= scale / 2 + 1e-7  # rounding to the nearest step
    assert diff.numeric is not None
    assert diff.numeric.ran
    [out] = diff.numeric.outputs
    assert out.cosine is not None
    assert out.cosine > 0.99


def test_bad_model_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match=r"no model\.onnx in this folder"):
        load_model(tmp_path)
    (tmp_path / "text.onnx").write_text("not a model at all\n")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(tmp_path / "text.onnx")


def test_samples_that_miss_an_input_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="samples lack input"):
        diff_models(mlp(), mlp(), samples={"other": np.zeros((1, 4), np.float32)})


def test_a_large_rewrite_maps_as_one_group() -> None:
    a = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        g (float[n, 3] x) => (float[n, 3] y) {
            h = Relu(x)
            y = Sigmoid(h)
        }
        """
    )
    steps = 600  # above LARGE_GROUP: the group shares one mapping
    nodes = [helper.make_node("Neg", ["x"], ["t0"], name="neg0")]
    nodes += [helper.make_node("Neg", [f"t{k - 1}"], [f"t{k}"], name=f"neg{k}") for k in range(1, steps)]
    nodes += [
        helper.make_node("Abs", [f"t{steps - 1}"], ["h"], name="abs"),
        helper.make_node("Sigmoid", ["h"], ["y"]),
    ]
    b = helper.make_model(
        helper.make_graph(nodes, "g", list(a.graph.input), list(a.graph.output)),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=9,
    )
    diff = diff_models(a, b)
    assert [n.id for n in diff.nodes_removed] == ["Relu_0"]
    assert len(diff.nodes_added) == steps + 1
    assert all([r.id for r in rep.replaces] == ["Relu_0"] for rep in diff.replacements)
    assert [(x, y) for x, y, _ in diff.matched] == [("Sigmoid_1", f"Sigmoid_{steps + 1}")]
    assert diff.numeric is not None
    [out] = diff.numeric.outputs
    assert out.max_abs_diff is not None
    assert out.max_abs_diff > 0  # Abs(x) after an even number of Neg is not Relu(x)


def test_inputs_that_cannot_be_generated_skip_the_numeric_part_only() -> None:
    text = """
        <ir_version: 9, opset_import: ["" : 17]>
        g (string[n] s) => (string[n] t) { t = Identity(s) }
    """
    diff = diff_models(onnx.parser.parse_model(text), onnx.parser.parse_model(text))
    assert diff.identical
    assert diff.numeric is not None
    assert not diff.numeric.ran
    assert "cannot make sample values" in (diff.numeric.reason or "")


def _slow(products: int) -> onnx.ModelProto:
    """A small graph whose run takes long: x expanded to 1024 x 1024, squared ``products`` times."""
    shape = numpy_helper.from_array(np.array([1024, 1024], np.int64), "shape")
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Expand", ["x", "shape"], ["t0"]),
    ]
    nodes += [helper.make_node("MatMul", [f"t{i}", f"t{i}"], [f"t{i + 1}"]) for i in range(products)]
    nodes.append(helper.make_node("ReduceSum", [f"t{products}"], ["y"], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_a_run_longer_than_its_limit_is_stopped_and_the_diff_shown_without_it() -> None:
    """Outside attack rt23: each diff of a 79 KB model whose run takes minutes held a web page worker for
    its whole 60 s. A comparison given a time limit stops each run past it; the rest of the diff stands."""
    a, b = _slow(2_000), _slow(2_000)  # 2 GFLOP a product: minutes of single-threaded compute
    started = time.monotonic()
    numeric = compare_outputs(a, b, limits=RunLimits(rows=64, values=1 << 20, seconds=0.5))
    assert time.monotonic() - started < 20  # before: a run of minutes
    assert not numeric.ran
    assert "model A's run took longer than the 0.5 s it may take here" in (numeric.reason or ""), numeric.reason
    quick = compare_outputs(mlp(), mlp(), limits=RunLimits(rows=64, values=1 << 20, seconds=0.5))
    assert quick.ran, quick.reason  # a run within the limit is compared as before
    assert quick.outputs
