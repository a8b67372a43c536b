"""Finding 2: outputs whose size is an input VALUE. One tiny request to ConstantOfShape / Expand / Tile /
Range / Loop fed by an INT64 input asked for 250 M floats; the unfixed server crashed (SIGSEGV) encoding
them under a 4 GB cap. Now every protocol refuses an answer above ``--max-response-bytes`` before
encoding it (400 / INVALID_ARGUMENT), an allocation that fails inside ONNX Runtime is the same refusal,
the memory the run took goes back to the system, and the next request is served.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import onnx
import pytest
import requests
from harness import CappedServer, fill_request, grpc_answer, model_infer, serve_capped
from onnx.parser import parse_model
from watch import Watch

from models import value_paced_model, value_sized_models, write_version
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

CAP = 4 * 1024**3  # the unfixed server dies under it on the first attack
RSS_BOUND = 1024**3  # what the server may hold after the attacks (it starts at ~130 MB)
PROBE_BOUND = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root: Path = tmp_path_factory.mktemp("value_sized")
    for name, model in {**value_sized_models(), **_shaped_models()}.items():
        write_version(root, name, 1, model)
    with serve_capped(root, cap_bytes=CAP) as running:
        yield running


def _shaped_models() -> dict[str, onnx.ModelProto]:
    """A BYTES output of ``n`` copies of the input text (Tile), and a float output of shape ``s``."""
    return {
        "text_tile": parse_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            text_tile (string[m] x, int64[1] n) => (string[k] y) {
                y = Tile(x, n)
            }
            """
        ),
        "noise": parse_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            noise (int64[1] n) => (float[m] y) {
                zeros = ConstantOfShape <value = float[1] {0.0}> (n)
                y = RandomUniformLike <seed = 1.0> (zeros)
            }
            """
        ),
        "shaped": parse_model(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            shaped (int64[r] s) => (float[a, b] y) {
                y = ConstantOfShape <value = float[1] {1.0}> (s)
            }
            """
        ),
    }


def _infer(server: CappedServer, model: str, n: int) -> requests.Response:
    body = {"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [n]}]}
    return requests.post(f"{server.http_url}/v2/models/{model}/infer", json=body, timeout=120)


def _assert_serving(server: CappedServer, prober: Watch) -> None:
    assert server.alive(), server.log()[-3000:]
    assert not prober.failures, prober.failures
    assert prober.worst_probe < PROBE_BOUND
    assert server.rss_bytes() < RSS_BOUND
    normal = _infer(server, "fill", 3)
    assert normal.status_code == 200, normal.text
    assert normal.json()["outputs"][0]["data"] == [1.0, 1.0, 1.0]


def test_an_87_byte_request_for_a_gigabyte_is_refused_before_encoding(server: CappedServer) -> None:
    with Watch(server) as prober:
        response = _infer(server, "fill", 250_000_000)
    assert response.status_code == 400
    message = response.json()["error"]
    assert "1000000000 bytes" in message
    assert "--max-response-bytes" in message
    _assert_serving(server, prober)


@pytest.mark.parametrize("model", ["fill", "expand", "tile", "range"])
def test_sizes_beyond_memory_are_refused_by_the_runtime_as_too_large(server: CappedServer, model: str) -> None:
    with Watch(server) as prober:
        for n in (2**40, 2**62):
            response = _infer(server, model, n)
            assert response.status_code == 400, response.text
            assert "could not allocate the memory these input values ask for" in response.json()["error"]
    _assert_serving(server, prober)


def test_a_loop_whose_trip_count_is_the_input_gives_its_memory_back(server: CappedServer) -> None:
    with Watch(server) as prober:
        response = _infer(server, "loop", 100_000)  # 100,000 rows of 4 KiB, built one iteration at a time
    assert response.status_code == 400
    assert "409600000 bytes" in response.json()["error"]
    _assert_serving(server, prober)


def test_binary_rest_grpc_and_tf_serving_refuse_the_same_way(server: CappedServer) -> None:
    n = 20_000_000  # 80 MB of FP32 output
    with Watch(server) as prober:
        header = b'{"inputs":[{"name":"n","shape":[1],"datatype":"INT64","parameters":{"binary_data_size":8}}],'
        header += b'"outputs":[{"name":"y","parameters":{"binary_data":true}}]}'
        binary = requests.post(
            f"{server.http_url}/v2/models/fill/infer",
            data=header + struct.pack("<q", n),
            headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
            timeout=60,
        )
        assert binary.status_code == 400
        assert "--max-response-bytes" in binary.json()["error"]

        tfs = requests.post(f"{server.http_url}/v1/models/fill:predict", json={"inputs": [n]}, timeout=60)
        assert tfs.status_code == 400
        assert "--max-response-bytes" in tfs.json()["error"]

        request = pb.ModelInferRequest(
            model_name="fill",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="n", datatype="INT64", shape=[1])],
            raw_input_contents=[struct.pack("<q", n)],
        )
        refused = _grpc_infer(server, request)
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-response-bytes" in (refused.details() or "")
    _assert_serving(server, prober)


def test_a_run_whose_length_is_an_input_value_is_stopped_at_the_request_timeout(tmp_path: Path) -> None:
    write_version(tmp_path, "paced", 1, value_paced_model("paced", 64))
    with serve_capped(tmp_path, "--request-timeout", "1", cap_bytes=CAP) as server, Watch(server) as watch:
        body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1e9]}]}  # 1e9 products
        started = time.monotonic()
        response = requests.post(f"{server.http_url}/v2/models/paced/infer", json=body, timeout=60)
        assert response.status_code == 504
        assert "time limit of 1000 ms" in response.json()["error"]
        assert time.monotonic() - started < 30
        body["inputs"][0]["data"] = [2.0]
        served = requests.post(f"{server.http_url}/v2/models/paced/infer", json=body, timeout=60)  # instance free
        assert served.status_code == 200, served.text
        assert served.json()["outputs"][0]["data"] == [2.0]
        assert server.alive()
    assert watch.worst_probe < PROBE_BOUND


def _grpc_infer(server: CappedServer, request: pb.ModelInferRequest) -> grpc.RpcError:
    """The error a ModelInfer call on a channel with grpc's default limits ends with."""
    refused = grpc_answer(server.grpc_target, request, options=())
    assert isinstance(refused, grpc.RpcError), refused
    return refused


def test_many_tiny_bytes_elements_are_refused_before_they_become_objects(server: CappedServer) -> None:
    # 2 M one-byte elements: 2 MB of text, far under the limit, but 2 M Python objects (60 M crashed it).
    body = {
        "inputs": [
            {"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]},
            {"name": "n", "shape": [1], "datatype": "INT64", "data": [2_000_000]},
        ]
    }
    with Watch(server) as prober:
        v2 = requests.post(f"{server.http_url}/v2/models/text_tile/infer", json=body, timeout=60)
        assert v2.status_code == 400, v2.text
        assert "2000000 BYTES elements, more than the 1048576" in v2.json()["error"]
        assert "--max-response-bytes" in v2.json()["error"]
        tfs = requests.post(
            f"{server.http_url}/v1/models/text_tile:predict",
            json={"inputs": {"x": ["a"], "n": [2_000_000]}},
            timeout=60,
        )
        assert tfs.status_code == 400, tfs.text
        assert "BYTES elements" in tfs.json()["error"]
        request = pb.ModelInferRequest(model_name="text_tile")
        request.inputs.add(name="x", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a")
        request.inputs.add(name="n", datatype="INT64", shape=[1]).contents.int64_contents.append(2_000_000)
        refused = _grpc_infer(server, request)
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "BYTES elements" in (refused.details() or "")
    _assert_serving(server, prober)
    small = dict(body, inputs=[body["inputs"][0], dict(body["inputs"][1], data=[3])])
    served = requests.post(f"{server.http_url}/v2/models/text_tile/infer", json=small, timeout=60)
    assert served.status_code == 200, served.text
    assert served.json()["outputs"][0]["data"] == ["a", "a", "a"]


def test_an_empty_output_with_an_absurd_dimension_is_refused_by_its_shape(server: CappedServer) -> None:
    body = {"inputs": [{"name": "s", "shape": [2], "datatype": "INT64", "data": [0, 2**62]}]}
    response = requests.post(f"{server.http_url}/v2/models/shaped/infer", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert f"has shape [0, {2**62}], larger than any answer can be" in response.json()["error"]
    body["inputs"][0]["data"] = [0, 5]  # an empty answer of an ordinary shape is an answer
    empty = requests.post(f"{server.http_url}/v2/models/shaped/infer", json=body, timeout=60)
    assert empty.status_code == 200, empty.text
    assert empty.json()["outputs"][0]["shape"] == [0, 5]


def test_a_kernel_that_fails_on_the_input_values_is_a_client_error_on_every_protocol(server: CappedServer) -> None:
    expected = "model fill/1 could not run on these input values"
    body = {"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [-1]}]}
    v2 = requests.post(f"{server.http_url}/v2/models/fill/infer", json=body, timeout=60)
    assert v2.status_code == 400, v2.text
    assert expected in v2.json()["error"]
    assert "must be >= 0" in v2.json()["error"]
    assert ".cc:" not in v2.json()["error"]
    tfs = requests.post(f"{server.http_url}/v1/models/fill:predict", json={"inputs": [-1]}, timeout=60)
    assert tfs.status_code == 400, tfs.text
    assert expected in tfs.json()["error"]
    request = pb.ModelInferRequest(model_name="fill")
    request.inputs.add(name="n", datatype="INT64", shape=[1]).contents.int64_contents.append(-1)
    refused = _grpc_infer(server, request)
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (refused.details() or "")
    assert server.alive()
    normal = _infer(server, "fill", 3)
    assert normal.status_code == 200, normal.text


def test_a_grpc_answer_exactly_at_the_response_limit_is_sent(server: CappedServer) -> None:
    n = 16 * 1024 * 1024  # FP32: exactly --max-response-bytes (64 MiB), plus the protobuf envelope
    response = model_infer(server.grpc_target, fill_request(n), timeout=120)
    assert list(response.outputs[0].shape) == [n]
    assert len(response.outputs[0].contents.fp32_contents) == n
    assert "ERROR" not in server.log()


def test_a_grpc_answer_above_the_message_limit_is_refused_without_an_error_in_the_log(tmp_path: Path) -> None:
    write_version(tmp_path, "fill", 1, value_sized_models()["fill"])
    with serve_capped(tmp_path, "--grpc-max-message-bytes", "1048576", cap_bytes=CAP) as small:
        request = pb.ModelInferRequest(model_name="fill")
        request.inputs.add(name="n", datatype="INT64", shape=[1]).contents.int64_contents.append(1_000_000)
        refused = _grpc_infer(small, request)  # 4 MB: under --max-response-bytes, over the gRPC message limit
        assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "--grpc-max-message-bytes" in (refused.details() or "")
        assert "Traceback" not in small.log(), small.log()[-3000:]
        assert " ERROR " not in small.log(), small.log()[-3000:]
        normal = requests.post(
            f"{small.http_url}/v2/models/fill/infer",
            json={"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [1_000_000]}]},
            timeout=60,
        )
        assert normal.status_code == 200


def test_large_json_answers_are_written_without_holding_the_probes(server: CappedServer) -> None:
    # 4 M random floats are ~45 MB of JSON (under the 64 MiB limit): written in one call of the encoder such
    # an answer held the interpreter for seconds; now its data is written a slice at a time. A 64 MiB tensor
    # (~180 MB of JSON) is refused once its text passes the limit.
    n = 4 * 1024 * 1024
    with Watch(server) as prober, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: _infer(server, "noise", n), range(3)))
        refused = _infer(server, "noise", 16 * 1024 * 1024)
    for answer in answers:
        assert answer.status_code in (200, 503), answer.text[:200]
    served = [a for a in answers if a.status_code == 200]
    assert served
    data = served[0].json()["outputs"][0]["data"]
    assert len(data) == n
    assert all(0.0 <= v < 1.0 for v in data[:1000])
    assert refused.status_code == 400, refused.text[:200]
    assert "more than 67108864 bytes encoded as KServe V2 JSON" in refused.json()["error"]
    del answers, served, data
    _assert_serving(server, prober)
