"""One clear error, before any work starts, when an exporter's dependencies are missing or too old."""

from __future__ import annotations

import importlib
from importlib import metadata

from packaging.version import InvalidVersion, Version

from onnxserve.errors import ExportError

EXTRA = "export"
"""The optional-dependency group that installs every exporter's dependencies."""

_DISTRIBUTIONS = {"sklearn": "scikit-learn"}  # import name -> the name pip knows it by

MINIMUM_VERSIONS = {
    "torch": "2.4",  # torch.onnx.export(dynamo=True) with dynamic_shapes
    "transformers": "4.40",
    "onnxscript": "0.2",
    "scikit-learn": "1.3",
    "skl2onnx": "1.17",
}
"""The oldest release of each dependency the exporters work with (as in pyproject.toml's extra)."""


def too_old(distribution: str, installed: str) -> bool:
    """Whether ``installed`` is older than the minimum onnxserve needs (unknown versions pass)."""
    minimum = MINIMUM_VERSIONS.get(distribution)
    if minimum is None:
        return False
    try:
        return Version(installed).release < Version(minimum).release
    except InvalidVersion:
        return False


def require(*modules: str) -> None:
    """Import each module, or raise one ExportError naming every missing or too old one and what to install."""
    problems: list[str] = []
    for module in modules:
        distribution = _DISTRIBUTIONS.get(module, module)
        try:
            importlib.import_module(module)
        except ImportError:
            problems.append(distribution)
            continue
        try:
            installed = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        if too_old(distribution, installed):
            problems.append(f"{distribution}>={MINIMUM_VERSIONS[distribution]} (found {installed})")
    if problems:
        raise ExportError(
            f"exporting needs {', '.join(problems)}; install the {EXTRA} extra: pip install 'onnxserve[{EXTRA}]'"
        )
