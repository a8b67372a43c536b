"""``onnxserve tune`` keeps only variants within the accuracy budget and writes nothing when none is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxserve.errors import OptimizeError
from onnxserve.toolkit.optimize_report import AccuracyBudget
from onnxserve.toolkit.tune import TuneOptions, parse_bools, parse_ints, tune

QUICK = {"levels": ("all",), "threads": (1,), "repeats": 1}


def test_only_variants_within_the_budget_can_win(tiny_text_version: Path, tmp_path: Path) -> None:
    dst = tmp_path / "t" / "1"
    exact = AccuracyBudget(max_abs=0.0)  # only the untouched model computes exactly the same
    report = tune(tiny_text_version, dst, TuneOptions(budget=exact, fuse=(False,), int8=(False, True), **QUICK))  # type: ignore[arg-type]
    assert report.best.variant == "plain"
    assert {c.variant: c.within_budget for c in report.cells} == {"plain": True, "int8": False}
    assert report.variants["int8"]["violations"][0].startswith("max abs diff")
    saved = json.loads((dst / "optimize_report.json").read_text())
    assert saved["best"]["variant"] == "plain"
    assert saved["config"] == {
        "execution_providers": ["CPUExecutionProvider"],
        "session_options": {"intra_op_num_threads": 1, "graph_optimization_level": "all"},
    }


def test_no_variant_within_the_budget_writes_nothing(tiny_text_version: Path, tmp_path: Path) -> None:
    dst = tmp_path / "none" / "1"
    options = TuneOptions(budget=AccuracyBudget(max_abs=0.0), fuse=(False,), int8=(True,), **QUICK)  # type: ignore[arg-type]
    with pytest.raises(OptimizeError, match="no variant keeps the accuracy budget"):
        tune(tiny_text_version, dst, options)
    assert not dst.exists()
    assert list(dst.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TuneOptions(target="speed"), "latency or throughput"),
        (TuneOptions(levels=("max",)), "--levels"),
        (TuneOptions(threads=(0,)), "at least 1"),
        (TuneOptions(batch_size=0), "at least 1"),
    ],
)
def test_bad_tune_options_are_refused(options: TuneOptions, message: str, tmp_path: Path) -> None:
    with pytest.raises(OptimizeError, match=message):
        tune(tmp_path / "missing", tmp_path / "out", options)


def test_list_options() -> None:
    assert parse_ints("1, 2", "--threads") == (1, 2)
    assert parse_bools("yes,no", "--fuse") == (True, False)
    with pytest.raises(OptimizeError, match="whole numbers"):
        parse_ints("one", "--threads")
