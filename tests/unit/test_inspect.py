"""``onnxserve inspect``'s numbers checked against independent computation on models built here.

FLOPs are checked against PyTorch's own FLOP counter (``torch.utils.flop_counter``) running the same
operation at the same shapes; parameter counts and operator histograms against what the test put in.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

from onnxserve.errors import InvalidInputError, ModelLoadError
from onnxserve.toolkit.inspect import inspect_model, parse_shapes
from onnxserve.toolkit.model_file import load_model, locate_model

FLOAT = onnx.TensorProto.FLOAT


def torch_flops(run: object) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    assert callable(run)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def save(model: onnx.ModelProto, tmp_path: Path, name: str = "model.onnx") -> Path:
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def make(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
         initializers: list[onnx.TensorProto], opset: int = 17) -> onnx.ModelProto:  # fmt: skip
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializers)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def test_matmul_flops_parameters_and_histogram_at_a_given_shape(tmp_path: Path) -> None:
    import torch

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 10)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    model = make(
        [
            oh.make_node("MatMul", ["x", "w1"], ["h"], name="/encoder/proj/MatMul"),
            oh.make_node("Relu", ["h"], ["r"], name="/encoder/act/Relu"),
            oh.make_node("MatMul", ["r", "w2"], ["m"], name="/head/MatMul"),
            oh.make_node("Add", ["m", "bias"], ["y"], name="/head/Add"),
        ],
        [oh.make_tensor_value_info("x", FLOAT, ["batch", "sequence", 64])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", "sequence", 10])],
        [onh.from_array(w1, "w1"), onh.from_array(w2, "w2"), onh.from_array(bias, "bias")],
    )
    report = inspect_model(save(model, tmp_path), shapes=["x=3,7,64"])

    assert report.parameters == w1.size + w2.size + bias.size
    assert report.parameter_bytes == w1.nbytes + w2.nbytes + bias.nbytes
    assert report.op_histogram == dict(Counter(n.op_type for n in model.graph.node))
    assert [(v.name, v.shape) for v in report.inputs] == [("x", ["batch", "sequence", 64])]

    x = torch.zeros(3, 7, 64)
    expected = torch_flops(lambda: torch.relu(x @ torch.from_numpy(w1)) @ torch.from_numpy(w2))
    assert report.flops.total == expected
    assert report.flops.by_op == {"MatMul": expected}
    assert report.flops.input_shapes == {"x": [3, 7, 64]}
    assert report.flops.defaults == {}
    assert report.flops.unestimated == []


def test_symbolic_dims_default_to_one_and_are_reported_or_set_by_name(tmp_path: Path) -> None:
    import torch

    w = np.ones((16, 4), np.float32)
    model = make(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        [oh.make_tensor_value_info("x", FLOAT, ["batch", "sequence", 16])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", "sequence", 4])],
        [onh.from_array(w, "w")],
    )
    path = save(model, tmp_path)
    defaulted = inspect_model(path)
    assert defaulted.flops.defaults == {"batch": 1, "sequence": 1}
    assert defaulted.flops.total == torch_flops(lambda: torch.zeros(1, 1, 16) @ torch.from_numpy(w))
    named = inspect_model(path, shapes=["sequence=128"])
    assert named.flops.defaults == {"batch": 1}
    assert named.flops.input_shapes == {"x": [1, 128, 16]}
    assert named.flops.total == torch_flops(lambda: torch.zeros(1, 128, 16) @ torch.from_numpy(w))


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_flops_with_transposes(tmp_path: Path, trans_a: int, trans_b: int) -> None:
    import torch

    m, k, n = 5, 12, 7
    b = np.ones((n, k) if trans_b else (k, n), np.float32)
    c = np.zeros(n, np.float32)
    model = make(
        [oh.make_node("Gemm", ["a", "b", "c"], ["y"], transA=trans_a, transB=trans_b)],
        [oh.make_tensor_value_info("a", FLOAT, [k, m] if trans_a else [m, k])],
        [oh.make_tensor_value_info("y", FLOAT, [m, n])],
        [onh.from_array(b, "b"), onh.from_array(c, "c")],
    )
    report = inspect_model(save(model, tmp_path))
    linear = torch.nn.Linear(k, n)
    assert report.flops.total == torch_flops(lambda: linear(torch.zeros(m, k)))
    assert report.parameters == b.size + c.size


@pytest.mark.parametrize(("group", "stride", "pad"), [(1, 1, 0), (2, 2, 1), (4, 1, 1)])
def test_conv_flops_match_torch(tmp_path: Path, group: int, stride: int, pad: int) -> None:
    import torch

    c_in, c_out, k = 8, 12, 3
    weight = np.ones((c_out, c_in // group, k, k), np.float32)
    model = make(
        [oh.make_node("Conv", ["x", "w"], ["y"], group=group, strides=[stride, stride], pads=[pad] * 4)],
        [oh.make_tensor_value_info("x", FLOAT, ["n", c_in, "h", "w"])],
        [oh.make_tensor_value_info("y", FLOAT, ["n", "c", "oh", "ow"])],
        [onh.from_array(weight, "w")],
    )
    report = inspect_model(save(model, tmp_path), shapes=["x=2,8,17,13"])
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, groups=group, bias=False)
    assert report.flops.total == torch_flops(lambda: conv(torch.zeros(2, c_in, 17, 13)))
    assert report.parameters == weight.size


def test_conv_transpose_flops_match_torch(tmp_path: Path) -> None:
    import torch

    c_in, c_out, group = 4, 6, 2
    weight = np.ones((c_in, c_out // group, 3, 3), np.float32)
    model = make(
        [oh.make_node("ConvTranspose", ["x", "w"], ["y"], group=group, strides=[2, 2])],
        [oh.make_tensor_value_info("x", FLOAT, [2, c_in, 5, 5])],
        [oh.make_tensor_value_info("y", FLOAT, ["n", "c", "oh", "ow"])],
        [onh.from_array(weight, "w")],
    )
    report = inspect_model(save(model, tmp_path))
    deconv = torch.nn.ConvTranspose2d(c_in, c_out, 3, stride=2, groups=group, bias=False)
    assert report.flops.total == torch_flops(lambda: deconv(torch.zeros(2, c_in, 5, 5)))


def test_external_data_and_metadata_are_reported(tmp_path: Path) -> None:
    weights = np.arange(4096, dtype=np.float32).reshape(64, 64)
    model = make(
        [oh.make_node("MatMul", ["x", "w"], ["y"])],
        [oh.make_tensor_value_info("x", FLOAT, [1, 64])],
        [oh.make_tensor_value_info("y", FLOAT, [1, 64])],
        [onh.from_array(weights, "w")],
    )
    oh.set_model_props(model, {"author": "tests", "purpose": "external data"})
    model.producer_name = "unit-test"
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)  # fmt: skip
    report = inspect_model(tmp_path / "model.onnx")
    assert report.metadata == {"author": "tests", "purpose": "external data"}
    assert report.producer == "unit-test"
    [external] = report.external_data
    assert (external.location, external.tensors, external.bytes, external.present) == (
        "weights.bin",
        1,
        weights.nbytes,
        True,
    )
    assert report.parameters == weights.size
    (tmp_path / "weights.bin").unlink()
    assert inspect_model(tmp_path / "model.onnx").external_data[0].present is False


def test_version_folder_reports_its_pipeline_spec(tmp_path: Path) -> None:
    from onnxserve.core.pipeline import PipelineSpec

    model = make(
        [oh.make_node("Identity", ["input_ids"], ["y"])],
        [oh.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.INT64, ["batch", "sequence"])],
        [],
    )
    save(model, tmp_path)
    PipelineSpec(task="feature-extraction", inputs=["input_ids"], outputs=["y"], max_length=16).write(tmp_path)
    report = inspect_model(tmp_path)
    assert report.pipeline is not None
    assert report.pipeline["task"] == "feature-extraction"
    assert locate_model(tmp_path / "model.onnx").folder == tmp_path


def test_histogram_counts_nodes_inside_subgraphs(tmp_path: Path) -> None:
    then_graph = oh.make_graph(
        [oh.make_node("Neg", ["x"], ["t"]), oh.make_node("Abs", ["t"], ["t2"])], "then", [],
        [oh.make_tensor_value_info("t2", FLOAT, [2])],
    )  # fmt: skip
    else_graph = oh.make_graph(
        [oh.make_node("Abs", ["x"], ["e"])], "else", [], [oh.make_tensor_value_info("e", FLOAT, [2])]
    )
    model = make(
        [oh.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        [oh.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []), oh.make_tensor_value_info("x", FLOAT, [2])],
        [oh.make_tensor_value_info("y", FLOAT, [2])],
        [],
    )
    report = inspect_model(save(model, tmp_path))
    assert report.op_histogram == {"Abs": 2, "If": 1, "Neg": 1}
    assert report.nodes == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x", "expected NAME=D0,D1"),
        ("x=1,a", "expected NAME=D0,D1"),
        ("x=0,4", "must be positive"),
        ("x=1,2,3", "has 2 dims"),
        ("x=1,5", "fixed dim 4"),
        ("nope=3", "no input or symbolic dim named 'nope'"),
        ("batch=1,2", "a symbolic dim takes one number"),
    ],
)
def test_bad_shape_arguments_are_refused(tmp_path: Path, text: str, message: str) -> None:
    model = make(
        [oh.make_node("Relu", ["x"], ["y"])],
        [oh.make_tensor_value_info("x", FLOAT, ["batch", 4])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", 4])],
        [],
    )
    path = save(model, tmp_path)
    from onnxserve.toolkit.inspect import graph_signature

    inputs, _ = graph_signature(load_model(path))
    with pytest.raises(InvalidInputError, match=message):
        parse_shapes([text], inputs)


def test_missing_file_folder_without_model_and_non_onnx_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        inspect_model(tmp_path / "absent.onnx")
    with pytest.raises(ModelLoadError, match=r"no model\.onnx in this folder"):
        inspect_model(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 this is not a protobuf \x12\x99" * 10)
    with pytest.raises(ModelLoadError, match=": not an ONNX model"):
        inspect_model(garbage)


def test_fused_attention_flops_match_torch(tmp_path: Path) -> None:
    import torch

    batch, seq, hidden, heads = 2, 9, 16, 4
    weight = np.ones((hidden, 3 * hidden), np.float32)
    bias = np.zeros(3 * hidden, np.float32)
    model = make(
        [oh.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=heads)],
        [oh.make_tensor_value_info("x", FLOAT, ["batch", "sequence", hidden])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", "sequence", hidden])],
        [onh.from_array(weight, "w"), onh.from_array(bias, "b")],
    )
    model.opset_import.append(oh.make_opsetid("com.microsoft", 1))
    report = inspect_model(save(model, tmp_path), shapes=[f"x={batch},{seq},{hidden}"])

    qkv = torch.nn.Linear(hidden, 3 * hidden)

    def attention() -> None:
        q, k, v = qkv(torch.zeros(batch, seq, hidden)).split(hidden, dim=-1)
        q, k, v = (t.reshape(batch, seq, heads, hidden // heads).transpose(1, 2) for t in (q, k, v))
        torch.softmax(q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5, dim=-1) @ v

    assert report.flops.by_op == {"Attention": torch_flops(attention)}
    assert report.op_histogram == {"com.microsoft::Attention": 1}


def test_multi_head_attention_flops_match_torch(tmp_path: Path) -> None:
    import torch

    batch, seq, kv_len, hidden, heads = 2, 5, 7, 12, 3
    model = make(
        [oh.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=heads)],
        [
            oh.make_tensor_value_info("q", FLOAT, [batch, seq, hidden]),
            oh.make_tensor_value_info("k", FLOAT, [batch, kv_len, hidden]),
            oh.make_tensor_value_info("v", FLOAT, [batch, kv_len, hidden]),
        ],
        [oh.make_tensor_value_info("y", FLOAT, [batch, seq, hidden])],
        [],
    )
    model.opset_import.append(oh.make_opsetid("com.microsoft", 1))
    report = inspect_model(save(model, tmp_path))

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, -1, heads, hidden // heads).transpose(1, 2)

    def attention() -> None:
        q, k, v = (
            split(torch.zeros(batch, seq, hidden)),
            split(torch.zeros(batch, kv_len, hidden)),
            split(torch.zeros(batch, kv_len, hidden)),
        )
        torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    assert report.flops.by_op == {"MultiHeadAttention": torch_flops(attention)}


def test_exporter_value_info_with_symbolic_dims_takes_the_concrete_values(tmp_path: Path) -> None:
    """A reshape to a runtime shape hides the shape from inference; the exporter's value_info knows it."""
    import torch

    w = np.ones((8, 6), np.float32)
    model = make(
        [oh.make_node("Reshape", ["x", "target"], ["h"]), oh.make_node("MatMul", ["h", "w"], ["y"])],
        [
            oh.make_tensor_value_info("x", FLOAT, ["batch", "sequence", 8]),
            oh.make_tensor_value_info("target", onnx.TensorProto.INT64, [3]),
        ],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", "sequence", 6])],
        [onh.from_array(w, "w")],
    )
    model.graph.value_info.append(oh.make_tensor_value_info("h", FLOAT, ["batch", "sequence", 8]))
    report = inspect_model(save(model, tmp_path), shapes=["batch=3", "sequence=11"])
    assert report.flops.unestimated == []
    assert report.flops.total == torch_flops(lambda: torch.zeros(3, 11, 8) @ torch.from_numpy(w))
