"""One clear error, before any work starts, when an exporter's dependencies are missing."""

from __future__ import annotations

import importlib

from onnxserve.errors import ExportError

EXTRA = "export"
"""The optional-dependency group that installs every exporter's dependencies."""

_DISTRIBUTIONS = {"sklearn": "scikit-learn"}  # import name -> the name pip knows it by


def require(*modules: str) -> None:
    """Import each module, or raise one ExportError naming every missing one and the extra to install."""
    missing: list[str] = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(_DISTRIBUTIONS.get(module, module))
    if missing:
        raise ExportError(
            f"exporting needs {', '.join(missing)}; install the {EXTRA} extra: pip install 'onnxserve[{EXTRA}]'"
        )
