"""Answers much larger ENCODED than their tensors (outside red team, F2/F3/F5).

The output limit was checked on the tensors; the encodings then grew them: TF Serving's row form made a
Python dict per row (16 M rows of two UINT8 outputs: +1 GB, then SIGSEGV), a NaN/Infinity answer went
through ``json.dumps(tolist())`` (3.2 s holding the interpreter for 64 MB), and a typed gRPC answer of
negative INT8 is ten times its tensor in protobuf varints (built for 4 s before its size was checked).
Now the encoded size is what ``--max-response-bytes`` counts: bounded from the shapes (JSON) or computed
exactly (protobuf) before the answer is built, and JSON answers are written in bounded slices.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import orjson
import pytest
import requests
from harness import CappedServer, fill_request, model_infer, serve_capped
from onnx import TensorProto, helper, numpy_helper
from watch import Watch

LIMIT = 8 * 1024 * 1024  # --max-response-bytes for these tests: small, so each attack takes a second or two
CAP = 4 * 1024**3
GROWTH_BOUND = 400 * 1024**2  # peak RSS above the server's RSS when the attack started
PROBE_BOUND = 1.0


def _filled(name: str, outputs: dict[str, tuple[int, float]]) -> onnx.ModelProto:
    """``n`` (INT64 [1]) -> each output a vector of ``n`` copies of one value (ConstantOfShape)."""
    nodes, infos = [], []
    for output, (elem_type, value) in outputs.items():
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        fill = numpy_helper.from_array(np.array([value], dtype=dtype))
        nodes.append(helper.make_node("ConstantOfShape", ["n"], [output], value=fill))
        infos.append(helper.make_tensor_value_info(output, elem_type, ["m"]))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("n", TensorProto.INT64, [1])], infos)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _text_tile() -> onnx.ModelProto:
    """``s`` (BYTES [1]) tiled ``r`` (INT64 [1]) times: the red team's V2 model."""
    inputs = [
        helper.make_tensor_value_info("s", TensorProto.STRING, [1]),
        helper.make_tensor_value_info("r", TensorProto.INT64, [1]),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.STRING, ["m"])
    graph = helper.make_graph([helper.make_node("Tile", ["s", "r"], ["y"])], "text_tile", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root: Path = tmp_path_factory.mktemp("encoded")
    models = {
        "two_rows": _filled("two_rows", {"a": (TensorProto.UINT8, 1), "b": (TensorProto.UINT8, 255)}),
        "minus_inf": _filled("minus_inf", {"y": (TensorProto.FLOAT, -np.inf)}),
        "minus_one": _filled("minus_one", {"y": (TensorProto.INT8, -1)}),
        "text_tile": _text_tile(),
    }
    for name, model in models.items():
        folder = root / name / "1"
        folder.mkdir(parents=True)
        onnx.save(model, folder / "model.onnx")
    with serve_capped(root, "--max-response-bytes", str(LIMIT), cap_bytes=CAP) as running:
        yield running


def _predict(server: CappedServer, model: str, doc: object) -> requests.Response:
    return requests.post(f"{server.http_url}/v1/models/{model}:predict", json=doc, timeout=120)


def _assert_held(server: CappedServer, watch: Watch, started_rss: int) -> None:
    assert server.alive(), server.log()[-3000:]
    assert not watch.failures, watch.failures
    assert watch.worst_probe < PROBE_BOUND
    assert watch.peak_rss - started_rss < GROWTH_BOUND, (watch.peak_rss, started_rss)
    normal = _predict(server, "two_rows", {"instances": [2]})
    assert normal.status_code == 200, normal.text
    assert normal.json() == {"predictions": [{"a": 1, "b": 255}, {"a": 1, "b": 255}]}


def _refused(response: requests.Response, encoding: str) -> None:
    assert response.status_code == 400, response.text[:300]
    message = response.json()["error"]
    assert f"encoded {encoding}, above the limit of {LIMIT} bytes (--max-response-bytes)" in message


def test_row_form_answers_are_refused_at_their_json_size_without_a_dict_per_row(server: CappedServer) -> None:
    rows = 4_000_000  # 8 MB of tensors (under the limit), ~64 MB of rows {"a":1,"b":255}
    started = server.rss_bytes()
    with Watch(server) as watch:
        _refused(_predict(server, "two_rows", {"instances": [rows]}), "as TF Serving JSON")
    _assert_held(server, watch, started)


def test_row_form_answers_under_the_limit_are_written_in_slices_as_before(server: CappedServer) -> None:
    rows = 400_000  # ~6 MB of JSON: many slices
    started = server.rss_bytes()
    with Watch(server) as watch:
        response = _predict(server, "two_rows", {"instances": [rows]})
    assert response.status_code == 200, response.text[:300]
    assert response.content == b'{"predictions":[' + b",".join([b'{"a":1,"b":255}'] * rows) + b"]}"
    _assert_held(server, watch, started)


def test_infinity_answers_are_written_in_slices_and_stopped_at_the_limit(server: CappedServer) -> None:
    started = server.rss_bytes()
    with Watch(server) as watch:
        small = _predict(server, "minus_inf", {"inputs": [300_000]})  # 3 MB of "-Infinity,"
        assert small.status_code == 200, small.text[:300]
        assert small.content == b'{"outputs":[' + b",".join([b"-Infinity"] * 300_000) + b"]}"
        # 8 MB of tensor, 20 MB of text: refused once the text passes the limit, a slice at a time
        _refused(_predict(server, "minus_inf", {"inputs": [2_000_000]}), "as TF Serving JSON")
        # three at once
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _predict(server, "minus_inf", {"inputs": [2_000_000]}), range(3)))
        for answer in answers:
            _refused(answer, "as TF Serving JSON")
    _assert_held(server, watch, started)


def test_typed_grpc_answers_are_refused_at_their_protobuf_size_before_they_are_built(server: CappedServer) -> None:
    n = 6_000_000  # 6 MB of INT8 -1: 60 MB of 10-byte varints
    started = server.rss_bytes()
    with Watch(server) as watch:
        with pytest.raises(grpc.RpcError) as refused:
            model_infer(server.grpc_target, fill_request(n, "minus_one"))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        said = re.search(r"would be (\d+) bytes encoded as gRPC protobuf", refused.value.details() or "")
        assert said is not None, refused.value.details()
        assert int(said.group(1)) == 10 * n  # exactly: a 10-byte varint per element
        answer = model_infer(server.grpc_target, fill_request(500_000, "minus_one"))  # 5 MB on the wire
    assert list(answer.outputs[0].contents.int_contents) == [-1] * 500_000
    assert answer.ByteSize() <= LIMIT
    _assert_held(server, watch, started)


def _tile(server: CappedServer, text: str, copies: int) -> requests.Response:
    inputs = [
        {"name": "s", "shape": [1], "datatype": "BYTES", "data": [text]},
        {"name": "r", "shape": [1], "datatype": "INT64", "data": [copies]},
    ]
    return requests.post(f"{server.http_url}/v2/models/text_tile/infer", json={"inputs": inputs}, timeout=120)


def test_v2_text_answers_are_refused_at_their_json_size_before_they_are_encoded(server: CappedServer) -> None:
    # 7 MB of control characters (under the limit as tensors), 42 MB of "\u0001" escapes each: four at once
    # used to be encoded in full (peak RSS gigabytes with the red team's sizes), then counted.
    copies, text = 7_000, "\x01" * 1000
    started = server.rss_bytes()
    with Watch(server) as watch, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _tile(server, text, copies), range(4)))
    head = b'{"model_name":"text_tile","model_version":"1","outputs":[{"name":"y","datatype":"BYTES","shape":[7000],'
    exact = len(head + b'"data":[]}]}') + copies * len('"' + 1000 * "\\u0001" + '"') + copies - 1
    for answer in answers:
        _refused(answer, "as KServe V2 JSON")
        said = re.search(r"would be (\d+) bytes encoded", answer.json()["error"])
        assert said is not None, answer.json()["error"]
        assert int(said.group(1)) == exact  # the JSON's exact size, counted from the bytes
    _assert_held(server, watch, started)
    # ONNX Runtime's strings and their Python objects per request, not the 42 MB texts they would make.
    assert watch.peak_rss - started < 4 * 42 * 1000**2, (watch.peak_rss, started)


def test_v2_text_answers_under_the_limit_are_written_as_before(server: CappedServer) -> None:
    text = 'a\x01"\\\n\u00e9\u2028'
    response = _tile(server, text, 1000)
    assert response.status_code == 200, response.text[:300]
    output = {"name": "y", "datatype": "BYTES", "shape": [1000], "data": [text] * 1000}
    assert response.content == orjson.dumps({"model_name": "text_tile", "model_version": "1", "outputs": [output]})
