"""The server's web page at ``/``, against real servers on loopback ports.

httpx reads the HTML pages and their JSON endpoints: every served model version is listed with its
state and labels, a version's page shows its signature (checked against the ONNX file and the V2
metadata), the try-it form is prefilled with a request the server accepts, the graph JSON has the
node count onnx counts, weights page through as numpy reads them, a diff finds the weight that
differs, model-provided markup is escaped, and unknown models or versions get clear 404s.

The try-it form offers the routes that fit each model (V2; OpenAI /v1/embeddings and TEI /embed for
pooled embedding models, /rerank for rerankers, /predict for classifiers, /tokenize for text models).

The ``browser`` test drives headless Chromium (Debian's) through Playwright against the demo server:
model list, the MiniLM page, a click on a graph node, the try-it form (V2, then OpenAI's and TEI's
routes on the tiny BERT, with their curl lines and error shapes), and a diff view; screenshots go to
tests/artifacts/.
"""

from __future__ import annotations

import html
import json
import re
import select
import shlex
import shutil
import socket
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

import models
from onnxserve.config import parse_config
from onnxserve.core.manager import Catalog
from onnxserve.core.pipeline import PipelineSpec
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from vocabulary import ONNX_V2
from waiting import wait_until

ARTIFACTS = Path(__file__).parents[1] / "artifacts"

EVIL_INPUT = '<img src=x onerror="window.__xss=1">'
EVIL_NODE = '<svg onload="window.__xss=2">'
EVIL_DOC = "<script>window.__xss=3</script>"
EVIL_KEY, EVIL_VALUE = "<i>key</i>", "<script>window.__xss=4</script>"
EVIL_OUTPUT = '"><script>window.__xss=5</script>'
EVIL_PRODUCER = "<b>producer</b>"
EVIL_LABELS = {0: "<b>bold</b>", 1: "<script>window.__xss=6</script>"}
EVIL_STRINGS = (EVIL_INPUT, EVIL_DOC, EVIL_KEY, EVIL_VALUE, EVIL_OUTPUT, EVIL_PRODUCER, *EVIL_LABELS.values())

WEIGHT_1 = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
WEIGHT_2 = WEIGHT_1.copy()
WEIGHT_2[1, 2] += 1.5


def linear_model(weight: npt.NDArray[np.float32]) -> onnx.ModelProto:
    """y = relu(x @ W): two named nodes and one weight, which differs between the two versions."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
            helper.make_node("Relu", ["h"], ["y"], name="act"),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def tricky_model() -> onnx.ModelProto:
    """A model whose names and metadata are markup: none of it may reach a page as markup."""
    graph = helper.make_graph(
        [helper.make_node("Relu", [EVIL_INPUT], [EVIL_OUTPUT], name=EVIL_NODE)],
        "tricky",
        [helper.make_tensor_value_info(EVIL_INPUT, TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info(EVIL_OUTPUT, TensorProto.FLOAT, ["n", 2])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=9,
        producer_name=EVIL_PRODUCER,
        doc_string=EVIL_DOC,
    )
    helper.set_model_props(model, {EVIL_KEY: EVIL_VALUE})
    return model


def word_level_folder(folder: Path, model: onnx.ModelProto, spec: PipelineSpec) -> None:
    """A pipeline folder: ``model``, a word-level tokenizer, ``spec``."""
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    tokenizer = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    spec.write(folder)


def classifier_folder(folder: Path, labels: dict[int, str] = EVIL_LABELS) -> None:
    """A text-classification pipeline folder (word-level tokenizer) of ``labels`` (by default two that are
    markup): any text is class 0 (``models.token_count_classifier``)."""
    spec = PipelineSpec(
        task="text-classification",
        inputs=["input_ids", "attention_mask"],
        outputs=["logits"],
        max_length=16,
        labels=labels,
    )
    word_level_folder(folder, models.token_count_classifier(len(labels)), spec)


def ranker_folder(folder: Path) -> None:
    """A text-ranking pipeline folder: relevance logit = number of tokens of the (query, text) pair."""
    model = models.parse(
        """
        ranker (int64[batch, seq] input_ids, int64[batch, seq] attention_mask) => (float[batch, 1] logits) {
            maskf = Cast <to = 1> (attention_mask)
            axes = Constant <value = int64[1] {1}> ()
            logits = ReduceSum <keepdims = 1> (maskf, axes)
        }
        """
    )
    spec = PipelineSpec(task="text-ranking", inputs=["input_ids", "attention_mask"], outputs=["logits"], max_length=32)
    word_level_folder(folder, model, spec)


@pytest.fixture(scope="module")
def web_repository(tmp_path_factory: pytest.TempPathFactory, tiny_text_version: Path) -> Path:
    repo = tmp_path_factory.mktemp("web")
    models.write_version(repo, "linear", 1, linear_model(WEIGHT_1))
    models.write_version(repo, "linear", 2, linear_model(WEIGHT_2))
    models.write_version(repo, "tricky", 1, tricky_model())
    classifier_folder(repo / "classifier" / "1")
    ranker_folder(repo / "ranker" / "1")
    shutil.copytree(tiny_text_version, repo / "tiny" / "1")
    return repo


@pytest.fixture(scope="module")
def web_server(web_repository: Path) -> Iterator[RunningServer]:
    document = {
        "model_config_list": [
            {
                "name": "linear",
                "base_path": "linear",
                "max_batch_size": 8,
                "model_version_policy": {"all": {}},
                "version_labels": {"stable": 1, "canary": 2},
            },
            {"name": "tricky", "base_path": "tricky"},
            {"name": "classifier", "base_path": "classifier", "max_batch_size": 4},
            {"name": "ranker", "base_path": "ranker", "max_batch_size": 4},
            {"name": "tiny", "base_path": "tiny", "max_batch_size": 4},
        ]
    }
    config = parse_config(document, "web test config", web_repository)
    server = start_in_background(config, ServerSettings(http_port=0, grpc_port=0, log_level="warning"))
    yield server
    server.stop()


class Page(HTMLParser):
    """The parts of a page the tests read: table rows (with their ``tr`` attributes), textareas, text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[dict[str, str], list[str]]] = []
        self.tables: list[list[list[str]]] = []
        self.textareas: dict[str, str] = {}
        self.options: list[dict[str, str]] = []
        self.elements: dict[str, dict[str, str]] = {}  # by id
        self._cell: list[str] | None = None
        self._row: tuple[dict[str, str], list[str]] | None = None
        self._textarea: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if "id" in attributes:
            self.elements[attributes["id"]] = attributes
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = (attributes, [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "textarea":
            self._textarea = attributes.get("name", "")
            self.textareas[self._textarea] = ""
        elif tag == "option":
            self.options.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row[1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            if self.tables:
                self.tables[-1].append(self._row[1])
            self._row = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._textarea is not None:
            self.textareas[self._textarea] += data


def get_page(server: RunningServer, path: str, status: int = 200) -> Page:
    response = httpx.get(server.http_url + path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    return Page(response.text)


def index_entries(server: RunningServer) -> list[dict[str, str]]:
    response = httpx.post(f"{server.http_url}/v2/repository/index", json={})
    assert response.status_code == 200
    entries: list[dict[str, str]] = response.json()
    return entries


def onnx_shape(info: onnx.ValueInfoProto) -> str:
    dims = info.type.tensor_type.shape.dim
    return "[" + ", ".join(d.dim_param if d.HasField("dim_param") else str(d.dim_value) for d in dims) + "]"


def signature_rows(page: Page) -> tuple[list[list[str]], list[list[str]]]:
    """The inputs and outputs tables of a version page (the first two tables headed name/datatype/shape)."""
    tables = [t for t in page.tables if t and t[0] == ["name", "datatype", "shape"]]
    assert len(tables) == 2, page.tables
    return tables[0][1:], tables[1][1:]


# ---- the model list ------------------------------------------------------------------------------


def test_index_lists_every_version_with_its_state_labels_and_task(web_server: RunningServer) -> None:
    page = get_page(web_server, "/")
    listed = {(a["data-model"], a["data-version"]): cells for a, cells in page.rows if "data-model" in a}
    served = {(e["name"], e["version"]): e["state"] for e in index_entries(web_server)}
    assert set(listed) == set(served)
    for (name, version), state in served.items():
        assert state in listed[(name, version)], (name, version, listed[(name, version)])
    # the model name cell spans its versions: the first row of "linear" is version 2 (highest first)
    assert listed[("linear", "2")][:4] == ["linear", "2", "READY", "canary"]
    assert listed[("linear", "1")][:3] == ["1", "READY", "stable"]
    assert "text · text-classification" in listed[("classifier", "1")]
    assert "tensors" in listed[("tricky", "1")]


def test_model_page_lists_versions_and_offers_a_diff(web_server: RunningServer) -> None:
    response = httpx.get(f"{web_server.http_url}/models/linear")
    assert response.status_code == 200
    page = Page(response.text)
    versions = [a["data-version"] for a, _ in page.rows if a.get("data-model") == "linear"]
    assert versions == ["2", "1"]
    assert 'action="/models/linear/diff"' in response.text
    assert '<option value="1" selected>' in response.text  # older on the left by default


def test_states_of_models_not_loaded_or_failed_are_shown(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    models.write_version(repo, "loaded", 1, models.offset_model(1.0))
    models.write_version(repo, "idle", 1, models.offset_model(2.0))
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not an onnx file <b>")
    settings = ServerSettings(
        http_port=0, grpc_port=0, log_level="warning", model_control_mode="explicit", load_models=("loaded",)
    )
    catalog = Catalog(repository=repo)
    server = start_in_background(catalog.read(), settings, catalog)
    try:
        assert httpx.post(f"{server.http_url}/v2/repository/models/broken/load").status_code >= 400
        page = get_page(server, "/")
        states = {a["data-model"]: cells for a, cells in page.rows if "data-model" in a}
        assert states["loaded"][2] == "READY"
        assert states["idle"][2] == "UNAVAILABLE"
        assert "not loaded" in states["idle"][-1]
        assert states["broken"][2] == "UNAVAILABLE"
        assert "not an ONNX model" in states["broken"][-1]
        assert str(tmp_path) not in states["broken"][-1]  # what went wrong, not where (as the API answers)
        # a model that is not loaded has no page, and says so
        assert html.escape("unknown model 'idle'") in httpx.get(f"{server.http_url}/models/idle").text
    finally:
        server.stop()


# ---- a version's page ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["add", "mixed", "fixed", "strings", "slow"])
def test_version_page_signature_matches_the_model(
    numeric_server: RunningServer, numeric_repository: Path, name: str
) -> None:
    model = onnx.load(numeric_repository / name / "1" / "model.onnx")
    page = get_page(numeric_server, f"/models/{name}/versions/1")
    inputs, outputs = signature_rows(page)
    assert inputs == [[i.name, ONNX_V2[i.type.tensor_type.elem_type], onnx_shape(i)] for i in model.graph.input]
    assert outputs == [[o.name, ONNX_V2[o.type.tensor_type.elem_type], onnx_shape(o)] for o in model.graph.output]


@pytest.mark.parametrize("name", ["add", "mixed", "fixed", "strings", "slow"])
def test_try_it_form_is_prefilled_with_a_request_the_server_accepts(numeric_server: RunningServer, name: str) -> None:
    page = get_page(numeric_server, f"/models/{name}/versions/1")
    form = page.elements["try-it"]
    assert form["data-mode"] == "tensors"
    assert form["data-url"] == f"/v2/models/{name}/versions/1/infer"
    response = httpx.post(
        numeric_server.http_url + form["data-url"],
        content=page.textareas["body"],
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    metadata = httpx.get(f"{numeric_server.http_url}/v2/models/{name}/versions/1").json()
    assert [o["name"] for o in response.json()["outputs"]] == [o["name"] for o in metadata["outputs"]]


def test_pipeline_page_shows_the_text_interface_and_labels(web_server: RunningServer) -> None:
    page = get_page(web_server, "/models/classifier/versions/1")
    form = page.elements["try-it"]
    assert form["data-mode"] == "text"
    assert "text" in page.textareas
    tables = [t for t in page.tables if t and t[0] == ["id", "label"]]
    assert tables == [[["id", "label"], ["0", EVIL_LABELS[0]], ["1", EVIL_LABELS[1]]]]
    inputs, _ = signature_rows(page)
    assert [row[0] for row in inputs] == ["input_ids", "attention_mask"]
    # what the form sends for the prefilled text is answered with a label
    text = page.textareas["text"].strip()
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    answer = httpx.post(web_server.http_url + form["data-url"], json=body)
    assert answer.status_code == 200, answer.text
    assert {o["name"]: o["data"] for o in answer.json()["outputs"]}["label"] == [EVIL_LABELS[0]]


@pytest.mark.parametrize(
    ("name", "routes"),
    [
        ("tiny", ["/v2/models/tiny/versions/1/infer", "/v1/embeddings", "/embed", "/tokenize"]),
        ("ranker", ["/v2/models/ranker/versions/1/infer", "/rerank", "/tokenize"]),
        ("classifier", ["/v2/models/classifier/versions/1/infer", "/predict", "/tokenize"]),
        ("tricky", ["/v2/models/tricky/versions/1/infer"]),
    ],
)
def test_try_it_offers_the_routes_that_fit_the_model(web_server: RunningServer, name: str, routes: list[str]) -> None:
    page = get_page(web_server, f"/models/{name}/versions/1")
    route_options = [o for o in page.options if "data-path" in o]
    assert [o["data-path"] for o in route_options] == routes
    assert page.elements["try-it"]["data-model"] == f"{name}:1"
    # each offered route answers the model (named as the form names it) with 200
    texts = ["hello world", "world"]
    bodies = {
        "/v1/embeddings": {"model": f"{name}:1", "input": texts},
        "/embed": {"inputs": texts},
        "/rerank": {"query": "hello", "texts": texts},
        "/predict": {"inputs": texts},
        "/tokenize": {"inputs": texts},
    }
    for path in routes[1:]:
        answer = httpx.post(web_server.http_url + path, json=bodies[path], headers={"X-Model": f"{name}:1"})
        assert answer.status_code == 200, (path, answer.text)
    # the reranker's form sends a query and its texts; V2 pairs the query with each text
    if name == "ranker":
        assert set(page.textareas) == {"query", "text"}
        text_lines = page.textareas["text"].strip().split("\n")
        query = page.textareas["query"].strip()
        body = {
            "inputs": [
                {"name": "query", "datatype": "BYTES", "shape": [len(text_lines)], "data": [query] * len(text_lines)},
                {"name": "text", "datatype": "BYTES", "shape": [len(text_lines)], "data": text_lines},
            ]
        }
        answer = httpx.post(web_server.http_url + page.elements["try-it"]["data-url"], json=body)
        assert answer.status_code == 200, answer.text


def test_a_label_names_the_version_page(web_server: RunningServer) -> None:
    response = httpx.get(f"{web_server.http_url}/models/linear/versions/canary")
    assert response.status_code == 302
    assert response.headers["location"] == "/models/linear/versions/2"


# ---- JSON endpoints ------------------------------------------------------------------------------


def test_graph_json_has_every_node_of_the_served_file(web_server: RunningServer, web_repository: Path) -> None:
    for name, version in (("linear", "1"), ("linear", "2"), ("tricky", "1"), ("classifier", "1")):
        model = onnx.load(web_repository / name / version / "model.onnx")
        response = httpx.get(f"{web_server.http_url}/web/api/models/{name}/versions/{version}/graph")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        graph = response.json()
        assert len(graph["nodes"]) == len(model.graph.node)
        assert [n["op_type"] for n in graph["nodes"]] == [n.op_type for n in model.graph.node]
    graph = httpx.get(f"{web_server.http_url}/web/api/models/linear/versions/stable/graph").json()
    assert graph["initializers"]["W"]["max"] == pytest.approx(float(WEIGHT_1.max()))


def test_weight_values_page_through_the_initializer(web_server: RunningServer) -> None:
    url = f"{web_server.http_url}/web/api/models/linear/versions/2/weights"
    page = httpx.get(url, params={"name": "W", "offset": 4, "limit": 5}).json()
    assert page["total"] == WEIGHT_2.size
    assert page["values"] == pytest.approx(WEIGHT_2.ravel()[4:9].tolist())
    past_the_end = httpx.get(url, params={"name": "W", "offset": 100}).json()
    assert past_the_end["values"] == []


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/web/api/models/nope/versions/1/graph", 404, "unknown model 'nope'"),
        ("/web/api/models/linear/versions/9/graph", 404, "has no version 9"),
        ("/web/api/models/linear/versions/beta/graph", 404, "no version or label 'beta'"),
        ("/web/api/models/linear/versions/1/weights?offset=0", 400, "name the initializer"),
        ("/web/api/models/linear/versions/1/weights?name=W&offset=-1", 400, "offset must be a whole number"),
        ("/web/api/models/linear/versions/1/weights?name=W&limit=x", 400, "limit must be a whole number"),
        ("/web/api/models/linear/versions/1/weights?name=nope", 400, "no initializer named 'nope'"),
        ("/web/api/models/linear/diff?a=1", 400, "give both versions"),
        ("/web/api/models/linear/diff?a=1&b=7", 404, "has no version 7"),
        ("/web/api/models/tricky/diff", 400, "nothing to compare"),
        ("/web/api/nothing", 404, "no such endpoint"),
    ],
)
def test_json_endpoints_refuse_bad_requests_with_v2_error_bodies(
    web_server: RunningServer, path: str, status: int, message: str
) -> None:
    response = httpx.get(web_server.http_url + path)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert httpx.get(f"{web_server.http_url}/models/linear/versions/1").status_code == 200  # still serving


def test_diff_finds_the_weight_that_differs(web_server: RunningServer) -> None:
    response = httpx.get(f"{web_server.http_url}/web/api/models/linear/diff", params={"a": "stable", "b": "canary"})
    assert response.status_code == 200
    document = response.json()
    diff = document["diff"]
    changed = {c["name"]: c for c in diff["initializers"]}
    assert list(changed) == ["W"]
    assert changed["W"]["stats"]["max_abs_diff"] == pytest.approx(float(np.abs(WEIGHT_2 - WEIGHT_1).max()))
    assert changed["W"]["stats"]["changed"] == int(np.count_nonzero(WEIGHT_2 != WEIGHT_1))
    assert diff["nodes_added"] == []
    assert diff["nodes_removed"] == []
    assert document["highlight"] == {"a": {"proj": "changed"}, "b": {"proj": "changed"}}


def test_diff_page_names_both_versions(web_server: RunningServer) -> None:
    response = httpx.get(f"{web_server.http_url}/models/linear/diff", params={"a": "1", "b": "2"})
    assert response.status_code == 200
    page = Page(response.text)
    assert page.elements["diff"]["data-diff-url"] == "/web/api/models/linear/diff?a=1&b=2"
    assert page.elements["graph-a"]["data-graph-url"] == "/web/api/models/linear/versions/1/graph"
    assert page.elements["graph-b"]["data-graph-url"] == "/web/api/models/linear/versions/2/graph"
    # without versions: the two highest, older first; labels: the versions they name
    for query, target in (("", "?a=1&b=2"), ("?a=stable&b=canary", "?a=1&b=2")):
        redirect = httpx.get(f"{web_server.http_url}/models/linear/diff{query}")
        assert redirect.status_code == 303
        assert redirect.headers["location"] == f"/models/linear/diff{target}"


# ---- errors and escaping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/models/nope", 404, "unknown model 'nope'"),
        ("/models/nope/versions/1", 404, "unknown model 'nope'"),
        ("/models/linear/versions/9", 404, "model 'linear' has no version 9 (served: 2, 1)"),
        ("/models/linear/versions/beta", 404, "model 'linear' has no version or label 'beta' (labels: canary, stable)"),
        ("/models/linear/diff?a=1&b=9", 404, "model 'linear' has no version 9"),
        ("/models/linear/diff?b=1", 400, "give both versions to compare"),
        ("/models/tricky/diff", 400, "model 'tricky' has one loaded version (1); there is nothing to compare"),
    ],
)
def test_unknown_models_and_versions_get_an_error_page(
    web_server: RunningServer, path: str, status: int, message: str
) -> None:
    response = httpx.get(web_server.http_url + path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert html.escape(message) in response.text
    assert 'href="/"' in response.text


def test_markup_from_models_and_urls_is_escaped(web_server: RunningServer) -> None:
    pages = {
        path: httpx.get(web_server.http_url + path)
        for path in ("/", "/models/tricky/versions/1", "/models/classifier/versions/1", "/models/tricky")
    }
    tricky = pages["/models/tricky/versions/1"]
    for evil in (EVIL_INPUT, EVIL_OUTPUT, EVIL_DOC, EVIL_KEY, EVIL_VALUE, EVIL_PRODUCER):
        assert html.escape(evil) in tricky.text, evil
    for evil in EVIL_LABELS.values():
        assert html.escape(evil) in pages["/models/classifier/versions/1"].text
    for path, response in pages.items():
        assert response.status_code == 200, path
        for evil in EVIL_STRINGS:
            assert evil not in response.text, (path, evil)
        # the only scripts are the page's own files; the policy forbids any other
        scripts = re.findall(r"<script[^>]*>", response.text)
        assert [s for s in scripts if not re.fullmatch(r'<script src="/web/static/\w+\.js" defer>', s)] == []
        assert "script-src 'self'" in response.headers["content-security-policy"]
    # a name in the URL comes back in the 404 message, as text
    response = httpx.get(web_server.http_url + "/models/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert response.status_code == 404
    assert "<img" not in response.text
    assert html.escape("unknown model '<img src=x onerror=alert(1)>'") in response.text
    # the prefilled request for the markup-named input is still one the server accepts
    page = Page(tricky.text)
    answer = httpx.post(
        web_server.http_url + page.elements["try-it"]["data-url"],
        content=page.textareas["body"],
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["name"] == EVIL_OUTPUT


def test_assets_ship_in_the_package_and_need_no_network(web_server: RunningServer) -> None:
    page = httpx.get(f"{web_server.http_url}/models/linear/versions/1").text
    assets = re.findall(r'(?:src|href)="(/web/static/[^"]+)"', page)
    assert sorted(assets) == [
        "/web/static/page.css",
        "/web/static/page.js",
        "/web/static/viewer.css",
        "/web/static/viewer.js",
    ]
    for asset in assets:
        response = httpx.get(web_server.http_url + asset)
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] in ("text/javascript", "text/css")
        # nothing is fetched from elsewhere (the SVG namespace is a name, not a request)
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", response.text), asset
    assert re.findall(r'(?:src|href)="https?:', page) == []
    assert httpx.get(f"{web_server.http_url}/web/static/..%2Fpages.py").status_code == 404
    assert httpx.get(f"{web_server.http_url}/web/static/nope.js").status_code == 404


# ---- in a browser --------------------------------------------------------------------------------


def _screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


@pytest.mark.browser
def test_web_page_in_a_browser(
    demo_server: RunningServer, demo_repository: Path, web_server: RunningServer, chromium_executable: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    demo_nodes = len(onnx.load(demo_repository / "minilm" / "1" / "model.onnx", load_external_data=False).graph.node)
    sentence = "The web page sends this sentence to the server."
    reference = httpx.post(
        f"{demo_server.http_url}/v2/models/minilm/versions/1/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [sentence]}]},
    ).json()["outputs"][0]
    tiny_metadata = httpx.get(f"{web_server.http_url}/v2/models/tiny/versions/1").json()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        expected = re.compile(r"Failed to load resource: the server responded with a status of (400|422)")

        def console(message: Any) -> None:
            if message.type == "error" and not expected.search(message.text):  # the refused requests below
                errors.append(message.text)

        page.on("console", console)
        try:
            # the model list
            page.goto(demo_server.http_url + "/")
            expect(page.locator('tr[data-model="minilm"][data-version="1"]')).to_contain_text("READY")
            _screenshot(page, "web-index.png")

            # the MiniLM version page: signature, text interface, graph
            page.locator('tr[data-model="minilm"] a', has_text="1").first.click()
            expect(page).to_have_url(re.compile(r"/models/minilm/versions/1$"))
            expect(page.locator("#graph")).to_have_attribute("data-nodes", str(demo_nodes), timeout=30_000)
            page.locator("#graph g.osv-node", has_text="Gather").first.click()  # the word embeddings' lookup
            expect(page.locator("#graph .osv-node-title")).to_contain_text("Gather")
            expect(page.locator("#graph .osv-side")).to_contain_text("Weights")
            # a node further down, found by the viewer's search; its weight values page in from the server
            page.fill("#graph .osv-toolbar input[type=search]", "MatMul")
            page.locator("#graph .osv-results div", has_text=re.compile(r"^MatMul — ")).first.click()
            expect(page.locator("#graph .osv-node-title")).to_contain_text("MatMul")
            values = page.locator("#graph .osv-pager .osv-values").first
            expect(values).to_contain_text("[99]")
            page.locator("#graph .osv-pager button", has_text="next").first.click()
            expect(values).to_contain_text("[100]")
            _screenshot(page, "web-version-graph.png")

            # try it: a sentence in, its embedding out
            page.fill("#try-it textarea[name=text]", sentence)
            page.click("#try-it button[type=submit]")
            output = page.locator('#try-result .output[data-output="embedding"]')
            expect(output.locator(".output-head")).to_have_text("embedding · FP32 · [1, 384]", timeout=30_000)
            first = float(output.locator(".output-values").inner_text().split(",")[0])
            assert first == pytest.approx(reference["data"][0], rel=1e-4, abs=1e-6)
            _screenshot(page, "web-try-it.png")

            # nothing to send is said at once; an error from the server is shown with its message
            page.fill("#try-it textarea[name=text]", "")
            page.click("#try-it button[type=submit]")
            expect(page.locator("#try-result .error")).to_have_text("enter a text to send")
            page.fill("#try-it textarea[name=text]", "\n".join(["a sentence"] * 40))
            page.click("#try-it button[type=submit]")
            expect(page.locator("#try-result .error")).to_have_text(
                "400: 40 texts in one request, more than the model's max_batch_size 32"
            )

            # the diff of two versions: tables, and both graphs with the changed node marked
            page.goto(web_server.http_url + "/models/linear/diff?a=1&b=2")
            expect(page.locator('#diff section[data-part="initializers"]')).to_contain_text("W")
            expect(page.locator("#graph-a g.osv-node.changed")).to_have_count(1)
            expect(page.locator("#graph-b g.osv-node.changed")).to_have_count(1)
            _screenshot(page, "web-diff.png")

            # markup in a model stays text: the graph's details and the try-it answer
            page.goto(web_server.http_url + "/models/tricky/versions/1")
            page.locator("#graph g.osv-node", has_text="Relu").first.click()
            expect(page.locator("#graph .osv-node-title")).to_have_text(f"Relu — {EVIL_NODE}")
            page.click("#try-it button[type=submit]")
            expect(page.locator("#try-result .output-head")).to_contain_text(EVIL_OUTPUT)
            page.goto(web_server.http_url + "/models/classifier/versions/1")
            page.click("#try-it button[type=submit]")
            expect(page.locator('#try-result .output[data-output="label"] .output-values')).to_have_text(
                '"' + EVIL_LABELS[0] + '"'
            )

            # the tiny text model through OpenAI's /v1/embeddings: the curl line is the request the form sends
            page.goto(web_server.http_url + "/models/tiny/versions/1")
            page.select_option("#try-route", "openai-embeddings")
            quoted = "It's the tiny model's sentence."
            page.fill("#try-it textarea[name=text]", quoted)
            expect(page.locator("#try-hint")).to_have_text("POST /v1/embeddings")
            curl = shlex.split(page.locator("#try-curl").inner_text())
            assert curl[:5] == ["curl", "-s", "-X", "POST", web_server.http_url + "/v1/embeddings"]
            sent = json.loads(curl[curl.index("-d") + 1])
            assert sent == {"model": "tiny:1", "input": quoted}
            page.click("#try-it button[type=submit]")
            expect(page.locator("#try-status")).to_have_text("200 OK", timeout=30_000)
            answer = json.loads(page.locator("#try-result pre.json").inner_text())
            reference = httpx.post(web_server.http_url + "/v1/embeddings", json=sent).json()
            (embedding,) = [o for o in tiny_metadata["outputs"] if o["name"] == "sentence_embedding"]
            assert len(answer["data"][0]["embedding"]) == embedding["shape"][-1]
            assert answer["data"][0]["embedding"] == pytest.approx(reference["data"][0]["embedding"], abs=1e-5)
            expect(page.locator("#try-result pre.summary")).to_contain_text(f"of {embedding['shape'][-1]} values")
            _screenshot(page, "web-try-it-openai.png")

            # TEI /tokenize: the model named by the X-Model header, the tokens shown
            page.select_option("#try-route", "tei-tokenize")
            page.fill("#try-it textarea[name=text]", quoted)
            curl = shlex.split(page.locator("#try-curl").inner_text())
            assert curl[4] == web_server.http_url + "/tokenize"
            assert "X-Model: tiny:1" in curl
            page.click("#try-it button[type=submit]")
            expect(page.locator("#try-status")).to_have_text("200 OK", timeout=30_000)
            tokens = httpx.post(
                web_server.http_url + "/tokenize", json={"inputs": quoted}, headers={"X-Model": "tiny:1"}
            ).json()
            assert json.loads(page.locator("#try-result pre.json").inner_text()) == tokens
            expect(page.locator("#try-result pre.summary")).to_have_text(" ".join(t["text"] for t in tokens[0]))

            # a reranker: V2 pairs the query with each text; /rerank ranks the texts (here: more tokens, higher)
            page.goto(web_server.http_url + "/models/ranker/versions/1")
            page.fill("#try-it textarea[name=query]", "hello")
            page.fill("#try-it textarea[name=text]", "world\nhello world world")
            page.click("#try-it button[type=submit]")
            expect(page.locator('#try-result .output[data-output="score"] .output-head')).to_have_text(
                "score · FP32 · [2]", timeout=30_000
            )
            page.select_option("#try-route", "tei-rerank")
            page.click("#try-it button[type=submit]")
            expect(page.locator("#try-status")).to_have_text("200 OK", timeout=30_000)
            ranked = json.loads(page.locator("#try-result pre.json").inner_text())
            assert [(r["index"], r["text"]) for r in ranked] == [(1, "hello world world"), (0, "world")]
            page.goto(web_server.http_url + "/models/tiny/versions/1")

            # nothing to send: each route's own error shape comes back and is shown
            page.fill("#try-it textarea[name=text]", "")
            for route, status in (("openai-embeddings", "400"), ("tei-embed", "422")):
                page.select_option("#try-route", route)
                page.click("#try-it button[type=submit]")
                expect(page.locator("#try-status")).to_have_text(f"{status} error", timeout=30_000)
                shown = json.loads(page.locator("#try-result pre.json").inner_text())
                if route == "openai-embeddings":  # OpenAI's {"error": {"message", "type", "param", "code"}}
                    assert set(shown["error"]) == {"message", "type", "param", "code"}
                    message = shown["error"]["message"]
                else:  # TEI's {"error": "...", "error_type": "validation"}
                    assert shown["error_type"] == "validation"
                    message = shown["error"]
                assert message
                expect(page.locator("#try-result .error")).to_have_text(f"{status}: {message}")

            # markup typed into the form stays text: in the curl line and in the tokens that come back
            page.select_option("#try-route", "tei-tokenize")
            page.fill("#try-it textarea[name=text]", EVIL_INPUT)
            expect(page.locator("#try-curl")).to_contain_text("<img src=x onerror=")
            page.click("#try-it button[type=submit]")
            expect(page.locator("#try-status")).to_have_text("200 OK", timeout=30_000)
            expect(page.locator("#try-result pre.summary")).to_contain_text("<")
            expect(page.locator("#try-it img, #try-result img")).to_have_count(0)
            assert page.evaluate("window.__xss") is None
        finally:
            browser.close()
    assert errors == []


def test_large_info_answers_count_in_the_inflight_budget(tmp_path: Path) -> None:
    """TEI /info of a million labels made a 112 MB answer per request, counted nowhere: 32 at once ended the
    process (outside attack rt13 N4). It is encoded once, and counted while sent like an inference answer
    (RESOURCE_EXHAUSTED is 429 on TEI's routes)."""
    classifier_folder(tmp_path / "many" / "1", {i: f"label-{i}-{'x' * 120}" for i in range(40_000)})  # a 10 MB answer
    config = parse_config({"model_config_list": [{"name": "many", "base_path": "many"}]}, "labels", tmp_path)
    settings = ServerSettings(http_port=0, grpc_port=0, log_level="warning", max_inflight_bytes=2 * 1024 * 1024)
    server = start_in_background(config, settings)
    try:
        with socket.create_connection((server.host, server.http_port)) as reader:
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            reader.sendall(b"GET /info HTTP/1.1\r\nHost: [::1]\r\nX-Model: many\r\n\r\n")  # never read
            # its answer is being written (and held) before the next request is sent
            assert select.select([reader], [], [], 60)[0], "the first answer never started"
            wait_until(
                lambda: httpx.get(f"{server.http_url}/info", headers={"X-Model": "many"}).status_code == 429,
                what="the second answer refused while the first is held",
            )
            refused = httpx.get(f"{server.http_url}/info", headers={"X-Model": "many"})
            assert "--max-inflight-bytes" in refused.text
            assert refused.headers.get("retry-after")
        wait_until(
            lambda: httpx.get(f"{server.http_url}/info", headers={"X-Model": "many"}).status_code == 200,
            what="answered once the reader left",
        )
    finally:
        server.stop()


def test_a_version_page_lists_the_first_labels_and_properties_and_info_all_labels(tmp_path: Path) -> None:
    """A classifier of a million labels had every one rendered on the event loop for each page and each
    TEI /info: probes waited 41 s, pages answered 500 on MemoryError (outside attack rt12 F8)."""
    from onnxserve.server.web import overview

    labels = {i: f"label-{i}" for i in range(overview.SHOWN_LABELS + 4000)}
    classifier_folder(tmp_path / "many" / "1", labels)
    path = tmp_path / "many" / "1" / "model.onnx"
    model = onnx.load(path)
    model.doc_string = "d" * (overview.SHOWN_DOC_CHARACTERS + 500)
    helper.set_model_props(model, {f"key{i}": "v" * 2000 for i in range(overview.SHOWN_PROPERTIES + 100)})
    onnx.save(model, path)
    config = parse_config({"model_config_list": [{"name": "many", "base_path": "many"}]}, "labels", tmp_path)
    server = start_in_background(config, ServerSettings(http_port=0, grpc_port=0, log_level="warning"))
    try:
        page_text = httpx.get(f"{server.http_url}/models/many/versions/1").text
        page = Page(page_text)
        (shown,) = [t for t in page.tables if t and t[0] == ["id", "label"]]
        assert shown[1:] == [[str(i), labels[i]] for i in range(overview.SHOWN_LABELS)]
        assert "and 4,000 more labels" in page_text
        assert "and 100 more properties" in page_text
        assert f"({overview.SHOWN_DOC_CHARACTERS + 500:,} characters)" in page_text
        assert "v" * 2000 not in page_text
        assert len(page_text) < 1_000_000
        answers = [httpx.get(f"{server.http_url}/info", headers={"X-Model": "many"}) for _ in range(2)]
        assert answers[0].content == answers[1].content
        classifier = answers[0].json()["model_type"]["classifier"]
        assert classifier["id2label"] == {str(i): v for i, v in labels.items()}
        assert classifier["label2id"] == {v: i for i, v in labels.items()}
    finally:
        server.stop()
