"""ONNX Runtime sessions are made in one place, ``core/runtime.py:create_session`` (docs/architecture.md,
"Where each concern lives"): the server's ModelSession and every toolkit command (optimize, tune, diff,
inspect --run) get their sessions there, so providers, options and errors are handled once."""

from __future__ import annotations

import ast
from pathlib import Path

import onnx
import pytest
from tests.models import add_model

import onnxserve
from onnxserve.config import ExecutionProvider, SessionOptions
from onnxserve.core.runtime import create_session
from onnxserve.errors import ModelLoadError

SRC = Path(onnxserve.__file__).parent
THE_PLACE = SRC / "core" / "runtime.py"


def session_constructions(path: Path) -> list[int]:
    """Lines of ``path`` that construct ``InferenceSession`` (or import the name to do so)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name == "InferenceSession":
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and any(a.name == "InferenceSession" for a in node.names):
            lines.append(node.lineno)
    return lines


def test_inference_sessions_are_made_only_in_core_runtime() -> None:
    offenders = [
        f"{path.relative_to(SRC)}:{line}"
        for path in sorted(SRC.rglob("*.py"))
        if path != THE_PLACE
        for line in session_constructions(path)
    ]
    offenders += [
        f"{path.relative_to(SRC)}: InferenceSession("
        for path in sorted(SRC.rglob("*.py"))
        if path != THE_PLACE and "InferenceSession(" in path.read_text()
    ]
    assert offenders == [], "use onnxserve.core.runtime.create_session"
    assert len(session_constructions(THE_PLACE)) == 1


def test_the_check_would_catch_an_offender(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text(
        "import onnxruntime as ort\nfrom onnxruntime import InferenceSession\ns = ort.InferenceSession('m.onnx')\n"
    )
    assert session_constructions(sample) == [2, 3]


def test_create_session_from_a_file_bytes_or_a_model(tmp_path: Path) -> None:
    model = add_model()
    path = tmp_path / "add.onnx"
    onnx.save(model, str(path))
    for source in (path, model.SerializeToString(), model):
        session = create_session(source, options=SessionOptions(intra_op_num_threads=1))
        assert [i.name for i in session.get_inputs()] == [i.name for i in model.graph.input]


def test_create_session_saves_the_optimized_graph(tmp_path: Path) -> None:
    saved = tmp_path / "optimized.onnx"
    create_session(add_model(), options=SessionOptions(graph_optimization_level="basic"), save_optimized=saved)
    assert onnx.load(str(saved)).graph.node


def test_create_session_refuses_with_the_domain_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match=r"broken\.onnx: ONNX Runtime cannot load the model"):
        create_session(broken, providers=[ExecutionProvider(name="CPUExecutionProvider")])
