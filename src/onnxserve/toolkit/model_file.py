"""MODEL on the command line: the toolkit's one way to find and read an ONNX model.

``optimize``, ``tune``, ``inspect`` (and ``--run``), ``diff`` and the web page's documents all read
their models here, so a missing, misplaced or corrupt model is refused the same way by every command:
a :class:`~onnxserve.errors.ModelLoadError` whose message names the path and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxserve.core.pipeline import PIPELINE_FILENAME
from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import read_onnx
from onnxserve.errors import ModelLoadError


@dataclass(frozen=True)
class ModelLocation:
    """The ONNX file, and the version folder when MODEL named one (or a model.onnx inside one)."""

    file: Path
    folder: Path | None


def locate_model(path: Path) -> ModelLocation:
    """An ONNX file, or a folder holding ``model.onnx``; refused with a :class:`ModelLoadError` otherwise."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        file = path / MODEL_FILENAME
        if not file.is_file():
            raise ModelLoadError(f"{path}: no {MODEL_FILENAME} in this folder; give an ONNX file or a version folder")
        return ModelLocation(file, path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    in_version_folder = path.name == MODEL_FILENAME and (path.parent / PIPELINE_FILENAME).is_file()
    return ModelLocation(path, path.parent if in_version_folder else None)


def load_model(path: Path, *, load_external_data: bool = False) -> onnx.ModelProto:
    """The model at ``path`` (a file or a version folder), without its external data unless asked."""
    file = locate_model(path).file
    model = read_onnx(file, load_external_data=load_external_data)
    if not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise ModelLoadError(f"{file}: not an ONNX model (no graph in it)")
    return model
