"""Each transform of ``onnxserve optimize`` on small models, with the report's numbers checked against
an independent computation in the test (both models re-run here with ONNX Runtime; sizes via os.stat)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from onnxserve.errors import ModelLoadError, OptimizeError
from onnxserve.toolkit.fusion import fuse
from onnxserve.toolkit.optimize import BudgetError, OptimizeOptions, optimize
from onnxserve.toolkit.optimize_report import AccuracyBudget
from onnxserve.toolkit.samples import generate, token_ranges

HEADER = '<ir_version: 9, opset_import: ["" : 17]>'


def parse(text: str, initializers: dict[str, npt.NDArray[Any]] | None = None) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f"{HEADER}\n{text}")
    for name, value in (initializers or {}).items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(seed: int = 0, width: int = 64) -> onnx.ModelProto:
    """x[batch, width] -> MatMul -> Relu -> MatMul: float weights worth quantizing, plus foldable constants."""
    rng = np.random.default_rng(seed)
    return parse(
        f"""
        mlp (float[batch, {width}] x) => (float[batch, {width}] y) {{
            one = Constant <value = float[1] {{1.0}}> ()
            two = Constant <value = float[1] {{2.0}}> ()
            scale = Mul(one, two)
            h = MatMul(x, w1)
            r = Relu(h)
            z = MatMul(r, w2)
            y = Div(z, scale)
        }}
        """,
        {
            "w1": rng.standard_normal((width, width)).astype(np.float32) / 8,
            "w2": rng.standard_normal((width, width)).astype(np.float32) / 8,
        },
    )


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run(path: Path, feeds: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def lowest_cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(((a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))).min())


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


FAST = {"latency_batches": (1, 2), "repeats": 2, "allow_slower": True}  # tiny models: speed is not the point


def test_level_basic_folds_constants_and_reports_true_numbers(tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "mlp.onnx")
    dst = tmp_path / "out" / "mlp.onnx"
    report = optimize(src, dst, OptimizeOptions(level="basic", **FAST))  # type: ignore[arg-type]
    assert dst.is_file()
    assert ops(dst)["Constant"] == 0
    assert ops(dst)["Mul"] == 0
    saved = json.loads((tmp_path / "out" / "mlp.onnx.report.json").read_text())
    assert saved["size_bytes"]["before"] == os.stat(src).st_size
    assert saved["size_bytes"]["after"] == os.stat(dst).st_size
    assert set(saved["latency_ms"]["before"]) == {"1", "2"}
    feeds_list = generate(mlp()).batches
    diff = max(float(np.abs(run(src, f)[0] - run(dst, f)[0]).max()) for f in feeds_list)
    assert saved["accuracy"]["max_abs_diff"] == pytest.approx(diff, abs=1e-7)
    assert report.steps == ["level=basic"]


def test_simplify_removes_foldable_nodes(tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "mlp.onnx")
    dst = tmp_path / "simple.onnx"
    report = optimize(src, dst, OptimizeOptions(simplify=True, **FAST))  # type: ignore[arg-type]
    assert sum(ops(dst).values()) < sum(ops(src).values())
    assert report.accuracy.max_abs <= 1e-6


def test_dynamic_int8_is_smaller_and_its_cosine_is_what_the_test_computes(tmp_path: Path) -> None:
    src = save(mlp(width=128), tmp_path / "mlp.onnx")
    dst = tmp_path / "int8.onnx"
    report = optimize(src, dst, OptimizeOptions(quantize="int8", **FAST))  # type: ignore[arg-type]
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & set(ops(dst))
    assert os.stat(src).st_size / os.stat(dst).st_size > 3
    assert report.quantization is not None
    assert report.quantization["per_channel"] is True
    batches = generate(mlp(width=128), seed=1).batches  # the held-out split of generated inputs
    cosines = [lowest_cosine(run(src, f)[0], run(dst, f)[0]) for f in batches]
    assert report.accuracy.cosine == pytest.approx(min(cosines), abs=1e-6)
    assert 0.9 < min(cosines) < 1.0
    # label agreement: the share of rows whose arg-max (the class a classifier would pick) is unchanged
    same = np.concatenate([run(src, f)[0].argmax(1) == run(dst, f)[0].argmax(1) for f in batches])
    assert report.accuracy.agreement == pytest.approx(float(np.mean(same)))


def test_static_int8_calibrates_on_an_npz(tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "mlp.onnx")
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32))
    dst = tmp_path / "static.onnx"
    report = optimize(src, dst, OptimizeOptions(quantize="int8-static", calibration=calibration, **FAST))  # type: ignore[arg-type]
    assert ops(dst)["QuantizeLinear"] > 0
    assert ops(dst)["DequantizeLinear"] > 0
    assert report.accuracy.samples == "16 rows of calib.npz"
    x = np.load(calibration)["x"]
    diff = max(float(np.abs(run(src, {"x": x[i : i + 8]})[0] - run(dst, {"x": x[i : i + 8]})[0]).max()) for i in (0, 8))
    assert report.accuracy.max_abs == pytest.approx(diff, rel=1e-6)


def test_fp16_keeps_float32_inputs_and_outputs(tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "mlp.onnx")
    dst = tmp_path / "half.onnx"
    optimize(src, dst, OptimizeOptions(fp16=True, **FAST))  # type: ignore[arg-type]
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in model.graph.initializer if t.name.startswith("w")} == {onnx.TensorProto.FLOAT16}
    assert os.stat(dst).st_size < os.stat(src).st_size


def test_fusion_on_tiny_bert_reports_expected_and_achieved(tiny_text_version: Path, tmp_path: Path) -> None:
    dst = tmp_path / "fused" / "1"
    report = optimize(tiny_text_version, dst, OptimizeOptions(fuse=True, **FAST))  # type: ignore[arg-type]
    source_ops, fused_ops = ops(tiny_text_version / "model.onnx"), ops(dst / "model.onnx")
    layers = source_ops["Softmax"]
    assert layers == 2
    by_name = {f.name: f for f in report.fusions}
    assert by_name["Attention"].expected == layers
    assert by_name["Attention"].achieved == fused_ops["Attention"] + fused_ops["MultiHeadAttention"] == layers
    assert by_name["SkipLayerNormalization"].achieved == fused_ops["SkipLayerNormalization"] == 2 * layers
    for fusion in report.fusions:
        assert (fusion.reason == "") == (fusion.achieved >= fusion.expected)
    assert {"tokenizer.json", "onnxserve.json", "optimize_report.json", "model.onnx"} <= {p.name for p in dst.iterdir()}
    assert not (dst / "validation.json").exists()  # the export's report describes the source, not this model
    assert report.accuracy.cosine is not None
    assert report.accuracy.cosine > 0.99999


def outlier_model() -> onnx.ModelProto:
    """y = x @ w where w ignores feature 0 (which carries a huge, meaningless value)."""
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    w[0, :] = 0.0
    return parse(
        """
        outlier (float[batch, 64] x) => (float[batch, 64] y) {
            y = MatMul(x, w)
        }
        """,
        {"w": w},
    )


def test_int8_that_breaks_the_budget_writes_nothing(tmp_path: Path) -> None:
    """One huge activation makes dynamic (per-tensor) activation quantization too coarse for the rest."""
    src = save(outlier_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32) * 30
    x[:, 0] = 5000.0
    calibration = tmp_path / "x.npy"
    np.save(calibration, x)
    dst = tmp_path / "out" / "m.onnx"
    budget = AccuracyBudget(cosine=0.99)
    # every node int8 (selective int8 would take feature 0 through float and keep the budget)
    options = OptimizeOptions(quantize="int8", calibration=calibration, budget=budget, selective=False, **FAST)  # type: ignore[arg-type]
    with pytest.raises(BudgetError, match="breaks the accuracy budget") as failure:
        optimize(src, dst, options)
    assert not dst.exists()
    assert not (tmp_path / "out" / "m.onnx.report.json").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []
    cosine = failure.value.report.accuracy.cosine
    assert cosine is not None
    assert cosine < 0.99
    # without a budget ("none") the same transform is written: the budget made the difference; and
    # the written model is as bad as the refused report said
    options = OptimizeOptions(quantize="int8", calibration=calibration, budget=AccuracyBudget(), **FAST)  # type: ignore[arg-type]
    optimize(src, dst, options)
    ours = min(lowest_cosine(run(src, {"x": x[i : i + 8]})[0], run(dst, {"x": x[i : i + 8]})[0]) for i in (0, 8))
    assert ours == pytest.approx(cosine, abs=1e-6)


def test_a_failed_folder_optimization_keeps_the_previous_destination(tiny_text_version: Path, tmp_path: Path) -> None:
    dst = tmp_path / "kept" / "1"
    dst.mkdir(parents=True)
    (dst / "marker").write_text("old")
    with pytest.raises(BudgetError):
        optimize(
            tiny_text_version,
            dst,
            OptimizeOptions(quantize="int8", budget=AccuracyBudget(max_abs=0.0), force=True, **FAST),  # type: ignore[arg-type]
        )
    assert [p.name for p in dst.iterdir()] == ["marker"]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cos=0.9", "KEY one of cosine, agreement, max_abs"),
        ("cosine=high", "not a number"),
        ("cosine=2", "between -1 and 1"),
        ("max_abs=-1", ">= 0"),
        ("", "empty"),
    ],
)
def test_bad_budgets_are_refused(text: str, message: str) -> None:
    with pytest.raises(OptimizeError, match=message):
        AccuracyBudget.parse(text)


def test_budget_syntax() -> None:
    assert AccuracyBudget.parse("cosine=0.99, agreement=0.98,max-abs=0.5") == AccuracyBudget(0.99, 0.98, 0.5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (OptimizeOptions(level="max"), "choose one of basic, extended, all"),
        (OptimizeOptions(quantize="int4"), "choose one of int8, int8-static"),
        (OptimizeOptions(quantize="int8-static"), "needs --calibration"),
        (OptimizeOptions(quantize="int8", fp16=True), "cannot be combined"),
        (OptimizeOptions(repeats=0), "at least 1"),
    ],
)
def test_bad_options_are_refused(options: OptimizeOptions, message: str, tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "m.onnx")
    with pytest.raises(OptimizeError, match=message):
        optimize(src, tmp_path / "o.onnx", options)
    assert not (tmp_path / "o.onnx").exists()


def test_bad_sources_destinations_and_calibration_files_are_refused(tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "m.onnx")
    two = save(parse("two (float[n, 4] a, float[n, 4] b) => (float[n, 4] c) { c = Add(a, b) }"), tmp_path / "two.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    (tmp_path / "lines.txt").write_text("hello\n")
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.float32))
    np.savez(tmp_path / "ab.npz", a=np.zeros((4, 4), np.float32), z=np.zeros((4, 4), np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3), np.float32))
    cases: list[tuple[Path, Path, OptimizeOptions, str]] = [
        (src, tmp_path / "folder", OptimizeOptions(), "optimizes to a .onnx file"),
        (src, src, OptimizeOptions(), "already exists|is the source"),
        (src, tmp_path / "o.onnx", OptimizeOptions(calibration=tmp_path / "lines.txt"), "need a text model folder"),
        (two, tmp_path / "o.onnx", OptimizeOptions(calibration=tmp_path / "a.npy"), "give an .npz"),
        (two, tmp_path / "o.onnx", OptimizeOptions(calibration=tmp_path / "ab.npz"), "missing b; unknown z"),
        (src, tmp_path / "o.onnx", OptimizeOptions(calibration=tmp_path / "wrong.npy"), "needs size 64 on axis 1"),
        (src, tmp_path / "o.onnx", OptimizeOptions(calibration=tmp_path / "nope.npz"), "not found"),
    ]
    for source, dst, options, message in cases:
        with pytest.raises(OptimizeError, match=message):
            optimize(source, dst, options)
    with pytest.raises(ModelLoadError, match=r"missing\.onnx: no such file"):
        optimize(tmp_path / "missing.onnx", tmp_path / "o.onnx", OptimizeOptions())
    with pytest.raises(ModelLoadError, match=": not an ONNX model"):
        optimize(tmp_path / "junk.onnx", tmp_path / "o.onnx", OptimizeOptions())
    assert not (tmp_path / "o.onnx").exists()
    assert not (tmp_path / "folder").exists()
    (tmp_path / "exists.onnx").write_bytes(b"")
    with pytest.raises(OptimizeError, match="pass --force"):
        optimize(src, tmp_path / "exists.onnx", OptimizeOptions())


def test_generated_token_ids_stay_inside_the_embedding_table() -> None:
    vocab = 37
    model = parse(
        """
        emb (int64[batch, seq] input_ids, int64[batch, seq] attention_mask) => (float[batch, seq, 4] y) {
            e = Gather(table, input_ids)
            m = Cast<to = 1>(attention_mask)
            mu = Unsqueeze(m, axes)
            y = Mul(e, mu)
        }
        """,
        {"table": np.ones((vocab, 4), np.float32), "axes": np.array([-1], np.int64)},
    )
    assert token_ranges(model) == {"input_ids": vocab}
    for feeds in generate(model).batches:
        assert feeds["input_ids"].max() < vocab
        assert feeds["input_ids"].min() >= 0
        assert feeds["input_ids"].max() > 10  # the whole table's range, not a default
        assert (feeds["attention_mask"] == 1).all()


def test_attention_unpacked_for_int8_computes_the_same(tiny_text_version: Path, tmp_path: Path) -> None:
    """Before int8, each fused Attention becomes MatMul + Split + MultiHeadAttention: same numbers, and
    the QKV projection is then a quantizable MatMul."""
    src = tiny_text_version / "model.onnx"
    packed, unpacked = tmp_path / "packed.onnx", tmp_path / "unpacked.onnx"
    source = onnx.load(str(src))
    before = source.SerializeToString()
    onnx.save(fuse(source)[0], str(packed))
    fused, fusions, fusers = fuse(source, for_int8=True)
    onnx.save(fused, str(unpacked))
    assert source.SerializeToString() == before  # a pass leaves its input as it was
    assert ops(packed)["Attention"] == 2
    assert ops(unpacked)["Attention"] == 0
    assert ops(unpacked)["MultiHeadAttention"] == 2
    assert fusers["unpacked_for_int8"] == {"Attention": 2}
    assert {f.name: f.achieved for f in fusions}["Attention"] == 2
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0  # padding must be masked the same way
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((3, 7), np.int64)}
    for want, have, packed_out in zip(run(src, feeds), run(unpacked, feeds), run(packed, feeds), strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5)
        np.testing.assert_allclose(packed_out, want, atol=1e-5)
    quantized = tmp_path / "q" / "1"
    optimize(tiny_text_version, quantized, OptimizeOptions(fuse=True, quantize="int8", **FAST))  # type: ignore[arg-type]
    assert ops(quantized / "model.onnx")["MatMulInteger"] >= 2 * 4  # QKV, output, and two FFN projections per layer


def test_static_int8_calibrates_a_text_folder_on_text_lines(tiny_text_version: Path, tmp_path: Path) -> None:
    lines = tmp_path / "calibration.txt"
    lines.write_text("the quick brown fox\n\nwhere is the nearest train station?\nour team will review it\n")
    dst = tmp_path / "static" / "1"
    report = optimize(
        tiny_text_version,
        dst,
        OptimizeOptions(quantize="int8-static", calibration=lines, **FAST),  # type: ignore[arg-type]
    )
    # calibrated on the lines, measured on the held-out evaluation sentences (issue 19)
    assert report.accuracy.samples == "39 built-in evaluation sentences (held-out split)"
    assert report.accuracy.rows == 39
    assert ops(dst / "model.onnx")["QuantizeLinear"] > 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(OptimizeError, match="has no text lines"):
        optimize(tiny_text_version, tmp_path / "e" / "1", OptimizeOptions(quantize="int8-static", calibration=empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(OptimizeError, match="not UTF-8 text"):
        optimize(tiny_text_version, tmp_path / "b" / "1", OptimizeOptions(calibration=binary))
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


@pytest.mark.parametrize("level", ["extended", "all"])
def test_higher_levels_write_a_model_that_computes_the_same(level: str, tmp_path: Path) -> None:
    src = save(mlp(), tmp_path / "mlp.onnx")
    dst = tmp_path / f"{level}.onnx"
    report = optimize(src, dst, OptimizeOptions(level=level, **FAST))  # type: ignore[arg-type]
    feeds = generate(mlp()).batches[0]
    np.testing.assert_allclose(run(dst, feeds)[0], run(src, feeds)[0], atol=1e-5)
    assert report.accuracy.max_abs < 1e-5
    assert report.steps == [f"level={level}"]


def test_a_result_slower_at_every_batch_size_is_refused_unless_allowed(tmp_path: Path) -> None:
    """The speed decision, on a real report with its timings set to each case (timings themselves are
    never asserted: the machine decides them)."""
    from onnxserve.toolkit.optimize import SLOWER_MARGIN, SlowerError, slower_everywhere

    src = save(mlp(), tmp_path / "mlp.onnx")
    report = optimize(src, tmp_path / "simple.onnx", OptimizeOptions(simplify=True, **FAST))  # type: ignore[arg-type]
    report.latency_before_ms = {1: 1.0, 8: 4.0}
    report.latency_after_ms = {1: 8.78, 8: 20.0}
    assert slower_everywhere(report)
    message = SlowerError(report).message
    assert "slower than its source at every measured batch size" in message
    assert "batch 1: 8.78x slower" in message
    assert "--allow-slower" in message
    assert "was not written" in message
    assert isinstance(SlowerError(report), BudgetError)  # the CLI's convention: tables printed, exit 2

    report.latency_after_ms = {1: 8.78, 8: 3.0}  # faster at batch 8: worth writing
    assert not slower_everywhere(report)
    report.latency_after_ms = {1: 1.0 * SLOWER_MARGIN * 0.99, 8: 4.0 * SLOWER_MARGIN * 0.99}  # within noise
    assert not slower_everywhere(report)


def test_a_failed_file_optimization_leaves_the_previous_file_and_nothing_else(tmp_path: Path) -> None:
    """The passes run in memory and the result is written once at the end: a failure (here the budget)
    leaves the previous destination and its report as they were, and no work file beside them."""
    (tmp_path / "src").mkdir()
    src = save(mlp(), tmp_path / "src" / "m.onnx")
    out = tmp_path / "out"
    dst = out / "m.onnx"
    optimize(src, dst, OptimizeOptions(level="basic", **FAST))  # type: ignore[arg-type]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"m.onnx", "m.onnx.report.json"}
    strict = OptimizeOptions(quantize="int8", selective=False, budget=AccuracyBudget(max_abs=0.0), force=True, **FAST)  # type: ignore[arg-type]
    with pytest.raises(BudgetError):
        optimize(src, dst, strict)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.onnx"]


def test_the_passes_go_from_model_to_model_and_leave_their_input_alone() -> None:
    from onnxserve.toolkit.optimize import offline_level, simplify, to_fp16
    from onnxserve.toolkit.quantize import quantize_model, settings_for

    model = mlp()
    before = model.SerializeToString()
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    [want] = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    passes = {
        "simplify": simplify(model),
        "fp16": to_fp16(model),
        "level": offline_level(model, "basic"),
        "int8": quantize_model(model, settings_for("int8"))[0],
    }
    assert model.SerializeToString() == before
    for name, result in passes.items():
        assert isinstance(result, onnx.ModelProto), name
        session = ort.InferenceSession(result.SerializeToString(), providers=["CPUExecutionProvider"])
        [have] = session.run(None, {"x": x})
        assert lowest_cosine(want, have) > 0.99, name
    assert any(n.op_type == "DynamicQuantizeLinear" or "Integer" in n.op_type for n in passes["int8"].graph.node)
