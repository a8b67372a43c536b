"""The self-contained HTML graph view in headless Chromium (Debian's ``chromium``, driven by Playwright).

Opens the file from a ``file://`` URL, with every network request recorded: the view must make none.
Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest
from typer.testing import CliRunner

from onnxserve.cli.main import app

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
FLOAT = onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def browser(chromium_executable: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser: Any, path: Path) -> tuple[Any, list[str], float]:
    """The page, the non-file requests it made, and the seconds until the graph was drawn."""
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.set_default_timeout(10_000)
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "about:")) else requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    started = time.perf_counter()
    page.goto(path.as_uri())
    page.wait_for_selector(".osv-node", timeout=30_000)
    elapsed = time.perf_counter() - started
    assert errors == []
    return page, requests, elapsed


def write_html(model: Path, output: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["inspect", str(model), "--format", "html", "--output", str(output), *extra])
    assert result.exit_code == 0, result.stderr


@pytest.mark.slow
def test_demo_model_graph_view(browser: Any, demo_repository: Path, tmp_path: Path) -> None:
    html = tmp_path / "minilm.html"
    write_html(demo_repository / "minilm" / "1", html, "--run", "The graph view works offline.", "--intermediates",
               "*Softmax*")  # fmt: skip
    page, requests, elapsed = open_page(browser, html)
    print(f"demo model graph view drawn in {elapsed:.2f} s")
    demo = onnx.load(str(demo_repository / "minilm" / "1" / "model.onnx"), load_external_data=False)
    shown = page.locator(".osv-node:not(.input):not(.output)").count()
    assert shown == len(demo.graph.node)  # 321 nodes: small enough to open fully expanded

    page.fill(".osv-search", "MatMul")
    results = page.locator(".osv-results div")
    matmuls = sum(1 for n in demo.graph.node if "matmul" in (n.name + n.op_type).lower())
    assert results.count() >= matmuls
    assert page.locator(".osv-node.match").count() >= matmuls
    weighted = next(n for n in demo.graph.node if n.op_type == "MatMul" and any(
        i in {t.name for t in demo.graph.initializer} for i in n.input))  # fmt: skip
    page.locator(f".osv-results div[data-name='{weighted.name}']").click()

    details = page.locator(".osv-side")
    assert weighted.name in details.locator("h2").inner_text()
    assert page.locator(f".osv-node.selected[data-name='{weighted.name}']").count() == 1
    weight = details.locator(".osv-weight").first
    stats = weight.locator(".osv-stats").inner_text()
    for label in ("min", "max", "mean", "std", "sparsity"):
        assert label in stats
    assert weight.locator(".osv-hist rect").count() == 20
    assert "[0] " in weight.locator(".osv-values").inner_text()
    weight.locator("button", has_text="next").click()
    assert "[100] " in weight.locator(".osv-values").inner_text()
    assert "values 100\u2013199" in weight.locator(".osv-muted").first.inner_text()

    # intermediates from --run are on the graph: probed boxes, and their statistics in the summary
    assert page.locator(".osv-node.probed").count() >= 6
    page.fill(".osv-search", "")
    assert "Intermediate tensors" in details.inner_text()
    softmax = next(n.name for n in demo.graph.node if n.op_type == "Softmax")
    page.locator(f".osv-node.probed[data-name='{softmax}']").dispatch_event("click")
    probed = details.locator(".osv-weight").first
    assert "Softmax" in details.locator("h2").inner_text()
    assert "sparsity" in probed.locator(".osv-stats").inner_text()
    assert probed.locator(".osv-hist rect").count() == 20

    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(f".osv-node[data-name='{weighted.name}']").click()
    page.screenshot(path=str(ARTIFACTS / "graph-view-demo.png"))
    assert requests == []
    page.close()


def layered_model(layers: int) -> onnx.ModelProto:
    """A transformer-shaped stack of ``layers`` blocks of 25 nodes, named like a TorchScript export."""
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    for i in range(layers):
        p = f"/encoder/layer.{i}"
        for name in ("q", "k", "v", "o"):
            inits.append(onh.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"l{i}.{name}.weight"))
            inits.append(onh.from_array(rng.standard_normal(8).astype(np.float32), f"l{i}.{name}.bias"))

        def add(op: str, inputs: list[str], module: str, prefix: str = p, **attrs: Any) -> str:
            out = f"t{len(nodes)}"
            nodes.append(oh.make_node(op, inputs, [out], name=f"{prefix}/{module}/{op}_{len(nodes)}", **attrs))
            return out

        heads = []
        for name in ("q", "k", "v"):
            m = add("MatMul", [x, f"l{i}.{name}.weight"], f"attention/{name}")
            heads.append(add("Add", [m, f"l{i}.{name}.bias"], f"attention/{name}"))
        kt = add("Transpose", [heads[1]], "attention/scores", perm=[1, 0])
        scores = add("MatMul", [heads[0], kt], "attention/scores")
        scaled = add("Mul", [scores, scores], "attention/scores")
        probs = add("Softmax", [scaled], "attention/scores", axis=-1)
        ctx = add("MatMul", [probs, heads[2]], "attention/context")
        o = add("MatMul", [ctx, f"l{i}.o.weight"], "attention/output")
        o = add("Add", [o, f"l{i}.o.bias"], "attention/output")
        res = add("Add", [o, x], "attention/output")
        mean = add("ReduceMean", [res], "norm", axes=[-1])
        centered = add("Sub", [res, mean], "norm")
        sq = add("Mul", [centered, centered], "norm")
        var = add("ReduceMean", [sq], "norm", axes=[-1])
        std = add("Sqrt", [var], "norm")
        normed = add("Div", [centered, std], "norm")
        act = add("Relu", [normed], "ffn")
        gate = add("Sigmoid", [normed], "ffn")
        mixed = add("Mul", [act, gate], "ffn")
        absval = add("Abs", [mixed], "ffn")
        x = add("Add", [absval, normed], "ffn")
    graph = oh.make_graph(
        nodes, "stack", [oh.make_tensor_value_info("x", FLOAT, ["tokens", 8])],
        [oh.make_tensor_value_info(x, FLOAT, ["tokens", 8])], inits,
    )  # fmt: skip
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_a_thousand_node_model_opens_collapsed_and_expands(browser: Any, tmp_path: Path) -> None:
    model = layered_model(40)
    assert len(model.graph.node) == 1000
    path = tmp_path / "stack.onnx"
    onnx.save(model, str(path))
    html = tmp_path / "stack.html"
    started = time.perf_counter()
    write_html(path, html)
    written = time.perf_counter() - started
    page, requests, elapsed = open_page(browser, html)
    print(f"1,000-node model: HTML written in {written:.2f} s, drawn in the browser in {elapsed:.2f} s")
    assert elapsed < 15  # generous: the point is that it opens, not a benchmark (bench/ measures)

    groups = page.locator(".osv-node.group")
    boxes_before = page.locator(".osv-node").count()
    # collapsed at the deepest module level that keeps it to ~300 boxes: layer.N/attention, /norm, /ffn
    assert groups.count() == 120
    assert boxes_before == 122
    page.locator(".osv-node.group[data-name='group:encoder/layer.7/attention']").dispatch_event("click")  # off screen
    assert page.locator(".osv-node").count() > boxes_before
    assert page.locator(".osv-node.group[data-name='group:encoder/layer.7/attention']").count() == 0

    # a search hit inside a collapsed module opens its groups and selects the node
    target = next(n.name for n in model.graph.node if n.name.startswith("/encoder/layer.31/norm/Sqrt"))
    page.fill(".osv-search", "layer.31/norm/Sqrt")
    page.locator(f".osv-results div[data-name='{target}']").click()
    assert page.locator(f".osv-node.selected[data-name='{target}']").count() == 1
    assert "Sqrt" in page.locator(".osv-side h2").inner_text()

    started = time.perf_counter()
    page.get_by_role("button", name="Expand all").click()
    page.wait_for_function("document.querySelectorAll('.osv-node').length >= 1002")
    print(f"1,000-node model: fully expanded in {time.perf_counter() - started:.2f} s")
    page.get_by_role("button", name="Collapse modules").click()
    assert page.locator(".osv-node").count() == boxes_before

    # pan and zoom: the wheel scales the scene around the pointer, a drag moves it and selects nothing
    scene = page.locator(".osv-scene")
    before = scene.get_attribute("transform")
    page.mouse.move(500, 400)
    page.mouse.wheel(0, -400)
    zoomed = scene.get_attribute("transform")
    assert zoomed != before
    assert float(zoomed.split("scale(")[1].rstrip(")")) > float(before.split("scale(")[1].rstrip(")"))
    shown = page.locator(".osv-side h2").inner_text()
    page.mouse.down()
    page.mouse.move(650, 300, steps=5)
    page.mouse.up()
    assert scene.get_attribute("transform").split(" scale")[0] != zoomed.split(" scale")[0]
    assert page.locator(".osv-side h2").inner_text() == shown
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "graph-view-1000-nodes.png"))
    assert requests == []
    page.close()
