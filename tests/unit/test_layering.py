"""The layering rule of docs/architecture.md ("The layers"), enforced: core/ knows nothing of transports or
upper layers, and protocols never reach ONNX Runtime."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import onnxserve

SRC = Path(onnxserve.__file__).parent
FORBIDDEN_IN_CORE = (
    "onnxserve.protocols",
    "onnxserve.server",
    "onnxserve.cli",
    "onnxserve.toolkit",
    "starlette",
    "fastapi",
    "uvicorn",
    "httpx",
    "aiohttp",
    "grpc",
    "google.rpc",
    "typer",
)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_core_imports_no_transport_or_upper_layer() -> None:
    core_files = sorted((SRC / "core").rglob("*.py"))
    assert core_files, "core/ has no modules?"
    offenders = [
        f"{path.relative_to(SRC)} imports {module}"
        for path in core_files
        for module in imported_modules(path)
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_IN_CORE)
    ]
    assert offenders == []


def test_layering_check_would_catch_an_offender(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("from onnxserve.protocols.v2_rest import codec\nimport starlette.routing\n")
    assert {"onnxserve.protocols.v2_rest", "starlette.routing"} <= imported_modules(sample)


def test_protocols_do_not_reach_onnx_runtime() -> None:
    offenders = [
        f"{path.relative_to(SRC)} imports {module}"
        for path in sorted((SRC / "protocols").rglob("*.py"))
        for module in imported_modules(path)
        if module.startswith(("onnxruntime", "onnxserve.core.runtime"))
    ]
    assert offenders == []


def test_public_api_is_complete_and_importable() -> None:
    assert sorted(onnxserve.__all__) == sorted(set(onnxserve.__all__))
    for name in onnxserve.__all__:
        assert hasattr(onnxserve, name), name
    public = {n for n in vars(onnxserve) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(onnxserve.__all__), public - set(onnxserve.__all__)


def test_every_module_imports() -> None:
    for info in pkgutil.walk_packages([str(SRC)], prefix="onnxserve."):
        importlib.import_module(info.name)
