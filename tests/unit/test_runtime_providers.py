"""The log says which execution provider each model actually got, and falls back to the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest

import models
from onnxserve.config import ExecutionProvider
from onnxserve.core.runtime import ModelSession


def test_log_names_the_provider_a_model_got_after_falling_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "add.onnx"
    onnx.save(models.add_model(), str(path))
    with caplog.at_level(logging.INFO, logger="onnxserve.core.runtime"):
        session = ModelSession(path, [ExecutionProvider(name="NoSuchGPUExecutionProvider")], name="add")
    messages = [r.getMessage() for r in caplog.records]
    assert "add: execution provider NoSuchGPUExecutionProvider is not available here; falling back" in messages
    assert "add: loaded on CPUExecutionProvider" in messages
    assert session.providers == ["CPUExecutionProvider"]
