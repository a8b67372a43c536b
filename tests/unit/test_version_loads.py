"""A version is loaded from one folder as it was: a folder replaced, or files changed, while its sessions and
pipeline are read is a load error, not a version whose sessions answer differently (outside attack rt36)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models
from onnxserve.config import ModelConfig
from onnxserve.core import registry
from onnxserve.core.registry import load_version
from onnxserve.core.repository import VersionFolder
from onnxserve.errors import FilesChangedError, ModelLoadError


def _offset(repository: Path, offset: float) -> Path:
    models.write_version(repository, "m", 1, models.offset_model(offset))
    return repository / "m" / "1"


def _between_sessions(monkeypatch: pytest.MonkeyPatch, change: Any) -> list[bool]:
    """Make ``change`` happen after the version's first session is made, before the next."""
    made = registry.ModelSession
    changed: list[bool] = []

    def session(*args: Any, **kwargs: Any) -> Any:
        real = made(*args, **kwargs)
        if not changed:
            change()
            changed.append(True)
        return real

    monkeypatch.setattr(registry, "ModelSession", session)
    return changed


def test_a_folder_replaced_between_a_versions_sessions_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The documented deploy (a staged folder moved over the served one) between two of three sessions made a
    version whose requests were answered with the old weights by one session and the new by the others."""
    folder = _offset(tmp_path / "repo", 1.0)
    staged = _offset(tmp_path / "staged", 2.0)
    config = ModelConfig.model_validate({"name": "m", "base_path": tmp_path / "repo" / "m", "instance_count": 3})

    def swap() -> None:
        folder.rename(tmp_path / "old")
        staged.rename(folder)

    changed = _between_sessions(monkeypatch, swap)
    with pytest.raises(ModelLoadError, match=r"m/1: the version folder was replaced while it loaded"):
        load_version(config, VersionFolder(1, folder))
    assert changed
    monkeypatch.undo()
    version = load_version(config, VersionFolder(1, folder))  # loaded again: the new folder, whole
    sessions = version.scheduler.pool.sessions
    assert len(sessions) == 3
    for session in sessions:
        (y,) = session.run({"x": np.zeros((1, 1), np.float32)}).values()
        assert y.tolist() == [[2.0]]


def test_files_written_between_a_versions_sessions_are_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _offset(tmp_path / "repo", 1.0)
    config = ModelConfig.model_validate({"name": "m", "base_path": tmp_path / "repo" / "m", "instance_count": 2})
    _between_sessions(monkeypatch, lambda: (folder / "notes.txt").write_text("written meanwhile"))
    with pytest.raises(ModelLoadError, match=r"m/1: the version's files changed while it loaded"):
        load_version(config, VersionFolder(1, folder))


def test_a_model_file_renamed_over_with_its_size_and_time_kept_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cp -p`` or ``rsync -a`` of a model of the same architecture keeps the file's size and modification
    time: only its inode (and status change time) tells the new file from the old (outside attack rt37)."""
    folder = _offset(tmp_path / "repo", 1.0)
    newer = _offset(tmp_path / "staged", 2.0) / "model.onnx"
    model = folder / "model.onnx"
    assert newer.stat().st_size == model.stat().st_size
    config = ModelConfig.model_validate({"name": "m", "base_path": tmp_path / "repo" / "m", "instance_count": 2})

    def rename_over() -> None:
        info = model.stat()
        os.utime(newer, ns=(info.st_atime_ns, info.st_mtime_ns))
        os.replace(newer, model)

    _between_sessions(monkeypatch, rename_over)
    with pytest.raises(FilesChangedError, match=r"m/1: the version's files changed while it loaded"):
        load_version(config, VersionFolder(1, folder))
