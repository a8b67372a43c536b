"""Every toolkit command reads MODEL with the one loader (``toolkit/model_file.py``): a missing file, a
folder without ``model.onnx`` and a file that is not ONNX get the same message from each, exit 2."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from tests.models import add_model
from typer.testing import CliRunner

from onnxserve.cli.main import app
from onnxserve.errors import ModelLoadError
from onnxserve.toolkit.model_file import load_model

COMMANDS = {
    "inspect": lambda model, good, out: ["inspect", model],
    "inspect --run": lambda model, good, out: ["inspect", model, "--run", '{"a": [1], "b": [2]}'],
    "diff (A)": lambda model, good, out: ["diff", model, good],
    "diff (B)": lambda model, good, out: ["diff", good, model],
    "optimize": lambda model, good, out: ["optimize", model, "--output", out, "--level", "basic"],
    "tune": lambda model, good, out: ["tune", model, "--output", out],
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.onnx"
    onnx.save(add_model(), str(good))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\xff\x00 this is not a protobuf \x12\x99" * 10)
    empty_folder = tmp_path / "folder"
    empty_folder.mkdir()
    return {"good": good, "missing": tmp_path / "missing.onnx", "corrupt": corrupt, "folder": empty_folder}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing", "missing.onnx: no such file"),
        ("folder", "folder: no model.onnx in this folder"),
        ("corrupt", "corrupt.onnx: not an ONNX model"),
    ],
)
def test_every_command_refuses_a_bad_model_the_same_way(
    files: dict[str, Path], tmp_path: Path, command: str, which: str, message: str
) -> None:
    out = tmp_path / ("out" if which == "folder" else "out.onnx")
    args = COMMANDS[command](str(files[which]), str(files["good"]), str(out))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not out.exists()
    with pytest.raises(ModelLoadError) as caught:
        load_model(files[which])
    assert message in caught.value.message
