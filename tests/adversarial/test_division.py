"""An integer division a client can steer: ONNX Runtime's int32/int64 ``Div`` kernel divides with the
processor's instruction, which traps on INT_MIN / -1 (SIGFPE, the process died, exit 136, on every
protocol). Served models now have every such division guarded (``core.division_guard``): INT_MIN / -1
answers INT_MIN, the two's-complement wrap, and the server keeps serving. Division by zero was already
refused by ONNX Runtime and still is, with a 400.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from harness import CappedServer, model_infer, serve_capped

from models import (
    always_min_by_minus_one,
    division_guard_evasions,
    integer_division_models,
    truncated_quotients,
    write_version,
)
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

CAP = 3 * 1024**3
MIN64 = -(2**63)
MIN32 = -(2**31)
DIVIDENDS = [MIN64, MIN64, 7, -7, 9, MIN64 + 1, 2**63 - 1]
DIVISORS = [-1, 2, 2, 2, -3, -1, -1]
INT64_MODELS = ["div64", "div_if", "div_loop", "div_function"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root: Path = tmp_path_factory.mktemp("division")
    for name, model in {**integer_division_models(), **division_guard_evasions()}.items():
        write_version(root, name, 1, model)
    write_version(root, "always_min", 1, always_min_by_minus_one())
    with serve_capped(root, cap_bytes=CAP) as running:
        yield running


def _v2(server: CappedServer, model: str, datatype: str, a: list[int], b: list[int]) -> requests.Response:
    inputs = [{"name": n, "shape": [len(v)], "datatype": datatype, "data": v} for n, v in (("a", a), ("b", b))]
    return requests.post(f"{server.http_url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=30)


@pytest.mark.parametrize("model", INT64_MODELS)
def test_int64_min_by_minus_one_wraps_over_v2_rest(server: CappedServer, model: str) -> None:
    response = _v2(server, model, "INT64", DIVIDENDS, DIVISORS)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["outputs"][0]["data"] == truncated_quotients(DIVIDENDS, DIVISORS, 64)
    assert response.json()["outputs"][0]["data"][0] == MIN64
    assert server.alive()
    assert server.probe_seconds() < 1


def test_int32_min_by_minus_one_wraps_over_v2_rest(server: CappedServer) -> None:
    a, b = [MIN32, MIN32, 7, -9], [-1, 1, -2, 4]
    response = _v2(server, "div32", "INT32", a, b)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["outputs"][0]["data"] == truncated_quotients(a, b, 32) == [MIN32, MIN32, -3, -2]
    assert server.alive()


def test_min_by_minus_one_wraps_over_tf_serving(server: CappedServer) -> None:
    for model in INT64_MODELS:
        response = requests.post(
            f"{server.http_url}/v1/models/{model}:predict",
            json={"instances": [{"a": MIN64, "b": -1}, {"a": 7, "b": -2}]},
            timeout=30,
        )
        assert response.status_code == 200, (model, response.text[:300])
        assert response.json()["predictions"] == truncated_quotients([MIN64, 7], [-1, -2], 64)
    assert server.alive()


def test_min_by_minus_one_wraps_over_grpc(server: CappedServer) -> None:
    request = pb.ModelInferRequest(model_name="div32")
    request.inputs.add(name="a", datatype="INT32", shape=[2]).contents.int_contents.extend([MIN32, 5])
    request.inputs.add(name="b", datatype="INT32", shape=[2]).contents.int_contents.extend([-1, -1])
    answer = model_infer(server.grpc_target, request)
    values = list(answer.outputs[0].contents.int_contents)  # typed contents asked, typed contents answered
    assert values == truncated_quotients([MIN32, 5], [-1, -1], 32) == [MIN32, -5]
    for model in INT64_MODELS:
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="a", datatype="INT64", shape=[1]).contents.int64_contents.append(MIN64)
        request.inputs.add(name="b", datatype="INT64", shape=[1]).contents.int64_contents.append(-1)
        answer = model_infer(server.grpc_target, request)
        assert list(answer.outputs[0].contents.int64_contents) == [MIN64], model
    assert server.alive()


def test_division_by_zero_is_still_refused_and_the_server_keeps_serving(server: CappedServer) -> None:
    for model in INT64_MODELS:
        response = _v2(server, model, "INT64", [MIN64, 1], [-1, 0])
        assert response.status_code == 400, (model, response.text[:300])
        assert "division by zero" in response.json()["error"]
    request = pb.ModelInferRequest(model_name="div32")
    request.inputs.add(name="a", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    request.inputs.add(name="b", datatype="INT32", shape=[1]).contents.int_contents.append(0)
    with pytest.raises(grpc.RpcError) as refused:
        model_infer(server.grpc_target, request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    response = _v2(server, "div64", "INT64", [9], [-3])
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == [-3]
    assert server.alive()
    assert server.probe_seconds() < 1


@pytest.mark.parametrize("model", sorted(division_guard_evasions()))
def test_divisions_hidden_from_the_guard_still_wrap(server: CappedServer, model: str) -> None:
    # A red team's models: the divisor named like another If branch's constant 2 (sibconst) or declared
    # float there (sibtype), a Loop body's names declared float by the main graph (outervi), operands of
    # com.microsoft::Range that shape inference cannot type (msrange, guarded for any type). Each used to
    # be served unguarded, and one request ended the server.
    for a, b in ((MIN64, -1), (7, -2), (MIN64 + 1, -1)):
        inputs = [{"name": n, "shape": [1], "datatype": "INT64", "data": [v]} for n, v in (("a", a), ("b", b))]
        if model.startswith("sib"):
            inputs.append({"name": "c", "shape": [], "datatype": "BOOL", "data": [True]})
        response = requests.post(f"{server.http_url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=30)
        assert response.status_code == 200, (model, response.text[:300])
        assert response.json()["outputs"][0]["data"] == truncated_quotients([a], [b], 64), model
        assert server.alive()
    assert server.probe_seconds() < 1


def test_the_web_diff_runs_the_guarded_model_too(server: CappedServer) -> None:
    """The web page's diff runs both versions on sample inputs in the server's process: unguarded, one GET
    of a model whose division always traps ended the server (SIGFPE, exit 136; an outside attack)."""
    response = requests.get(
        f"{server.http_url}/web/api/models/always_min/diff", params={"a": "1", "b": "1"}, timeout=60
    )
    assert response.status_code == 200, response.text[:300]
    numeric = response.json()["diff"]["numeric"]
    assert numeric["ran"] is True, numeric
    assert server.alive()
    served = requests.post(
        f"{server.http_url}/v2/models/always_min/infer",
        json={"inputs": [{"name": "x", "shape": [2], "datatype": "INT64", "data": [3, 4]}]},
        timeout=30,
    )
    assert served.status_code == 200
    assert served.json()["outputs"][0]["data"] == [MIN64, MIN64]
