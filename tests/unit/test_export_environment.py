"""The exporters' environment check: missing and too-old dependencies are one clear error."""

from __future__ import annotations

import pytest

from onnxserve.errors import ExportError
from onnxserve.toolkit.export.environment import require, too_old


@pytest.mark.parametrize(
    ("distribution", "installed", "old"),
    [
        ("torch", "2.1.2", True),
        ("torch", "2.13.0+cpu", False),
        ("torch", "2.4.0", False),
        ("transformers", "4.39.3", True),
        ("transformers", "5.24.0", False),
        ("onnxscript", "0.1.0", True),
        ("numpy", "0.1", False),  # no minimum declared
        ("torch", "not-a-version", False),
    ],
)
def test_too_old(distribution: str, installed: str, old: bool) -> None:
    assert too_old(distribution, installed) is old


def test_missing_modules_are_named_with_the_extra() -> None:
    with pytest.raises(ExportError, match=r"exporting needs no_such_module_x; install the export extra"):
        require("json", "no_such_module_x")


def test_installed_recent_dependencies_pass() -> None:
    require("torch", "transformers", "onnxscript")
