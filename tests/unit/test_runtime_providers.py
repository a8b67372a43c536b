"""The log says which execution provider each model actually got, and falls back to the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from onnxserve.config import ExecutionProvider, SessionOptions
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import TooLargeError


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


@pytest.mark.parametrize("arena", [False, True])
def test_the_cpu_arena_is_off_unless_asked_for_and_runs_either_way(tmp_path: Path, arena: bool) -> None:
    path = models.write_version(tmp_path, "fill", 1, models.value_sized_models()["fill"]) / "model.onnx"
    options = SessionOptions(enable_cpu_mem_arena=True) if arena else SessionOptions()
    session = ModelSession(path, options=options)
    assert session.ort_options.enable_cpu_mem_arena is arena
    assert session.run({"n": np.array([3], dtype=np.int64)})["y"].tolist() == [1.0, 1.0, 1.0]  # shrunk if on


def test_an_allocation_the_input_values_ask_for_is_refused_as_too_large(tmp_path: Path) -> None:
    path = models.write_version(tmp_path, "range", 1, models.value_sized_models()["range"]) / "model.onnx"
    with pytest.raises(TooLargeError, match="could not allocate the memory these input values ask for"):
        ModelSession(path).run({"n": np.array([2**62], dtype=np.int64)})
