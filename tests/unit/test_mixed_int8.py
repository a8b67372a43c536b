"""Issue 19, mixed int8: outlier channels in float, or block-wise int8, only where per-tensor int8 breaks
the budget.

A two-layer model whose first layer's input has outlier channels (their weight rows scaled down to
match, so the float model computes the same): per-tensor dynamic int8 of that input rounds every
other channel coarsely and breaks the budget. With **one** outlier channel, taking that channel
through a float side product keeps it (the first layer otherwise per-tensor int8); with 32 (more than
the split takes), block-wise int8 (one scale per block of the input) keeps it. The second layer is
harmless in per-tensor int8, which ONNX Runtime runs fastest: the search leaves it so.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxserve.errors import OptimizeError
from onnxserve.toolkit.evaluation import AccuracyBudget
from onnxserve.toolkit.optimize import ACCURACY_METADATA, BudgetError, OptimizeOptions, optimize
from onnxserve.toolkit.selective import parse_schemes

FAST = {"latency_batches": (1,), "repeats": 1, "threads": 1, "allow_slower": True}
WIDE, HIDDEN, OUT = 512, 64, 16
OUTLIER = 50.0
BUDGET = 0.98  # one outlier channel: full int8 ~0.94, all MatMuls in blocks of 128 ~0.97, of 32 ~0.99
SPREAD = 32  # outlier channels: more than a split takes (8), all in the first block of 32 values


def outlier_model(first: int = 5, channels: int = 1) -> onnx.ModelProto:
    """``channels`` input channels from ``first`` on OUTLIER times larger than the rest."""
    rng = np.random.default_rng(0)
    scale = np.ones(WIDE, dtype=np.float32)
    scale[first : first + channels] = OUTLIER
    w1 = (rng.standard_normal((WIDE, HIDDEN)) / np.sqrt(WIDE)).astype(np.float32)
    w1[first : first + channels, :] /= OUTLIER
    w2 = (rng.standard_normal((HIDDEN, OUT)) / np.sqrt(HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["xs"], name="outlier"),
            helper.make_node("MatMul", ["xs", "w1"], ["h0"], name="fc1"),
            helper.make_node("Tanh", ["h0"], ["h"], name="act"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
        ],
        "mixed",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", WIDE])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", OUT])],
        [
            numpy_helper.from_array(scale, "scale"),
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def sets(tmp_path: Path) -> dict[str, Any]:
    search, held_out = tmp_path / "search.npz", tmp_path / "held_out.npz"
    np.savez(search, x=np.random.default_rng(1).standard_normal((128, WIDE)).astype(np.float32))
    np.savez(held_out, x=np.random.default_rng(2).standard_normal((128, WIDE)).astype(np.float32))
    return {
        "quantize": "int8",
        "budget": AccuracyBudget(cosine=BUDGET),
        "calibration": search,
        "evaluation": held_out,
        **FAST,
    }


def test_one_outlier_channel_goes_through_float_and_the_matmul_stays_per_tensor_int8(tmp_path: Path) -> None:
    src = tmp_path / "mixed.onnx"
    onnx.save(outlier_model(), str(src))
    common = sets(tmp_path)

    with pytest.raises(BudgetError) as failure:  # every node per-tensor int8
        optimize(src, tmp_path / "full.onnx", OptimizeOptions(selective=False, **common))  # type: ignore[arg-type]
    full = failure.value.report.accuracy.cosine
    assert full is not None
    assert full < BUDGET

    dst = tmp_path / "selective.onnx"
    report = optimize(src, dst, OptimizeOptions(**common))  # type: ignore[arg-type]
    assert report.accuracy.samples == "128 rows of held_out.npz"  # rows the search never saw
    assert report.accuracy.cosine is not None
    assert report.accuracy.cosine > 0.999  # the outlier channel is exact, the rest finely rounded
    selection = report.selection
    assert selection is not None
    assert (selection["float_nodes"], selection["blockwise_int8_nodes"]) == ([], [])
    assert selection["outlier_channel_nodes"] == {"fc1": [5]}  # found on the search rows; fc2 has none
    assert selection["sensitivity"]["fc1"] > 0
    # the search's tries: full int8 (fails), fc1 split (keeps), fc1 back to plain per-tensor int8 (fails)
    tries = [(t["outlier_channel_nodes"], t["blockwise_nodes"], t["passed"]) for t in selection["trials"]]
    assert tries == [(0, 0, False), (1, 0, True), (0, 0, False)]
    written = ops(dst)
    assert (written["MatMulInteger"], written["MatMul"], written["MatMulNBits"]) == (2, 1, 0)  # 1: the side product
    record = json.loads({p.key: p.value for p in onnx.load(str(dst)).metadata_props}[ACCURACY_METADATA])
    assert record["outlier_channel_nodes"] == {"fc1": [5]}


def test_mixed_int8_keeps_only_the_sensitive_matmul_block_wise(tmp_path: Path) -> None:
    src = tmp_path / "mixed.onnx"
    onnx.save(outlier_model(first=0, channels=SPREAD), str(src))
    common = sets(tmp_path)

    dst = tmp_path / "selective.onnx"
    report = optimize(src, dst, OptimizeOptions(**common))  # type: ignore[arg-type]
    assert report.accuracy.samples == "128 rows of held_out.npz"  # rows the search never saw
    assert report.accuracy.cosine is not None
    assert report.accuracy.cosine >= BUDGET
    selection = report.selection
    assert selection is not None
    assert selection["float_nodes"] == []
    assert selection["blockwise_int8_nodes"] == ["fc1"]  # the outlier's layer, and only it
    assert selection["outlier_channel_nodes"] == {}
    assert selection["sensitivity"]["fc1"] > 0
    # the search's tries: full int8, fc1's largest channels split (too many outliers: fails), every
    # MatMul block-wise (blocks of 128 break the budget here, 32 keep it), then fc2 moved to per-tensor
    # int8 (kept), fc1 too (breaks the budget): each measured
    tries = [(t["outlier_channel_nodes"], t["blockwise_nodes"], t["block"], t["passed"]) for t in selection["trials"]]
    assert tries[:2] == [(0, 0, None, False), (1, 0, None, False)]
    assert tries[2:] == [(0, 2, 128, False), (0, 2, 32, True), (0, 1, 32, True), (0, 0, None, False)]
    written = ops(dst)
    assert (written["MatMulNBits"], written["MatMulInteger"], written["MatMul"]) == (1, 1, 0)


def test_int8_schemes_narrow_the_search_to_the_schemes_named(tmp_path: Path) -> None:
    """``--int8-schemes``: without outlier-channels the split is never tried (nor the input channels
    measured); block-wise alone is the search's step 3 only, every MatMul block-wise and none per-tensor."""
    src = tmp_path / "mixed.onnx"
    onnx.save(outlier_model(first=0, channels=SPREAD), str(src))
    common = sets(tmp_path)

    schemes = parse_schemes("block-wise, per-tensor")  # --int8-schemes' form, in the search's order
    assert schemes == ("per-tensor", "block-wise")
    report = optimize(src, tmp_path / "no-split.onnx", OptimizeOptions(int8_schemes=schemes, **common))  # type: ignore[arg-type]
    selection = report.selection
    assert selection is not None
    assert selection["int8_schemes"] == ["per-tensor", "block-wise"]
    assert selection["blockwise_int8_nodes"] == ["fc1"]  # as the full search: the split fails here anyway
    tries = [(t["outlier_channel_nodes"], t["blockwise_nodes"], t["block"], t["passed"]) for t in selection["trials"]]
    assert tries == [(0, 0, None, False), (0, 2, 128, False), (0, 2, 32, True), (0, 1, 32, True), (0, 0, None, False)]

    dst = tmp_path / "blockwise.onnx"
    report = optimize(src, dst, OptimizeOptions(int8_schemes=("block-wise",), **common))  # type: ignore[arg-type]
    assert report.accuracy.cosine is not None
    assert report.accuracy.cosine >= BUDGET  # on the held-out rows
    selection = report.selection
    assert selection is not None
    assert selection["int8_schemes"] == ["block-wise"]
    assert (selection["float_nodes"], selection["blockwise_int8_nodes"]) == ([], ["fc1", "fc2"])
    tries = [(t["outlier_channel_nodes"], t["blockwise_nodes"], t["block"], t["passed"]) for t in selection["trials"]]
    assert tries == [(0, 2, 128, False), (0, 2, 32, True)]  # no per-tensor try, no move back to it
    written = ops(dst)
    assert (written["MatMulNBits"], written["MatMulInteger"], written["MatMul"]) == (2, 0, 0)


def test_block_wise_alone_that_breaks_the_budget_writes_nothing(tmp_path: Path) -> None:
    """Without per-tensor there is no float search to fall back on: the run fails, naming the schemes."""
    src = tmp_path / "mixed.onnx"
    onnx.save(outlier_model(first=0, channels=SPREAD), str(src))
    common = {**sets(tmp_path), "budget": AccuracyBudget(cosine=0.99999)}  # no int8 form keeps this
    dst = tmp_path / "blockwise.onnx"
    with pytest.raises(BudgetError, match="no int8 choice with --int8-schemes block-wise keeps the budget"):
        optimize(src, dst, OptimizeOptions(int8_schemes=("block-wise",), **common))  # type: ignore[arg-type]
    assert not dst.exists()


@pytest.mark.parametrize(
    ("schemes", "message"),
    [
        (("outlier-channels",), "outlier-channels needs per-tensor"),
        (("per-row",), "'per-row': choose from per-tensor, outlier-channels, block-wise"),
        ((), "name at least one of"),
    ],
)
def test_int8_schemes_that_cannot_be_searched_are_refused(
    tmp_path: Path, schemes: tuple[str, ...], message: str
) -> None:
    with pytest.raises(OptimizeError, match=message):
        OptimizeOptions(quantize="int8", int8_schemes=schemes).check()
    with pytest.raises(OptimizeError, match="applies to --quantize"):
        OptimizeOptions(int8_schemes=("per-tensor",)).check()
    with pytest.raises(OptimizeError, match="needs selective int8"):
        OptimizeOptions(quantize="int8", selective=False, int8_schemes=("block-wise",)).check()


def ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)
