"""The warm-up run at load: stopped when it runs too long, so a load always ends."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx
import pytest

import models
from onnxserve.core import runtime
from onnxserve.core.runtime import ModelSession


def endless_model() -> onnx.ModelProto:
    """A Loop of 2^40 steps whatever its input: its warm-up on zeros never ends by itself."""
    return models.parse(
        """
        endless (float[4, 4] x) => (float[4, 4] y) {
            count = Constant <value = int64 {1099511627776}> ()
            cond = Constant <value = bool {1}> ()
            y = Loop(count, cond, x) <body = step (int64 i, bool c_in, float[4, 4] acc)
                => (bool c_out, float[4, 4] next) {
                    c_out = Identity(c_in)
                    next = MatMul(acc, acc)
                }>
        }
        """
    )


def test_a_warm_up_that_runs_too_long_is_stopped_and_the_session_still_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A warm-up Loop of 2^40 steps held its load, and so every later reload, for good (rt12 F4)."""
    path = tmp_path / "model.onnx"
    onnx.save(endless_model(), path)
    monkeypatch.setattr(runtime, "WARMUP_SECONDS", 0.5)
    session = ModelSession(path, name="endless")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="onnxserve.core.runtime"):
        session.warmup()
    assert time.monotonic() - started < 30
    assert "endless: warm-up run stopped after" in caplog.text
    assert session.inputs[0].name == "x"  # loaded: requests are bounded by their own timeouts
