"""Outputs for an input and intermediate tensors, computed by ONNX Runtime and checked with numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

from onnxserve.errors import InvalidInputError
from onnxserve.toolkit.probe import run_model, select_intermediates

FLOAT = onnx.TensorProto.FLOAT
W = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], np.float32)


def two_layer(tmp_path: Path) -> Path:
    """x[n, 2] -> MatMul(W) -> Relu -> ReduceSum -> y[n, 1]; and an int64 input that is doubled."""
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["hidden"], name="/layer/MatMul"),
            oh.make_node("Relu", ["hidden"], ["active"], name="/layer/Relu"),
            oh.make_node("ReduceSum", ["active", "axes"], ["y"], name="/head/ReduceSum", keepdims=1),
            oh.make_node("Add", ["k", "k"], ["k2"], name="/aux/Add"),
        ],
        "two_layer",
        [oh.make_tensor_value_info("x", FLOAT, ["n", 2]), oh.make_tensor_value_info("k", onnx.TensorProto.INT64, [2])],
        [oh.make_tensor_value_info("y", FLOAT, ["n", 1]), oh.make_tensor_value_info("k2", onnx.TensorProto.INT64, [2])],
        [onh.from_array(W, "w"), onh.from_array(np.array([1], np.int64), "axes")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "two_layer.onnx"
    onnx.save(model, str(path))
    return path


X = [[1.0, 2.0], [-3.0, 0.5]]


def test_outputs_and_intermediates_match_numpy(tmp_path: Path) -> None:
    path = two_layer(tmp_path)
    before = path.read_bytes()
    result = run_model(path, json.dumps({"x": X, "k": [4, 5]}), intermediates="hidden,/layer/Relu")
    x = np.array(X, np.float32)
    hidden = x @ W
    active = np.maximum(hidden, 0)
    assert list(result.intermediates) == ["hidden", "active"]
    h = result.intermediates["hidden"].summary
    assert h.shape == [2, 3]
    assert (h.min, h.max) == (pytest.approx(float(hidden.min())), pytest.approx(float(hidden.max())))
    assert h.mean == pytest.approx(float(hidden.mean()))
    assert result.intermediates["active"].summary.sparsity == pytest.approx(np.count_nonzero(active == 0) / active.size)
    assert result.intermediates["hidden"].preview == pytest.approx(hidden.reshape(-1).tolist())
    assert result.outputs["y"].preview == pytest.approx(active.sum(axis=1).tolist())
    assert result.outputs["k2"].preview == [8, 10]
    assert result.task_result is None
    assert path.read_bytes() == before  # the model on disk is not changed
    document = result.to_json()
    json.dumps(document)
    assert set(document["intermediates"]) == {"hidden", "active"}
    assert set(result.summaries()) == {"y", "k2", "hidden", "active"}


def test_inputs_from_npz_npy_and_json_files(tmp_path: Path) -> None:
    path = two_layer(tmp_path)
    np.savez(tmp_path / "in.npz", x=np.array(X, np.float32), k=np.array([1, 2]))
    from_npz = run_model(path, str(tmp_path / "in.npz"))
    (tmp_path / "in.json").write_text(json.dumps({"x": X, "k": [1, 2]}))
    from_json = run_model(path, str(tmp_path / "in.json"))
    assert from_npz.outputs["y"].preview == from_json.outputs["y"].preview
    assert from_json.outputs["k2"].preview == [2, 4]
    # one-input model: a bare .npy
    graph = oh.make_graph(
        [oh.make_node("Neg", ["x"], ["y"])], "neg", [oh.make_tensor_value_info("x", FLOAT, [3])],
        [oh.make_tensor_value_info("y", FLOAT, [3])],
    )  # fmt: skip
    single = tmp_path / "neg.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(single))
    np.save(tmp_path / "x.npy", np.array([1.0, -2.0, 3.0], np.float32))
    assert run_model(single, str(tmp_path / "x.npy")).outputs["y"].preview == [-1.0, 2.0, -3.0]
    assert run_model(single, "[4, 5, 6]").outputs["y"].preview == [-4.0, -5.0, -6.0]


def test_patterns_select_tensors_and_node_outputs(tmp_path: Path) -> None:
    model = onnx.load(str(two_layer(tmp_path)))
    assert select_intermediates(model, "/layer/*") == ["hidden", "active"]
    assert select_intermediates(model, "act*, y") == ["active", "y"]
    assert select_intermediates(model, "*/RELU") == ["active"]  # patterns ignore case


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ("hiden", "no tensor or node named 'hiden'; did you mean hidden"),
        ("zzz*", "pattern 'zzz\\*' matches no tensor or node"),
    ],
)
def test_unknown_intermediates_are_refused(tmp_path: Path, selection: str, message: str) -> None:
    path = two_layer(tmp_path)
    with pytest.raises(InvalidInputError, match=message):
        run_model(path, json.dumps({"x": X, "k": [1, 2]}), intermediates=selection)


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    path = two_layer(tmp_path)
    cases = {
        json.dumps({"x": X}): "missing k",
        json.dumps({"x": X, "k": [1, 2], "z": 1}): "unknown z",
        "{not json": "not valid JSON",
        json.dumps({"x": [["a", "b"]], "k": [1, 2]}): "input 'x': cannot make a float32 tensor",
        json.dumps({"x": [1.0, 2.0, 3.0], "k": [1, 2]}): "the model refused the input",
        str(tmp_path / "absent.npz"): "no such file",
        str(path): "expected a .npy, .npz or .json file",
    }
    np.save(tmp_path / "one.npy", np.zeros((2, 2), np.float32))
    cases[str(tmp_path / "one.npy")] = "a .npy file holds one tensor"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    cases[str(tmp_path / "bad.npz")] = "not a readable .npz file"
    for data, message in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            run_model(path, data)
