"""Merged requests get their own rows back, even from a graph whose outputs break its batch dimension's
promise (the default layout merges requests of any graph whose inputs and outputs share a named dynamic
first dimension): a merged answer that cannot be split runs each request alone instead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from onnxserve.core.execution import Work, run_batch
from onnxserve.core.runtime import ModelSession, RunControl


def _session(tmp_path: Path, model: onnx.ModelProto) -> ModelSession:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return ModelSession(path)


def _works(*rows: list[float]) -> list[Work]:
    return [Work(["y"], len(r), feeds={"x": np.array(r, dtype=np.float32).reshape(-1, 1)}) for r in rows]


def test_a_graph_whose_output_does_not_keep_the_rows_runs_merged_requests_one_by_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # y's first dimension is named like x's, but the graph sums over it: one row whatever the batch.
    session = _session(
        tmp_path,
        models.parse(
            """
            summed (float[batch, 1] x) => (float[batch, 1] y) {
                y = ReduceSum <keepdims = 1> (x)
            }
            """
        ),
    )
    works = _works([1.0, 2.0], [10.0], [100.0, 200.0, 300.0])
    outcomes = run_batch(session, works, RunControl(), None, session.outputs)
    assert [o.outputs["y"].ravel().tolist() for o in outcomes] == [[3.0], [10.0], [600.0]]
    assert "do not have their 6 rows" in caplog.text


def test_a_graph_that_keeps_the_rows_splits_one_merged_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    session = _session(
        tmp_path,
        models.parse(
            """
            doubled (float[batch, 1] x) => (float[batch, 1] y) {
                y = Add(x, x)
            }
            """
        ),
    )
    works = _works([1.0, 2.0], [10.0])
    outcomes = run_batch(session, works, RunControl(), None, session.outputs)
    assert [o.outputs["y"].ravel().tolist() for o in outcomes] == [[2.0, 4.0], [20.0]]
    assert "merged requests" not in caplog.text
