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


def test_a_warm_up_that_runs_too_long_is_stopped_and_the_session_still_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A warm-up Loop of 2^40 steps held its load, and so every later reload, for good (rt12 F4)."""
    path = tmp_path / "model.onnx"
    onnx.save(models.warm_up_loop_model(2**40, 4), path)  # a warm-up of no end
    monkeypatch.setattr(runtime, "WARMUP_SECONDS", 0.5)
    session = ModelSession(path, name="endless")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="onnxserve.core.runtime"):
        session.warmup()
    assert time.monotonic() - started < 30
    assert "endless: warm-up run stopped after" in caplog.text
    assert session.inputs[0].name == "x"  # loaded: requests are bounded by their own timeouts
