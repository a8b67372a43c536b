"""Imports point one way: no cycles in the package's import graph, and protocols never load ONNX Runtime.

``test_layering.py`` reads each file's own imports; these tests follow them: the graph of what every
module imports when it is loaded (module-level statements, ``TYPE_CHECKING`` blocks left out), and
what a fresh interpreter holds after importing each protocol module.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import onnxserve

SRC = Path(onnxserve.__file__).parent
PACKAGE = "onnxserve"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _load_time_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is loaded (not in functions, classes or TYPE_CHECKING)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _load_time_imports(node.body)
            found += _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _load_time_imports(block)
        elif isinstance(node, ast.With):
            found += _load_time_imports(node.body)
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` loads directly, with the packages above them that it is not inside."""
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = set()
    for node in _load_time_imports(tree.body):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        source = _resolve(module, path.name == "__init__.py", node)
        submodules = {f"{source}.{alias.name}" for alias in node.names} & known
        targets.update(submodules)
        if len(submodules) < len(node.names):
            targets.add(source)  # a name defined in ``source`` itself: its code runs first
        else:
            targets.add(f"{source}.")  # only submodules: ``source`` is loaded on the way
    edges: set[str] = set()
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    for target in targets:
        if not target.startswith(PACKAGE):
            continue
        if target in known and target != module:
            edges.add(target)  # what the statement names is loaded, even a package above this module
        parts = target.rstrip(".").split(".")
        for i in range(1, len(parts) + (1 if target.endswith(".") else 0)):
            name = ".".join(parts[:i])  # packages loaded on the way, except those this module is inside
            if name in known and name not in own_packages:
                edges.add(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50, "the graph should hold every module of the package"
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_catches_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_follows_relative_and_from_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import wire\n"
        "from ..errors import InvalidInputError\n"
        "if TYPE_CHECKING:\n"
        "    from onnxserve.core.service import InferenceService\n"
        "def later():\n"
        "    import onnxserve.core.runtime\n"
    )
    known = {"onnxserve", "onnxserve.core", "onnxserve.core.wire", "onnxserve.errors", "onnxserve.core.service"}
    assert imports_of("onnxserve.core.sample", sample, known) == {"onnxserve.core.wire", "onnxserve.errors"}


def test_the_graph_sees_an_import_from_a_package_above(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from onnxserve import __version__\nfrom onnxserve.core import wire\n")
    known = {"onnxserve", "onnxserve.core", "onnxserve.core.wire"}
    assert imports_of("onnxserve.core.sample", sample, known) == {"onnxserve", "onnxserve.core.wire"}


def test_version_is_a_leaf_and_core_does_not_import_the_package_root() -> None:
    graph = import_graph()
    assert graph["onnxserve.version"] == set()
    offenders = sorted(m for m, targets in graph.items() if m.startswith("onnxserve.core") and PACKAGE in targets)
    assert offenders == []


def _loaded_after_each_import(modules: list[str], watched: list[str]) -> dict[str, list[str]]:
    """In a fresh interpreter: import each module in turn; which of ``watched`` are loaded after each."""
    script = (
        "import importlib, json, sys\n"
        f"modules, watched = {modules!r}, {watched!r}\n"
        "seen = {}\n"
        "for m in modules:\n"
        "    importlib.import_module(m)\n"
        "    seen[m] = [w for w in watched if w in sys.modules]\n"
        "print(json.dumps(seen))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    loaded: dict[str, list[str]] = json.loads(done.stdout)
    return loaded


def test_no_protocol_module_loads_onnx_runtime_even_indirectly() -> None:
    protocols = sorted(
        info.name for info in pkgutil.walk_packages([str(SRC / "protocols")], prefix="onnxserve.protocols.")
    )
    assert "onnxserve.protocols.v2_grpc.servicer" in protocols
    loaded = _loaded_after_each_import(["onnxserve.protocols", *protocols], ["onnxruntime", "onnxserve.core.runtime"])
    offenders = {m: w for m, w in loaded.items() if w}
    assert offenders == {}  # the first offender is the module that loaded it


def test_the_wire_codec_does_not_climb_into_the_registry() -> None:
    loaded = _loaded_after_each_import(
        ["onnxserve.core.wire"], ["onnxserve.core.validation", "onnxserve.core.registry", "onnxserve.config"]
    )
    assert loaded == {"onnxserve.core.wire": []}


def test_the_transitive_check_sees_onnx_runtime_when_it_is_loaded() -> None:
    loaded = _loaded_after_each_import(["onnxserve.core.registry"], ["onnxruntime"])
    assert loaded == {"onnxserve.core.registry": ["onnxruntime"]}
