"""The graph document (JSON), the SVG and the self-contained HTML view, on models built here."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

from onnxserve.errors import InvalidInputError
from onnxserve.toolkit.graph import FORMAT, build_graph, module_path, page_of, weight_values
from onnxserve.toolkit.visualize.html import render_html, viewer_assets, viewer_payload
from onnxserve.toolkit.visualize.svg import render_svg

FLOAT = onnx.TensorProto.FLOAT
SVG = "{http://www.w3.org/2000/svg}"


def encoder_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[batch, 8] -> MatMul(w) -> Add(b) -> Relu -> MatMul(head) -> y, named like a TorchScript export."""
    rng = np.random.default_rng(1)
    weights = {
        "w": rng.standard_normal((8, 16)).astype(np.float32),
        "b": np.where(np.arange(16) % 4 == 0, 0.0, rng.standard_normal(16)).astype(np.float32),
        "head": rng.standard_normal((16, 3)).astype(np.float32),
    }
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["h"], name="/encoder/layer.0/dense/MatMul"),
        oh.make_node("Add", ["h", "b"], ["hb"], name="/encoder/layer.0/dense/Add"),
        oh.make_node("Relu", ["hb"], ["r"], name="/encoder/layer.0/act/Relu"),
        oh.make_node("MatMul", ["r", "head"], ["logits"], name="/head/MatMul"),
        oh.make_node("Softmax", ["logits"], ["y"], name="", axis=-1),
    ]
    graph = oh.make_graph(
        nodes,
        "encoder",
        [oh.make_tensor_value_info("x", FLOAT, ["batch", 8])],
        [oh.make_tensor_value_info("y", FLOAT, ["batch", 3])],
        [onh.from_array(a, name) for name, a in weights.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], producer_name="tests")
    onnx.checker.check_model(model, full_check=True)
    return model, weights


def test_document_nodes_edges_shapes_and_modules() -> None:
    model, _ = encoder_model()
    doc = build_graph(model)
    data = doc.to_json()
    json.dumps(data)  # plain JSON values throughout
    assert data["format"] == FORMAT
    assert [n["name"] for n in data["nodes"]] == [
        "/encoder/layer.0/dense/MatMul",
        "/encoder/layer.0/dense/Add",
        "/encoder/layer.0/act/Relu",
        "/head/MatMul",
        "Softmax_4",  # unnamed: op type and index
    ]
    assert [n["module"] for n in data["nodes"]] == [
        "encoder/layer.0/dense",
        "encoder/layer.0/dense",
        "encoder/layer.0/act",
        "head",
        "",
    ]
    assert data["nodes"][4]["attributes"] == {"axis": -1}
    edges = {(e["source"], e["target"], e["tensor"]) for e in data["edges"]}
    assert edges == {
        ("input:x", "/encoder/layer.0/dense/MatMul", "x"),
        ("/encoder/layer.0/dense/MatMul", "/encoder/layer.0/dense/Add", "h"),
        ("/encoder/layer.0/dense/Add", "/encoder/layer.0/act/Relu", "hb"),
        ("/encoder/layer.0/act/Relu", "/head/MatMul", "r"),
        ("/head/MatMul", "Softmax_4", "logits"),
        ("Softmax_4", "output:y", "y"),
    }
    # shape inference: symbolic dims kept by name
    assert data["values"]["h"] == {"dtype": "float32", "shape": ["batch", 16]}
    assert data["values"]["logits"] == {"dtype": "float32", "shape": ["batch", 3]}
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]


def test_initializer_summaries_match_numpy() -> None:
    model, weights = encoder_model()
    summaries = build_graph(model).to_json()["initializers"]
    for name, array in weights.items():
        s = summaries[name]
        assert s["shape"] == list(array.shape)
        assert s["dtype"] == "float32"
        assert s["count"] == array.size
        assert s["bytes"] == array.nbytes
        assert s["min"] == pytest.approx(float(array.min()))
        assert s["max"] == pytest.approx(float(array.max()))
        assert s["mean"] == pytest.approx(float(array.astype(np.float64).mean()))
        assert s["std"] == pytest.approx(float(array.astype(np.float64).std()))
        assert s["sparsity"] == pytest.approx(np.count_nonzero(array == 0) / array.size)
        counts, edges = np.histogram(array.astype(np.float64), bins=20)
        assert s["histogram"]["counts"] == counts.tolist()
        assert s["histogram"]["edges"] == pytest.approx(edges.tolist())
        assert sum(s["histogram"]["counts"]) == array.size
    assert summaries["b"]["sparsity"] == pytest.approx(4 / 16)


def test_weight_values_page_through_and_external_data(tmp_path: Path) -> None:
    model, weights = encoder_model()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    stored = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    flat = weights["w"].reshape(-1)
    page = weight_values(stored, "w", offset=100, limit=50, base_dir=tmp_path)
    assert (page.total, page.offset, page.shape) == (flat.size, 100, [8, 16])
    assert page.values == pytest.approx(flat[100:150].tolist())
    tail = weight_values(stored, "w", offset=120, limit=50, base_dir=tmp_path)
    assert len(tail.values) == flat.size - 120
    doc = build_graph(stored, base_dir=tmp_path)
    assert doc.initializers["w"].external is True
    assert doc.initializers["w"].max == pytest.approx(float(flat.max()))
    with pytest.raises(InvalidInputError, match="no initializer named 'nope'"):
        weight_values(stored, "nope")
    with pytest.raises(InvalidInputError, match=">= 0"):
        weight_values(stored, "w", offset=-1)
    # a missing external data file is a warning in the document, not a crash
    (tmp_path / "m.data").unlink()
    broken = build_graph(stored, base_dir=tmp_path)
    assert broken.initializers["w"].min is None
    assert any("'w'" in w for w in broken.warnings)


def test_module_path_from_dynamo_metadata() -> None:
    node = oh.make_node("MatMul", ["a", "b"], ["c"], name="node_MatMul_3")
    entry = node.metadata_props.add()
    entry.key = "pkg.torch.onnx.name_scopes"
    entry.value = "['', 'model', 'model.encoder', 'model.encoder.layer.0', 'linear']"
    assert module_path(node) == "model/encoder/layer.0"
    assert module_path(oh.make_node("Relu", ["a"], ["b"], name="plain")) == ""


def test_svg_is_xml_with_every_node_and_highlights() -> None:
    model, _ = encoder_model()
    doc = build_graph(model)
    svg = render_svg(doc, highlight={"/head/MatMul": "added", "Softmax_4": "changed"})
    root = ET.fromstring(svg.encode())
    assert root.tag == f"{SVG}svg"
    boxes = {g.get("data-name"): g.get("class", "") for g in root.iter(f"{SVG}g") if g.get("data-name")}
    assert set(boxes) == {n.name for n in doc.nodes} | {"input:x", "output:y"}
    assert "added" in boxes["/head/MatMul"].split()
    assert "changed" in boxes["Softmax_4"].split()
    assert not any(c in boxes["/encoder/layer.0/act/Relu"].split() for c in ("added", "removed", "changed"))
    # every box lies inside the canvas, and layers go down the data flow
    ys = {}
    width, height = float(root.get("width", 0)), float(root.get("height", 0))
    for g in root.iter(f"{SVG}g"):
        rect = g.find(f"{SVG}rect")
        if g.get("data-name") and rect is not None:
            x, y = float(rect.get("x", -1)), float(rect.get("y", -1))
            assert x >= 0
            assert x + float(rect.get("width", 0)) <= width
            assert y >= 0
            assert y + float(rect.get("height", 0)) <= height
            ys[g.get("data-name")] = y
    assert ys["input:x"] < ys["/encoder/layer.0/dense/MatMul"] < ys["/head/MatMul"] < ys["output:y"]
    with pytest.raises(InvalidInputError, match="unknown highlight"):
        render_svg(doc, highlight={"/head/MatMul": "purple"})


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._open: dict[str, str | None] | None = None
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.references += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "script":
            self._open = found
            self.scripts.append((found, ""))

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._open = None


def test_html_is_self_contained_and_embeds_the_document() -> None:
    model, weights = encoder_model()
    # a hostile node name must not end the embedded script early
    model.graph.node[2].name = "</script><script>alert(1)</script>"
    doc = build_graph(model)
    html = render_html(doc, title="encoder <test>")
    parser = _Scripts()
    parser.feed(html)
    assert len(parser.scripts) == 3
    assert parser.references == []
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert not re.search(r"""url\(\s*["']?\s*(https?:)?//""", html)
    assert "@import" not in html
    assert "<title>encoder &lt;test&gt;</title>" in html
    [payload_text] = [text for attrs, text in parser.scripts if attrs.get("type") == "application/json"]
    payload = json.loads(payload_text)
    assert payload["graph"] == json.loads(json.dumps(doc.to_json()))
    assert {n["name"] for n in payload["graph"]["nodes"]} == {n.name for n in doc.nodes}
    assert payload["weights"]["w"]["values"] == pytest.approx(weights["w"].reshape(-1).tolist())
    js, css = viewer_assets()
    assert "OnnxServeViewer" in js
    assert ".osv-node" in css
    assert js in html
    assert css in html


def test_viewer_payload_embeds_a_bounded_number_of_values_and_intermediates() -> None:
    big = np.arange(5000, dtype=np.float32)
    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "big"], ["y"], name="add")],
        "g",
        [oh.make_tensor_value_info("x", FLOAT, [5000])],
        [oh.make_tensor_value_info("y", FLOAT, [5000])],
        [onh.from_array(big, "big")],
    )
    doc = build_graph(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), sample_values=1000)
    from onnxserve.toolkit.graph import array_summary

    probe = array_summary("y", np.linspace(0, 1, 11))
    payload = viewer_payload(doc, title="t", intermediates={"y": probe}, highlight={"add": "removed"})
    assert payload["weights"]["big"]["values"] == big[:1000].tolist()
    assert payload["graph"]["initializers"]["big"]["count"] == 5000
    assert payload["intermediates"]["y"]["max"] == 1.0
    assert payload["highlight"] == {"add": "removed"}
    assert viewer_payload(doc, max_values=300)["weights"]["big"]["values"] == big[:300].tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.bool_])
def test_page_values_are_each_value_shortest_in_its_own_type(dtype: type) -> None:
    """A weights page writes each float16 or float32 value as the shortest text that reads back as that value
    in its own type (NaN and infinities by name), computed for the whole page at once: value by value, a
    page of 10,000 took 27 ms on the event loop, and a flood of pages held the probes 11 to 30 s (outside
    attack rt45). The reference here is the value-by-value reading."""
    values = (np.random.default_rng(7).standard_normal(3000) * 300).astype(dtype)
    if values.dtype.kind == "f":
        values[[3, 7, 11]] = [np.nan, np.inf, -np.inf]
    page = page_of(onh.from_array(values, "w"), values, 0, 3000).values
    if values.dtype.kind == "f" and values.dtype.itemsize < 8:
        expected = [
            float(text) if np.isfinite(v) else str(v) for text, v in zip(values.astype(str), values, strict=True)
        ]
    else:
        expected = [v if not isinstance(v, float) or np.isfinite(v) else str(v) for v in values.tolist()]
    assert page == expected
    assert [type(v) for v in page] == [type(v) for v in expected]
