"""The toolkit's one comparer and one input generator (#16): export's validation, ``optimize``'s report and
``diff`` give the same answer about the same pair of models on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxserve.core.runtime import ModelSession
from onnxserve.toolkit.diff import diff_models
from onnxserve.toolkit.evaluation import AccuracyBudget
from onnxserve.toolkit.export.inputs import parse_input_spec, random_inputs
from onnxserve.toolkit.model_file import load_model
from onnxserve.toolkit.optimize import OptimizeOptions, optimize
from onnxserve.toolkit.sample_inputs import SMALL_INTEGERS, index_bounds, random_feeds, signature
from onnxserve.toolkit.samples import generate
from onnxserve.toolkit.validate import compare


def two_layers() -> onnx.ModelProto:
    """y = Relu(x @ W1) @ W2 on x: float[batch, 16] -> float[batch, 8]."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
        ],
        "two_layers",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8])],
        [
            numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W2"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_export_validation_optimize_report_and_diff_agree(tmp_path: Path) -> None:
    source = tmp_path / "float.onnx"
    onnx.save(two_layers(), str(source))
    x = np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32)  # one batch of the evaluation set
    np.savez(tmp_path / "eval.npz", x=x)
    quantized = tmp_path / "int8.onnx"
    options = OptimizeOptions(
        quantize="int8",
        evaluation=tmp_path / "eval.npz",
        budget=AccuracyBudget(),  # no budget: one plain int8 pass, whatever its accuracy
        latency_batches=(1,),
        repeats=1,
        allow_slower=True,
    )
    report = optimize(source, quantized, options)
    [optimized] = report.accuracy.outputs

    [diffed] = diff_models(load_model(source), load_model(quantized), samples={"x": x}).numeric.outputs  # type: ignore[union-attr]

    a, b = ModelSession(source), ModelSession(quantized)
    validation = compare([("eval", {"x": x})], a.run, b.run, atol=1e-5, min_cosine=0.0, embedding_outputs=["y"],
                         agreement_outputs=["y"])  # fmt: skip
    [case] = validation.cases

    assert optimized.cosine is not None
    assert optimized.cosine < 0.99999  # int8 changed something to measure
    assert diffed.cosine == pytest.approx(optimized.cosine, abs=1e-12)
    assert case.min_cosine["y"] == pytest.approx(optimized.cosine, abs=1e-12)
    assert diffed.max_abs_diff == pytest.approx(optimized.max_abs, abs=1e-12)
    assert case.max_abs_diff["y"] == pytest.approx(optimized.max_abs, abs=1e-12)
    assert diffed.agreement == optimized.agreement == case.agreement["y"]
    assert diffed.mean_abs_diff == pytest.approx(optimized.mean_abs, abs=1e-12)


def test_one_integer_rule_for_export_optimize_and_diff() -> None:
    vocab = 13
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed")],
            "ids",
            [
                helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
                helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"]),
                helper.make_tensor_value_info("token_type_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
                helper.make_tensor_value_info("bucket", onnx.TensorProto.INT32, ["batch"]),
            ],
            [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["batch", "sequence", 4])],
            [numpy_helper.from_array(np.zeros((vocab, 4), np.float32), "table")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    bounds = index_bounds([model.graph])
    specs = [
        parse_input_spec(t)
        for t in (
            "input_ids:batch,sequence:int64",
            "attention_mask:batch,sequence:int64",
            "token_type_ids:batch,sequence:int64",
            "bucket:batch:int32",
        )
    ]
    exported = random_inputs(specs, {"batch": 64, "sequence": 32}, np.random.default_rng(0), bounds)
    made = {
        "export": exported,
        "optimize": generate(model).batches[0],  # optimize / tune
        "diff": random_feeds(signature(model.graph), bounds, np.random.default_rng(0)),
    }
    for who, feeds in made.items():
        assert set(np.unique(feeds["input_ids"])) <= set(range(vocab)), who
        assert (feeds["attention_mask"] == 1).all(), who
        assert (feeds["token_type_ids"] == 0).all(), who
        assert set(np.unique(feeds["bucket"])) <= set(range(SMALL_INTEGERS)), who
        assert feeds["input_ids"].shape == feeds["attention_mask"].shape, who  # one size per symbol
    assert len(np.unique(exported["input_ids"])) == vocab  # the whole table is drawn from
    assert len(np.unique(exported["bucket"])) > 1
    assert exported["input_ids"].shape == (64, 32)
