"""``onnxserve diff`` as a user runs it, on the session's tiny BERT (``tiny_text_version``), its fused form
and its int8 form."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from typer.testing import CliRunner

import tiny_text_models
from onnxserve.cli.main import app

ONNXSERVE = [sys.executable, "-m", "onnxserve.cli"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ONNXSERVE, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory, tiny_text_version: Path) -> dict[str, Path]:
    """A 2-layer BERT (hidden 32) exported by onnxserve (the session's ``tiny_text_version``, only read
    here), optimized by ORT's transformer optimizer, and dynamically quantized to int8."""
    root = tmp_path_factory.mktemp("diff-bert")
    vocab = tiny_text_models.vocabulary()
    plain = tiny_text_version
    fused = root / "fused.onnx"
    optimize_model(str(plain / "model.onnx"), model_type="bert", num_heads=2, hidden_size=32).save_model_to_file(
        str(fused)
    )
    int8 = root / "int8.onnx"
    quantize_dynamic(plain / "model.onnx", int8, weight_type=QuantType.QInt8)
    samples = root / "samples.npz"
    rng = np.random.default_rng(3)
    np.savez(
        samples,
        input_ids=rng.integers(0, len(vocab), size=(3, 7)).astype(np.int64),
        attention_mask=np.array([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], dtype=np.int64),
        token_type_ids=np.zeros((3, 7), dtype=np.int64),
    )
    return {"plain": plain, "fused": fused, "int8": int8, "samples": samples, "root": root}


def diff_json(a: Path, b: Path, *extra: str | Path) -> dict[str, Any]:
    result = run_cli("diff", a, b, "--format", "json", *extra)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def ort_outputs(path: Path, feeds: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_fused_nodes_map_back_to_the_nodes_they_replaced(bert: dict[str, Path]) -> None:
    report = diff_json(bert["plain"], bert["fused"], "--samples", bert["samples"])
    a = onnx.load(str(bert["plain"] / "model.onnx"))
    b = onnx.load(str(bert["fused"]))
    a_nodes = {n.name: n for n in a.graph.node}
    b_nodes = {n.name: n for n in b.graph.node}
    fused_ops = Counter(n.op_type for n in b.graph.node if n.domain == "com.microsoft")
    assert fused_ops["SkipLayerNormalization"] == 4, fused_ops
    assert fused_ops["BiasGelu"] == 2, fused_ops

    replacements = {r["b"]["id"]: [x["id"] for x in r["replaces"]] for r in report["replacements"]}
    assert set(replacements) == {n.name for n in b.graph.node if n.name not in a_nodes}
    a_initializers = {t.name for t in a.graph.initializer}
    for name in replacements.keys() & {n.name for n in b.graph.node if n.domain == "com.microsoft"}:
        fused, replaced = b_nodes[name], replacements[name]
        ops = sorted(a_nodes[x].op_type for x in replaced)
        if fused.op_type == "SkipLayerNormalization":
            assert ops == ["Add", "Add", "LayerNormalization"], (name, replaced)
        else:
            assert fused.op_type == "BiasGelu"
            assert ops == ["Add", "Add", "Div", "Erf", "Mul", "Mul"], (name, replaced)
        # The region is closed: it produces the fused node's output and reads only the fused node's
        # inputs (or constants the fusion folded away).
        produced = {t for x in replaced for t in a_nodes[x].output}
        assert fused.output[0] in produced
        read = {t for x in replaced for t in a_nodes[x].input} - produced
        assert read <= set(fused.input) | a_initializers, (name, read - set(fused.input))
        assert read & set(fused.input) - a_initializers, "it reads the fused node's activations"
    assert report["summary"]["nodes_replaced"] == report["summary"]["nodes_removed"] == 24
    assert report["summary"]["nodes_unmapped"] == 0
    assert {"what": "opset:com.microsoft", "a": None, "b": "1"} in report["versions"]

    with np.load(bert["samples"]) as data:
        feeds = {k: data[k] for k in data.files}
    want, have = ort_outputs(bert["plain"] / "model.onnx", feeds), ort_outputs(bert["fused"], feeds)
    assert report["numeric"]["ran"]
    assert report["numeric"]["generated"] is False
    assert report["numeric"]["inputs"]["input_ids"] == [3, 7]
    for out in report["numeric"]["outputs"]:
        x, y = want[out["name"]].astype(np.float64).ravel(), have[out["name"]].astype(np.float64).ravel()
        assert out["max_abs_diff"] == pytest.approx(np.abs(x - y).max(), abs=1e-12)
        assert out["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-12)
    assert {o["name"] for o in report["numeric"]["outputs"]} == {"last_hidden_state", "sentence_embedding"}


def test_quantized_nodes_map_back_to_the_float_matmuls(bert: dict[str, Path]) -> None:
    report = diff_json(bert["plain"], bert["int8"])
    a = onnx.load(str(bert["plain"] / "model.onnx"))
    b = onnx.load(str(bert["int8"]))
    a_nodes = {n.name: n for n in a.graph.node}
    b_nodes = {n.name: n for n in b.graph.node}
    replacements = {r["b"]["id"]: r for r in report["replacements"]}
    integer_matmuls = [n for n in b.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer_matmuls) == 12
    for node in integer_matmuls:
        [original] = [a_nodes[x["id"]] for x in replacements[node.name]["replaces"]]
        assert original.op_type == "MatMul"
        assert node.input[1] == original.input[1] + "_quantized"  # its weight is the MatMul's, quantized
    quantized = {i["name"]: i for i in report["initializers"] if i["change"] == "quantized"}
    for node in integer_matmuls:
        weight = node.input[1].removesuffix("_quantized")
        stats = quantized[weight]["stats"]
        assert 0 < stats["max_abs_diff"] < 0.01
        assert stats["relative_l2"] < 0.05
    # The int8 Gathers of the embeddings are followed by DequantizeLinear nodes: part of the Gathers'
    # rewritten form, not unexplained additions.
    for name, replacement in replacements.items():
        if b_nodes[name].op_type == "DequantizeLinear":
            [gather] = replacement["rewrites"]
            assert a_nodes[gather["id"]].op_type == "Gather"
    assert report["summary"]["nodes_unmapped"] == 0
    outputs = {o["name"]: o for o in report["numeric"]["outputs"]}
    assert outputs["sentence_embedding"]["cosine"] > 0.999


def test_text_report_and_identical_models(bert: dict[str, Path]) -> None:
    result = run_cli("diff", bert["plain"], bert["fused"], "--no-numeric")
    assert result.returncode == 0, result.stderr
    assert "SkipLayerNormalization" in result.stdout
    assert "replaces" in result.stdout
    assert "Outputs" not in result.stdout
    same = run_cli("diff", bert["plain"], bert["plain"] / "model.onnx")
    assert same.returncode == 0, same.stderr
    assert "identical" in same.stdout


def test_html_report_is_one_self_contained_file(bert: dict[str, Path], tmp_path: Path) -> None:
    page = tmp_path / "diff.html"
    result = run_cli("diff", bert["plain"], bert["fused"], "--format", "html", "--output", page)
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    assert html.count("<svg") == 2
    assert html.count('class="node node added') >= 6  # the 6 fused nodes (and ORT's own rewrites), in B's graph
    assert html.count('class="node node removed') == 24
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    assert [p.name for p in tmp_path.iterdir()] == ["diff.html"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{root}/missing.onnx", "{plain}"], "missing.onnx: no such file"),
        (["{root}", "{plain}"], "no model.onnx in this folder"),
        (["{root}/samples.npz", "{plain}"], "not an ONNX model"),
        (["{plain}", "{fused}", "--format", "html"], "--format html needs --output FILE"),
        (["{plain}", "{fused}", "--samples", "{root}/fused.onnx"], "samples must be a .npz or .json file"),
        (["{plain}", "{fused}", "--output", "{root}/no/such/dir/out.txt"], "does not exist"),
        (["{plain}", "{fused}", "--format", "yaml"], "Invalid value for '--format'"),
    ],
)
def test_bad_inputs_are_refused(bert: dict[str, Path], args: list[str], message: str) -> None:
    paths = {"root": bert["root"], "plain": bert["plain"], "fused": bert["fused"]}
    # In process (the same typer app the command runs), to keep the many refusals quick.
    result = CliRunner().invoke(app, ["diff", *(a.format(**paths) for a in args)])
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())  # rich may wrap a long message
    assert not (bert["root"] / "no").exists()


def test_samples_in_json_are_cast_to_the_model_types(bert: dict[str, Path], tmp_path: Path) -> None:
    def invoke(*args: str | Path) -> Any:
        return CliRunner().invoke(app, ["diff", *map(str, args)])

    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps({"input_ids": [[2, 7, 8, 3]], "attention_mask": [[1, 1, 1, 1]]}))
    result = invoke(bert["plain"], bert["int8"], "--samples", samples)
    assert result.exit_code == 2
    assert "samples lack input(s) token_type_ids" in result.stderr
    samples.write_text(
        json.dumps({"input_ids": [[2, 7, 8, 3]], "attention_mask": [[1, 1, 1, 1]], "token_type_ids": [[0, 0, 0, 0]]})
    )
    result = invoke(bert["plain"], bert["int8"], "--samples", samples, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["numeric"]["inputs"]["input_ids"] == [1, 4]
    samples.write_text(json.dumps({"nope": [1]}))
    result = invoke(bert["plain"], bert["int8"], "--samples", samples)
    assert result.exit_code == 2
    assert "'nope' is not an input of the model" in result.stderr


@pytest.mark.browser
def test_diff_page_in_a_browser_shows_the_mapping(
    bert: dict[str, Path], tmp_path: Path, chromium_executable: str
) -> None:
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "diff.html"
    result = run_cli("diff", bert["plain"], bert["fused"], "--format", "html", "--output", page_file)
    assert result.returncode == 0, result.stderr
    fused = onnx.load(str(bert["fused"]))
    first_fused = next(n.name for n in fused.graph.node if n.op_type == "SkipLayerNormalization")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_file.as_uri())
            assert page.locator("#pane-b .node.added").count() >= 6
            assert page.locator("#pane-a .node.removed").count() == 24
            page.locator(f'#pane-b .node[data-name="{first_fused}"]').click()
            labels = page.locator("#pane-a .node.focus text").all_text_contents()
            assert sorted(labels) == ["Add", "Add", "LayerNormalization"]
            assert first_fused in page.locator("#selection").inner_text()
            page.screenshot(path=str(ARTIFACTS / "diff-view.png"))
            # The tables link to the graphs too: an A node replaced by the last fused node, and back.
            page.locator("#pane-a .view").evaluate("e => e.scrollTo(0, 0)")
            last = page.locator('a.node-link[data-side="b"]').last
            last_name = last.get_attribute("data-name")
            last.click()
            assert page.locator("#pane-b .node.focus").count() == 1
            assert page.locator("#pane-b .node.focus").get_attribute("data-name") == last_name
            assert page.locator("#pane-a .node.focus").count() >= 1
            assert page.locator("#pane-a .view").evaluate("e => e.scrollTop") > 0  # scrolled to it
        finally:
            browser.close()
