"""TensorFlow Serving REST (v1), spoken by hand with httpx against a real server on a loopback port.

Covers model status, metadata and predict on the plain, ``/versions/{v}`` and ``/labels/{label}``
paths; the row (``instances``) and columnar (``inputs``) forms for one-input and multi-input models,
``{"b64": ...}`` strings and NaN / Infinity tokens, with results checked against ONNX Runtime run
in-process on the same inputs; and every kind of bad request (each must answer ``{"error": ...}``
with 400 or 404 naming what is wrong, and leave the server serving).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

import models
from error_documents import assert_error
from models import add_arrays, fixed_array, mixed_arrays
from onnxserve.config import ServerConfig, parse_config
from onnxserve.server.lifecycle import RunningServer

Array = npt.NDArray[Any]
StartServer = Callable[[ServerConfig], RunningServer]


def tripled_model() -> onnx.ModelProto:
    """Same signature as ``fixed`` (FP32 [2, 3] -> [2, 3]) but scaled by 3: a distinguishable version 2."""
    return models.parse(
        """
        fixed (float[2, 3] x) => (float[2, 3] y) {
            three = Constant <value = float[1] {3.0}> ()
            y = Mul(x, three)
        }
        """
    )


MODEL_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {**models.NUMERIC_MODELS, "tripled": tripled_model}

# The test's own vocabulary (independent of onnxserve's): ONNX element type -> TF DataType name, numpy dtype.
ONNX_TF: dict[int, tuple[str, Any]] = {
    onnx.TensorProto.FLOAT: ("DT_FLOAT", np.float32),
    onnx.TensorProto.DOUBLE: ("DT_DOUBLE", np.float64),
    onnx.TensorProto.FLOAT16: ("DT_HALF", np.float16),
    onnx.TensorProto.INT64: ("DT_INT64", np.int64),
    onnx.TensorProto.INT8: ("DT_INT8", np.int8),
    onnx.TensorProto.UINT8: ("DT_UINT8", np.uint8),
    onnx.TensorProto.BOOL: ("DT_BOOL", np.bool_),
    onnx.TensorProto.STRING: ("DT_STRING", np.object_),
}


# --- in-process reference ------------------------------------------------------------------------


@cache
def reference_session(model: str) -> ort.InferenceSession:
    proto = MODEL_BUILDERS[model]()
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def reference(model: str, feeds: Mapping[str, Array]) -> dict[str, Array]:
    """Every output of ``model`` run by ONNX Runtime in this process (BYTES as ``str`` objects)."""
    session = reference_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def output_dtypes(model: str) -> dict[str, Any]:
    return {v.name: ONNX_TF[v.type.tensor_type.elem_type][1] for v in MODEL_BUILDERS[model]().graph.output}


def graph_signature(model: str, which: str) -> dict[str, Any]:
    """TF Serving TensorInfo for each input or output, computed from the ONNX graph."""
    graph = MODEL_BUILDERS[model]().graph
    out = {}
    for value in graph.input if which == "inputs" else graph.output:
        tensor_type = value.type.tensor_type
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in tensor_type.shape.dim]
        out[value.name] = {
            "dtype": ONNX_TF[tensor_type.elem_type][0],
            "tensor_shape": {"dim": [{"size": d, "name": ""} for d in dims], "unknown_rank": False},
            "name": value.name,
        }
    return out


def assert_matches(model: str, got: Mapping[str, Any], expected: Mapping[str, Array]) -> None:
    """JSON values from the server, read as each output's dtype, equal the reference arrays."""
    dtypes = output_dtypes(model)
    assert set(got) == set(expected)
    for name, want in expected.items():
        if want.dtype == np.object_:
            assert np.array(got[name], dtype=object).tolist() == want.tolist(), name
            continue
        have = np.array(got[name], dtype=dtypes[name])
        assert have.shape == want.shape, name
        np.testing.assert_array_equal(have, want, err_msg=name)


def rows_to_columns(predictions: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Row-form predictions with several outputs, regrouped per output."""
    assert all(isinstance(row, dict) for row in predictions)
    return {name: [row[name] for row in predictions] for name in predictions[0]}


# --- wire helpers ----------------------------------------------------------------------------------


def post(client: httpx.Client, path: str, doc: Any) -> httpx.Response:
    """POST ``doc`` as JSON (Python's encoder writes NaN / Infinity tokens); bytes are sent as they are."""
    content = doc if isinstance(doc, bytes) else json.dumps(doc).encode("utf-8")
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def predict_ok(client: httpx.Client, path: str, doc: Any) -> Any:
    response = post(client, path, doc)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def columns(arrays: Mapping[str, Array]) -> dict[str, Any]:
    return {name: array.tolist() for name, array in arrays.items()}


def instances(arrays: Mapping[str, Array]) -> list[dict[str, Any]]:
    batch = len(next(iter(arrays.values())))
    return [{name: array[i].tolist() for name, array in arrays.items()} for i in range(batch)]


def check_good_request(client: httpx.Client) -> None:
    """A valid request answers 200 with the right values (the server still serves after an error)."""
    x = fixed_array(seed=99)
    doc = predict_ok(client, "/v1/models/fixed:predict", {"inputs": x.tolist()})
    assert_matches("fixed", {"y": doc["outputs"]}, reference("fixed", {"x": x}))


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(numeric_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=numeric_server.http_url, timeout=60) as c:
        yield c


@pytest.fixture
def labelled_client(start_server: StartServer, tmp_path: Path) -> Iterator[httpx.Client]:
    """A server with versions 1 (``fixed``, x2) and 2 (``tripled``, x3) of model "scaled", labelled."""
    models.write_version(tmp_path, "scaled", 1, models.fixed_model())
    models.write_version(tmp_path, "scaled", 2, tripled_model())
    document = {
        "model_config_list": [
            {
                "name": "scaled",
                "base_path": "scaled",
                "model_version_policy": {"all": {}},
                "version_labels": {"stable": 1, "canary": 2},
            }
        ]
    }
    server = start_server(parse_config(document, "labels test config", tmp_path))
    with httpx.Client(base_url=server.http_url, timeout=60) as c:
        yield c


# --- status and metadata ---------------------------------------------------------------------------


def available(version: str) -> dict[str, Any]:
    return {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


@pytest.mark.parametrize("model", ["add", "mixed", "fixed", "strings"])
@pytest.mark.parametrize("suffix", ["", "/versions/1"], ids=["default", "v1"])
def test_model_status(client: httpx.Client, model: str, suffix: str) -> None:
    response = client.get(f"/v1/models/{model}{suffix}")
    assert response.status_code == 200, response.text
    assert response.json() == {"model_version_status": [available("1")]}


@pytest.mark.parametrize("model", ["add", "mixed", "fixed", "strings"])
@pytest.mark.parametrize("suffix", ["", "/versions/1"], ids=["default", "v1"])
def test_model_metadata_matches_graph(client: httpx.Client, model: str, suffix: str) -> None:
    response = client.get(f"/v1/models/{model}{suffix}/metadata")
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["model_spec"] == {"name": model, "signature_name": "serving_default", "version": "1"}
    signature = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"] == graph_signature(model, "inputs")
    assert signature["outputs"] == graph_signature(model, "outputs")


def test_model_metadata_spelled_out(client: httpx.Client) -> None:
    """The graph-derived comparison above, pinned for a few tensors so a shared mistake shows."""
    add = client.get("/v1/models/add/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert add["serving_default"]["inputs"]["a"] == {
        "dtype": "DT_FLOAT",
        "tensor_shape": {"dim": [{"size": "-1", "name": ""}, {"size": "16", "name": ""}], "unknown_rank": False},
        "name": "a",
    }
    mixed = client.get("/v1/models/mixed/metadata").json()["metadata"]["signature_def"]["signature_def"]
    dtypes = [t["dtype"] for t in mixed["serving_default"]["inputs"].values()]
    assert dtypes == ["DT_INT64", "DT_BOOL", "DT_HALF", "DT_UINT8", "DT_INT8", "DT_DOUBLE"]
    strings = client.get("/v1/models/strings/metadata").json()["metadata"]["signature_def"]["signature_def"]
    assert strings["serving_default"]["inputs"]["text"]["dtype"] == "DT_STRING"
    assert strings["serving_default"]["outputs"]["count"]["tensor_shape"]["dim"] == [{"size": "1", "name": ""}]


# --- predict: one-input models -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/versions/1"], ids=["default", "v1"])
def test_predict_fixed_row_form(client: httpx.Client, suffix: str) -> None:
    x = fixed_array(seed=1)
    doc = predict_ok(client, f"/v1/models/fixed{suffix}:predict", {"instances": x.tolist()})
    assert set(doc) == {"predictions"}
    assert len(doc["predictions"]) == 2  # one prediction per instance
    assert_matches("fixed", {"y": doc["predictions"]}, reference("fixed", {"x": x}))


def test_predict_fixed_row_form_with_named_instances(client: httpx.Client) -> None:
    x = fixed_array(seed=2)
    body = {"signature_name": "serving_default", "instances": instances({"x": x})}
    doc = predict_ok(client, "/v1/models/fixed:predict", body)
    assert_matches("fixed", {"y": doc["predictions"]}, reference("fixed", {"x": x}))


@pytest.mark.parametrize("named", [False, True], ids=["bare", "named"])
def test_predict_fixed_columnar_form(client: httpx.Client, named: bool) -> None:
    x = fixed_array(seed=3)
    body = {"inputs": {"x": x.tolist()} if named else x.tolist()}
    doc = predict_ok(client, "/v1/models/fixed:predict", body)
    assert set(doc) == {"outputs"}
    assert isinstance(doc["outputs"], list), "one output: a bare value, not an object"
    assert_matches("fixed", {"y": doc["outputs"]}, reference("fixed", {"x": x}))


def test_predict_nan_and_infinity_tokens(client: httpx.Client) -> None:
    x = np.array([[math.nan, math.inf, -math.inf], [1.5, -2.0, 0.0]], dtype=np.float32)
    response = post(client, "/v1/models/fixed:predict", {"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    assert b"NaN" in response.content
    assert b"-Infinity" in response.content
    assert_matches("fixed", {"y": response.json()["outputs"]}, reference("fixed", {"x": x}))


def test_predict_strings_columnar_with_b64(client: httpx.Client) -> None:
    texts = ["plain", "héllo wörld", "", "b64 ✓"]
    wire: list[Any] = [texts[0], texts[1], {"b64": base64.b64encode(b"").decode()}]
    wire.append({"b64": base64.b64encode(texts[3].encode("utf-8")).decode()})
    doc = predict_ok(client, "/v1/models/strings:predict", {"inputs": wire})
    assert set(doc["outputs"]) == {"echo", "count"}
    assert_matches("strings", doc["outputs"], reference("strings", {"text": np.array(texts, dtype=object)}))


def test_predict_strings_row_form(client: httpx.Client) -> None:
    """One instance: every output (echo [n], count [1]) has one row, so the row form can answer."""
    doc = predict_ok(client, "/v1/models/strings:predict", {"instances": [{"b64": base64.b64encode(b"hi").decode()}]})
    expected = reference("strings", {"text": np.array(["hi"], dtype=object)})
    assert doc["predictions"] == [{"echo": expected["echo"][0], "count": int(expected["count"][0])}]


# --- predict: multi-input models -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/versions/1"], ids=["default", "v1"])
def test_predict_add_row_form(client: httpx.Client, suffix: str) -> None:
    arrays = add_arrays(batch=3, seed=4)
    doc = predict_ok(client, f"/v1/models/add{suffix}:predict", {"instances": instances(arrays)})
    assert len(doc["predictions"]) == 3
    assert_matches("add", rows_to_columns(doc["predictions"]), reference("add", arrays))


def test_predict_add_columnar_form(client: httpx.Client) -> None:
    arrays = add_arrays(batch=5, seed=5)
    doc = predict_ok(client, "/v1/models/add:predict", {"inputs": columns(arrays)})
    assert_matches("add", doc["outputs"], reference("add", arrays))


def test_predict_mixed_row_form(client: httpx.Client) -> None:
    arrays = mixed_arrays(seed=6)
    doc = predict_ok(client, "/v1/models/mixed:predict", {"instances": instances(arrays)})
    assert len(doc["predictions"]) == 4
    assert_matches("mixed", rows_to_columns(doc["predictions"]), reference("mixed", arrays))


def test_predict_mixed_columnar_form(client: httpx.Client) -> None:
    arrays = mixed_arrays(seed=7)
    doc = predict_ok(client, "/v1/models/mixed:predict", {"inputs": columns(arrays)})
    assert_matches("mixed", doc["outputs"], reference("mixed", arrays))
    assert doc["outputs"]["ids_x3"][0] == (2**61 + 1) * 3, "INT64 beyond 2**53 survives exactly"


# --- versions and labels ---------------------------------------------------------------------------------


def test_labels_status_metadata_and_predict(labelled_client: httpx.Client) -> None:
    client = labelled_client
    plain = client.get("/v1/models/scaled")
    assert plain.status_code == 200, plain.text
    assert sorted(plain.json()["model_version_status"], key=lambda s: s["version"]) == [available("1"), available("2")]
    for label, version in (("stable", "1"), ("canary", "2")):
        status = client.get(f"/v1/models/scaled/labels/{label}")
        assert status.status_code == 200, status.text
        assert status.json() == {"model_version_status": [available(version)]}
        meta = client.get(f"/v1/models/scaled/labels/{label}/metadata")
        assert meta.status_code == 200, meta.text
        assert meta.json()["model_spec"]["version"] == version
    assert client.get("/v1/models/scaled/metadata").json()["model_spec"]["version"] == "2"

    x = fixed_array(seed=8)
    expected = {"fixed": reference("fixed", {"x": x}), "tripled": reference("tripled", {"x": x})}
    for path, model in (
        ("/v1/models/scaled/labels/stable", "fixed"),
        ("/v1/models/scaled/versions/1", "fixed"),
        ("/v1/models/scaled/labels/canary", "tripled"),
        ("/v1/models/scaled/versions/2", "tripled"),
        ("/v1/models/scaled", "tripled"),  # the default is the highest version
    ):
        doc = predict_ok(client, f"{path}:predict", {"instances": x.tolist()})
        assert_matches(model, {"y": doc["predictions"]}, expected[model])

    for path in ("/v1/models/scaled/labels/nightly", "/v1/models/scaled/labels/nightly/metadata"):
        assert_error(client.get(path), 404, "nightly")
    assert_error(post(client, "/v1/models/scaled/labels/nightly:predict", {"inputs": x.tolist()}), 404, "nightly")
    assert_error(client.get("/v1/models/scaled/labels/1"), 404, "label")
    assert_error(client.get("/v1/models/scaled/versions/3"), 404, "version 3")
    doc = predict_ok(client, "/v1/models/scaled/labels/stable:predict", {"inputs": x.tolist()})
    assert_matches("fixed", {"y": doc["outputs"]}, expected["fixed"])


# --- bad requests --------------------------------------------------------------------------------------


def _add_row() -> list[float]:
    return [0.5] * 16


def _mixed_columns(**override: Any) -> dict[str, Any]:
    return {"inputs": {**columns(mixed_arrays()), **override}}


BAD_REQUESTS: list[tuple[str, str, Any, tuple[str, ...]]] = [
    ("malformed-json", "add", b'{"inputs": [1, 2', ("not valid JSON",)),
    ("empty-body", "add", b"", ("empty",)),
    ("not-utf8", "add", b'{"inputs": "\xff\xfe"}', ("JSON",)),
    ("not-an-object", "add", [1, 2], ("JSON object",)),
    ("both-forms", "add", {"instances": [{"a": _add_row(), "b": _add_row()}], "inputs": {}}, ("both", "give one")),
    ("neither-form", "add", {"signature_name": "serving_default"}, ("instances", "inputs")),
    ("unknown-key", "add", {"inputs": {"a": [_add_row()], "b": [_add_row()]}, "input": 1}, ("unknown key", "'input'")),
    (
        "signature",
        "add",
        {"signature_name": "classify_x", "inputs": {}},
        ("signature", "classify_x", "serving_default"),
    ),
    ("unknown-input", "add", {"inputs": {"a": [_add_row()], "c": [_add_row()]}}, ("unknown input", "'c'", "'b'")),
    ("unknown-input-row", "add", {"instances": [{"a": _add_row(), "zz": _add_row()}]}, ("unknown input", "'zz'")),
    ("missing-input", "add", {"inputs": {"a": [_add_row()]}}, ("missing", "'b'")),
    ("bare-value-multi-input", "add", {"inputs": [_add_row()]}, ("2 inputs", "object")),
    ("bare-rows-multi-input", "add", {"instances": [_add_row()]}, ("2 inputs", "object")),
    (
        "rows-name-other-inputs",
        "add",
        {"instances": [{"a": _add_row(), "b": _add_row()}, {"a": _add_row()}]},
        ("instance 1", "same inputs"),
    ),
    ("row-not-object", "add", {"instances": [{"a": _add_row(), "b": _add_row()}, [1.0]]}, ("instance 1", "object")),
    (
        "ragged-rows",
        "add",
        {"instances": [{"a": _add_row(), "b": _add_row()}, {"a": [0.5] * 15, "b": _add_row()}]},
        ("'a'", "evenly nested"),
    ),
    ("ragged-instances", "fixed", {"instances": [[1.0, 2.0, 3.0], [4.0, 5.0]]}, ("'x'", "evenly nested")),
    ("empty-instances", "fixed", {"instances": []}, ("instances", "non-empty")),
    ("instances-not-list", "fixed", {"instances": {"x": 1.0}}, ("instances", "list")),
    # Text is passed on as BYTES (a model with a tokenizer would tokenize it); this one refuses it.
    ("strings-for-float", "fixed", {"inputs": [["a", "b", "c"], ["d", "e", "f"]]}, ("'x'", "BYTES", "FP32")),
    ("b64-for-float", "fixed", {"inputs": [[{"b64": "AAAA"}] * 3] * 2}, ("'x'", "BYTES", "FP32")),
    ("bools-for-float", "fixed", {"inputs": [[True, False, True]] * 2}, ("'x'", "FP32", "booleans")),
    ("null-for-float", "fixed", {"inputs": [[None, 1.0, 2.0]] * 2}, ("'x'", "non-numeric")),
    ("wrong-shape", "fixed", {"inputs": [[1.0, 2.0, 3.0]]}, ("'x'", "shape", "[2, 3]")),
    ("fraction-for-int64", "mixed", _mixed_columns(ids=[1.5, 2, 3, 4]), ("'ids'", "INT64", "integers")),
    ("too-big-for-int64", "mixed", _mixed_columns(ids=[-1, 2**63, 3, 4]), ("'ids'", "out of range")),
    ("out-of-range-uint8", "mixed", _mixed_columns(small=[0, 1, 2, 256]), ("'small'", "256", "UINT8")),
    ("numbers-for-bool", "mixed", _mixed_columns(flags=[1, 0, 0, 1]), ("'flags'", "BOOL", "booleans")),
    ("numbers-for-string", "strings", {"inputs": [1, 2]}, ("'text'", "BYTES", "number")),
    ("bad-base64", "strings", {"inputs": [{"b64": "%%not base64%%"}]}, ("'text'", "base64")),
    (
        "non-utf8-for-text-model",
        "strings",
        {"inputs": [{"b64": base64.b64encode(b"\xff\xfe").decode()}]},
        ("'text'", "UTF-8"),
    ),
    ("ragged-strings", "strings", {"inputs": [["a"], "b"]}, ("'text'", "evenly nested")),
    ("row-form-unequal-outputs", "strings", {"instances": ["a", "b"]}, ("'count'", "columnar")),
    ("classify", "add", {"examples": []}, (":classify", "text-classification", "not a text model", ":predict")),
    ("regress", "add", {"examples": []}, (":regress", "not supported", "regression", ":predict")),
]


@pytest.mark.parametrize(("model", "body", "words"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_400_and_server_keeps_serving(
    client: httpx.Client, model: str, body: Any, words: tuple[str, ...]
) -> None:
    verb = next((v for v in (":classify", ":regress") if v in words), ":predict")
    assert_error(post(client, f"/v1/models/{model}{verb}", body), 400, *words)
    check_good_request(client)


NOT_FOUND: list[tuple[str, str, tuple[str, ...]]] = [
    ("GET", "/v1/models/no_such_model", ("no_such_model",)),
    ("GET", "/v1/models/no_such_model/metadata", ("no_such_model",)),
    ("POST", "/v1/models/no_such_model:predict", ("no_such_model",)),
    ("POST", "/v1/models/no_such_model/versions/1:predict", ("no_such_model",)),
    ("POST", "/v1/models/no_such_model:classify", ("no_such_model",)),
    ("GET", "/v1/models/add/versions/7", ("'add'", "version 7")),
    ("GET", "/v1/models/add/versions/7/metadata", ("'add'", "version 7")),
    ("POST", "/v1/models/add/versions/7:predict", ("'add'", "version 7")),
    ("GET", "/v1/models/add/labels/stable", ("'add'", "stable")),
    ("GET", "/v1/models/add/labels/stable/metadata", ("'add'", "stable")),
    ("POST", "/v1/models/add/labels/stable:predict", ("'add'", "stable")),
    ("GET", "/v1/models/add/versions/latest", ("no such endpoint",)),
]


@pytest.mark.parametrize(("method", "path", "words"), NOT_FOUND, ids=[f"{m} {p}" for m, p, _ in NOT_FOUND])
def test_unknown_model_version_or_label_is_404(
    client: httpx.Client, method: str, path: str, words: tuple[str, ...]
) -> None:
    body = {"inputs": {"a": [_add_row()], "b": [_add_row()]}}
    response = post(client, path, body) if method == "POST" else client.get(path)
    assert_error(response, 404, *words)
    check_good_request(client)


def test_wrong_method_is_405(client: httpx.Client) -> None:
    assert_error(client.get("/v1/models/add:predict"), 405, "GET")
    check_good_request(client)
