"""Per-row int8 of embedding tables (issue #19): a Gather over a large float table becomes a Gather of
int8 rows and of their scales, dequantized after the Gather; ONNX Runtime runs it, the rows stay
within their own rounding error, and the model shrinks. And block-wise int8 of the MatMuls selective
int8 keeps out of per-tensor int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxserve.toolkit.blockwise_quantization import blockwise_int8, blockwise_nodes
from onnxserve.toolkit.embedding_quantization import (
    MIN_TABLE_BYTES,
    embedding_tables,
    quantize_rows,
    quantize_tables,
    row_error,
)
from onnxserve.toolkit.quantize import quantize, settings_for

ROWS, WIDTH, HIDDEN = 2048, 256, 8  # a 2 MiB table


def table() -> npt.NDArray[np.float32]:
    """Rows whose ranges differ by up to 1000x, as a real vocabulary's do (rare tokens, small rows):
    one scale for the whole table would round the small rows to nothing."""
    rng = np.random.default_rng(0)
    gains = np.geomspace(1e-3, 1.0, ROWS).astype(np.float32)[:, None]
    return (rng.standard_normal((ROWS, WIDTH)).astype(np.float32) * gains).astype(np.float32)


def embedding_model(weights: npt.NDArray[np.float32], tied: bool = False, axis: int = 0) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul -> hidden; ``tied``: the table is also read by a MatMul."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedding"], name="embed", axis=axis),
        helper.make_node("MatMul", ["embedding", "projection"], ["hidden"], name="project"),
    ]
    outputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", "tokens", WIDTH]),
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "tokens", HIDDEN]),
    ]
    if tied:
        nodes.append(helper.make_node("MatMul", ["query", "table"], ["logits"], name="tied"))
    graph = helper.make_graph(
        nodes,
        "embeddings",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "tokens"])]
        + ([helper.make_tensor_value_info("query", TensorProto.FLOAT, [1, ROWS])] if tied else []),
        outputs + ([helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, WIDTH])] if tied else []),
        [
            numpy_helper.from_array(weights, "table"),
            numpy_helper.from_array(
                np.random.default_rng(1).standard_normal((WIDTH, HIDDEN)).astype(np.float32), "projection"
            ),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


IDS = np.array([[0, 1, 5, 100, 2047], [-1, 1024, 7, 3, 0]], dtype=np.int64)  # negative ids too


def run(model: onnx.ModelProto | Path, output: str = "embedding") -> npt.NDArray[np.float32]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    result: npt.NDArray[np.float32] = session.run([output], {"ids": IDS})[0]
    return result


def test_the_int8_rows_stay_within_their_own_rounding_and_the_model_shrinks() -> None:
    weights = table()
    model = embedding_model(weights)
    (found,) = embedding_tables(model)
    assert (found.name, found.nodes, found.rows, found.width) == ("table", ("embed",), ROWS, WIDTH)

    quantized = quantize_tables(model, ["table"])
    initializers = {t.name: t for t in quantized.graph.initializer}
    assert "table" not in initializers
    assert initializers["table_int8"].data_type == TensorProto.INT8
    assert list(initializers["table_row_scale"].dims) == [ROWS, 1]
    assert [n.op_type for n in quantized.graph.node] == ["Gather", "Cast", "Gather", "Mul", "MatMul"]
    onnx.checker.check_model(quantized, full_check=True)

    got, want = run(quantized), weights[IDS]
    half_step = (np.abs(weights).max(axis=1) / 127 / 2)[IDS][..., None]
    assert np.all(np.abs(got - want) <= half_step * 1.001 + 1e-12)  # every row within its own step
    small_rows = IDS < ROWS // 8  # the rows a single table-wide scale would round to zero
    assert np.all(np.abs(got[small_rows]).max(axis=-1) > 0)
    assert row_error(weights) < 0.01
    hidden, reference = run(quantized, "hidden"), run(model, "hidden")
    assert np.linalg.norm(hidden - reference) / np.linalg.norm(reference) < 0.02

    before, after = model.ByteSize(), quantized.ByteSize()
    assert before / after > 3.5
    assert after <= found.int8_bytes + (before - found.float_bytes) + 1024


def test_only_large_tables_read_only_by_row_gathers_qualify() -> None:
    assert embedding_tables(embedding_model(table(), tied=True)) == []  # also a MatMul's weight
    assert embedding_tables(embedding_model(table(), axis=1)) == []  # gathers columns
    small = table()[: MIN_TABLE_BYTES // (4 * WIDTH) - 1]
    assert embedding_tables(embedding_model(small)) == []
    assert len(embedding_tables(embedding_model(small), min_bytes=0)) == 1
    untouched = embedding_model(table(), tied=True)
    assert quantize_tables(untouched, ["table"]) == untouched


def test_a_zero_row_stays_zero() -> None:
    weights = table()
    weights[3] = 0
    rows, scales = quantize_rows(weights)
    assert not rows[3].any()
    assert np.isfinite(scales).all()
    assert np.all(run(quantize_tables(embedding_model(weights), ["table"]))[1, 3] == 0)  # IDS[1, 3] is row 3


def test_int8_quantization_quantizes_the_table_per_row_unless_its_gather_stays_float(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(embedding_model(table()), str(src))
    settings = settings_for("int8", reduce_range=False)

    dst = tmp_path / "int8.onnx"
    (entry,) = quantize(src, dst, settings)
    assert entry["table"] == "table"
    assert entry["quantized"]
    assert entry["bytes"] == ROWS * WIDTH + 4 * ROWS
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "MatMulInteger" in ops  # ONNX Runtime's quantizer did the MatMul
    assert ops.count("Gather") == 2  # and left the rows to the per-row path (no per-tensor Gather)
    assert src.stat().st_size / dst.stat().st_size > 3.5
    np.testing.assert_allclose(run(dst), table()[IDS], atol=float(np.abs(table()).max()) / 254 * 1.001)

    kept = tmp_path / "kept.onnx"
    (entry,) = quantize(src, kept, settings, exclude=["embed"])
    assert not entry["quantized"]
    assert entry["bytes"] == entry["float_bytes"] == 4 * ROWS * WIDTH
    np.testing.assert_array_equal(run(kept), table()[IDS])


# -- block-wise int8: the form of the MatMuls selective int8 keeps out of per-tensor int8 -------------------


def test_blockwise_int8_rewrites_only_the_named_matmuls_and_stays_close(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    first, second = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "first"], ["h"], name="first_mm"),
            helper.make_node("MatMul", ["h", "second"], ["y"], name="second_mm"),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(first, "first"), numpy_helper.from_array(second, "second")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert blockwise_int8(model, []) == model  # nothing named: nothing rewritten (not "every MatMul")

    rewritten = blockwise_int8(model, ["second_mm", "absent"])
    assert blockwise_nodes(rewritten) == ["second_mm"]
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "MatMulNBits"]
    assert {t.name for t in rewritten.graph.initializer} >= {"first"}
    assert "second" not in {t.name for t in rewritten.graph.initializer}
    assert model.ByteSize() - rewritten.ByteSize() > 0.7 * second.nbytes  # the weight is a quarter (+ scales)

    x = rng.standard_normal((4, 64)).astype(np.float32)
    want = (x @ first) @ second
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["y"], {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02

    # through the toolkit's quantizer: kept out of per-tensor int8, then block-wise
    src, dst = tmp_path / "two.onnx", tmp_path / "two-int8.onnx"
    onnx.save(model, str(src))
    assert (
        quantize(src, dst, settings_for("int8", reduce_range=False), exclude=["second_mm"], blockwise=["second_mm"])
        == []
    )
    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert "MatMulInteger" in ops
    assert "MatMulNBits" in ops
