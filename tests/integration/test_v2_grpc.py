"""KServe V2 gRPC against a real server on a loopback port.

Three kinds of client: NVIDIA's ``tritonclient.grpc`` unmodified (health, metadata, configuration,
statistics, repository index, inference and the ModelStreamInfer stream); raw gRPC calls carrying
onnxserve's own generated messages (typed ``contents`` requests, answered typed, and raw requests,
answered raw); and hand-made bad requests, each of which must be refused with the right status code
and a message naming the problem while the server keeps serving. Every result is compared with ONNX
Runtime run in-process on the same inputs; the HTTP front end must agree with the gRPC one on both
results and error messages.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import models
import onnxserve
from models import add_arrays, fixed_array, mixed_arrays
from onnxserve.config import ServerConfig, parse_config
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from vocabulary import ONNX_V2, V2_NUMPY, decode_raw, encode_raw, v2_datatype

Array = npt.NDArray[Any]
Code = grpc.StatusCode

SERVICE = "/inference.GRPCInferenceService"
HEADER_LENGTH = "Inference-Header-Content-Length"
NUMERIC_MODELS = ("add", "mixed", "fixed", "strings", "slow")


def typed_model() -> onnx.ModelProto:
    """Every datatype that has a ``contents`` field (no FP16 input), plus one FP16 output."""
    model: onnx.ModelProto = models.parse(
        """
        typed (int64[n] ids, bool[n] flags, uint8[n] small, int8[n] signed, double[n] wide, float[n] single)
            => (int64[n] ids_x3, bool[n] not_flags, uint8[n] small_out, int8[n] signed_out, double[n] wide_neg,
                float[n] single_x2, float16[n] single_half) {
            three = Constant <value = int64[1] {3}> ()
            ids_x3 = Mul(ids, three)
            not_flags = Not(flags)
            small_out = Identity(small)
            signed_out = Identity(signed)
            wide_neg = Neg(wide)
            single_x2 = Add(single, single)
            single_half = Cast <to = 10> (single)
        }
        """
    )
    return model


MODEL_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {**models.NUMERIC_MODELS, "typed": typed_model}
TYPED_OUTPUTS_WITHOUT_FP16 = ("ids_x3", "not_flags", "small_out", "signed_out", "wide_neg", "single_x2")

CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# --- in-process reference ------------------------------------------------------------------------


@cache
def reference_session(model: str) -> ort.InferenceSession:
    proto = MODEL_BUILDERS[model]()
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def reference(model: str, feeds: Mapping[str, Array], outputs: Sequence[str] = ()) -> dict[str, Array]:
    """The outputs of ``model`` (all, or those named) run by ONNX Runtime here; BYTES as ``bytes``."""
    session = reference_session(model)
    ort_feeds = {
        name: (np.vectorize(_text, otypes=[object])(a) if a.dtype == np.object_ else a) for name, a in feeds.items()
    }
    names = list(outputs) or [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(names, ort_feeds), strict=True))
    return {n: (np.vectorize(_utf8, otypes=[object])(a) if a.dtype == np.object_ else a) for n, a in results.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _utf8(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def graph_tensors(model: str, which: str) -> list[tuple[str, str, list[int]]]:
    """(name, V2 datatype, shape) per tensor, from the ONNX graph: -1 for every dim not of fixed size."""
    graph = MODEL_BUILDERS[model]().graph
    out = []
    for value in graph.input if which == "inputs" else graph.output:
        tensor_type = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        out.append((value.name, ONNX_V2[tensor_type.elem_type], shape))
    return out


def assert_outputs_match(got: Mapping[str, Array], expected: Mapping[str, Array]) -> None:
    assert list(got) == list(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape, name
        assert have.dtype == want.dtype, name
        if want.dtype == np.object_:
            assert have.reshape(-1).tolist() == want.reshape(-1).tolist(), name
        else:
            np.testing.assert_array_equal(have, want, err_msg=name)


# --- inputs ----------------------------------------------------------------------------------------


def typed_arrays(seed: int = 0) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    mixed = mixed_arrays(seed)
    del mixed["half"]
    return {**mixed, "single": rng.standard_normal(4, dtype=np.float32)}


def strings_array() -> Array:
    return np.array(["héllo wörld", "日本語のテキスト", "", "emoji 🚀", "plain"], dtype=object)


# --- raw gRPC messages -----------------------------------------------------------------------------


def infer_request(
    model: str,
    feeds: Mapping[str, Array],
    *,
    raw: bool,
    outputs: Sequence[str] = (),
    request_id: str = "",
    version: str = "",
) -> pb.ModelInferRequest:
    """A ModelInfer request of ``feeds``, as raw contents (``raw``) or typed contents."""
    message = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in feeds.items():
        datatype = v2_datatype(array)
        tensor = message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            message.raw_input_contents.append(encode_raw(array))
        else:
            values = [_utf8(v) for v in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
            getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values)
    for name in outputs:
        message.outputs.add(name=name)
    return message


raw_request = partial(infer_request, raw=True)
typed_request = partial(infer_request, raw=False)


def response_arrays(response: pb.ModelInferResponse, *, raw: bool) -> dict[str, Array]:
    """The response's outputs, checking they travel raw (``raw``) or as typed contents."""
    out: dict[str, Array] = {}
    if raw:
        assert len(response.raw_output_contents) == len(response.outputs)
        for tensor, data in zip(response.outputs, response.raw_output_contents, strict=True):
            assert not tensor.HasField("contents"), tensor.name
            out[tensor.name] = decode_raw(data, tensor.datatype, tensor.shape)
        return out
    assert len(response.raw_output_contents) == 0
    for tensor in response.outputs:
        field = CONTENTS_FIELD[tensor.datatype]
        assert [f.name for f, _ in tensor.contents.ListFields()] == [field], tensor.name
        values = list(getattr(tensor.contents, field))
        if tensor.datatype == "BYTES":
            array = np.empty(len(values), dtype=object)
            array[:] = values
        else:
            array = np.array(values, dtype=V2_NUMPY[tensor.datatype])
        out[tensor.name] = array.reshape(list(tensor.shape))
    return out


Rpc = Callable[..., Any]


def rpc_error(call: Callable[[], Any]) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert isinstance(error, grpc.Call)
    return error


def assert_rpc_error(call: Callable[[], Any], code: grpc.StatusCode, *words: str) -> str:
    error = rpc_error(call)
    details = error.details() or ""
    assert error.code() == code, details
    for word in words:
        assert word.lower() in details.lower(), f"{word!r} not in {details!r}"
    return details


def check_good_add_request(infer: Rpc) -> None:
    """A valid request still succeeds, with the right values (the server keeps serving after an error)."""
    feeds = add_arrays(batch=2, seed=99)
    response = infer(raw_request("add", feeds, request_id="after"), timeout=30)
    assert response.id == "after"
    assert_outputs_match(response_arrays(response, raw=True), reference("add", feeds))


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(numeric_server: RunningServer) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(numeric_server.grpc_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def channel(numeric_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(numeric_server.grpc_address) as ch:
        yield ch


def infer_rpc(ch: grpc.Channel) -> Rpc:
    """ModelInfer taking a ModelInferRequest or, to send anything at all, bytes."""
    method = ch.unary_unary(
        f"{SERVICE}/ModelInfer",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    return method  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def infer(channel: grpc.Channel) -> Rpc:
    return infer_rpc(channel)


@pytest.fixture(scope="module")
def typed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("typed_repo")
    models.write_version(repo, "typed", 1, typed_model())
    config = parse_config({"model_config_list": [{"name": "typed", "base_path": "typed"}]}, "typed", repo)
    server = start_in_background(config, ServerSettings(http_port=0, grpc_port=0, log_level="warning"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def typed_channel(typed_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(typed_server.grpc_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def http(numeric_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=numeric_server.http_url, timeout=60) as c:
        yield c


# --- tritonclient.grpc: health, metadata, configuration, statistics, index ------------------------


def test_health(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in NUMERIC_MODELS:
        assert client.is_model_ready(model), model
        assert client.is_model_ready(model, "1"), model


def test_model_ready_of_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    """tritonclient.grpc raises (unlike tritonclient.http, which turns the 404 into False)."""
    with pytest.raises(InferenceServerException) as info:
        client.is_model_ready("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()
    assert client.is_server_ready()


def test_model_ready_of_unknown_version_is_false_or_not_found(client: grpcclient.InferenceServerClient) -> None:
    """Either answer tells a client the version cannot serve; anything else (True, another error) is wrong."""
    answer: bool | InferenceServerException
    try:
        answer = client.is_model_ready("add", "7")
    except InferenceServerException as e:
        answer = e
    if isinstance(answer, InferenceServerException):
        assert answer.status() == "StatusCode.NOT_FOUND"
        assert "version 7" in answer.message()
    else:
        assert answer is False
    assert client.is_model_ready("add", "1")


def test_server_metadata(client: grpcclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "onnxserve"
    assert meta.version == onnxserve.__version__
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(meta.extensions)


@pytest.mark.parametrize("model", NUMERIC_MODELS)
@pytest.mark.parametrize("version", ["", "1"], ids=["default", "v1"])
def test_model_metadata_matches_graph(client: grpcclient.InferenceServerClient, model: str, version: str) -> None:
    meta = client.get_model_metadata(model, version)
    assert meta.name == model
    assert list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == graph_tensors(model, "inputs")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == graph_tensors(model, "outputs")


def test_model_metadata_spelled_out(client: grpcclient.InferenceServerClient) -> None:
    """The graph-derived comparison above, pinned for a few tensors so a shared mistake shows."""
    add = client.get_model_metadata("add")
    assert (add.inputs[0].name, add.inputs[0].datatype, list(add.inputs[0].shape)) == ("a", "FP32", [-1, 16])
    mixed = client.get_model_metadata("mixed")
    assert [t.datatype for t in mixed.inputs] == ["INT64", "BOOL", "FP16", "UINT8", "INT8", "FP64"]
    assert list(mixed.inputs[2].shape) == [-1, 2]
    fixed = client.get_model_metadata("fixed")
    assert list(fixed.inputs[0].shape) == [2, 3]


def test_model_metadata_of_unknown_model_and_version(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("add", "7")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "version 7" in info.value.message()


@pytest.mark.parametrize("version", ["", "1"], ids=["default", "v1"])
def test_model_config_of_batched_model(client: grpcclient.InferenceServerClient, version: str) -> None:
    config = client.get_model_config("add", version).config
    assert config.name == "add"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    doc = client.get_model_config("add", version, as_json=True)["config"]
    # dims leave out the batch dimension when max_batch_size > 0
    expected_in = [(n, f"TYPE_{t}", s[1:]) for n, t, s in graph_tensors("add", "inputs")]
    expected_out = [(n, f"TYPE_{t}", s[1:]) for n, t, s in graph_tensors("add", "outputs")]
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in doc["input"]] == expected_in
    assert [(o["name"], o["data_type"], [int(d) for d in o["dims"]]) for o in doc["output"]] == expected_out
    assert [list(i.dims) for i in config.input] == [[16], [16]]


def test_model_config_of_fixed_shape_model_does_not_batch(client: grpcclient.InferenceServerClient) -> None:
    """The config asked max_batch_size 4, but the graph's first dim is a fixed 2: no batching."""
    config = client.get_model_config("fixed").config
    assert config.max_batch_size == 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("x", [2, 3])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [2, 3])]
    strings = client.get_model_config("strings", as_json=True)["config"]
    assert strings["input"][0]["data_type"] == "TYPE_STRING"


def _add_stats(client: grpcclient.InferenceServerClient) -> Any:
    response = client.get_inference_statistics("add", "1")
    assert [(s.name, s.version) for s in response.model_stats] == [("add", "1")]
    return response.model_stats[0]


def _batch_counts(stats: Any) -> dict[int, int]:
    """Executions per batch size; the three compute phases are counted once each per execution."""
    counts: dict[int, int] = {}
    for b in stats.batch_stats:
        assert b.compute_input.count == b.compute_infer.count == b.compute_output.count, b
        counts[int(b.batch_size)] = int(b.compute_infer.count)
    return counts


def test_statistics_count_exactly_the_requests_sent(client: grpcclient.InferenceServerClient) -> None:
    batches = [1, 2, 5, 2]
    wrong = np.zeros((1, 16), dtype=np.float64)
    failing: list[tuple[list[grpcclient.InferInput], list[str]]] = [
        ([_triton_input("a", wrong), _triton_input("b", wrong)], []),  # wrong datatype
        (_triton_inputs(add_arrays(batch=9)), []),  # above max_batch_size
        (_triton_inputs(add_arrays(batch=1)), ["product"]),  # unknown output
    ]
    before = _add_stats(client)
    started_ms = time.time_ns() // 1_000_000
    for size in batches:
        feeds = add_arrays(batch=size, seed=size)
        result = client.infer("add", _triton_inputs(feeds))
        np.testing.assert_array_equal(result.as_numpy("sum"), reference("add", feeds)["sum"])
    for inputs, outputs in failing:
        with pytest.raises(InferenceServerException):
            client.infer("add", inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs] or None)
    with pytest.raises(InferenceServerException):  # another model's failure is not counted for add
        client.infer("no_such_model", _triton_inputs(add_arrays(batch=1)))
    after = _add_stats(client)

    successes, failures = len(batches), len(failing)
    assert after.inference_count - before.inference_count == sum(batches)
    assert after.execution_count - before.execution_count == successes
    stats_before, stats_after = before.inference_stats, after.inference_stats
    assert stats_after.success.count - stats_before.success.count == successes
    assert stats_after.fail.count - stats_before.fail.count == failures
    assert stats_after.queue.count - stats_before.queue.count == successes
    for phase in ("compute_input", "compute_infer", "compute_output"):  # one of each per success
        assert getattr(stats_after, phase).count - getattr(stats_before, phase).count == successes, phase
    assert stats_after.success.ns > stats_before.success.ns
    assert stats_after.fail.ns > stats_before.fail.ns
    assert stats_after.compute_infer.ns > stats_before.compute_infer.ns
    assert after.last_inference >= started_ms
    counts_before, counts_after = _batch_counts(before), _batch_counts(after)
    for size in set(batches):
        assert counts_after[size] - counts_before.get(size, 0) == batches.count(size), size
    assert set(counts_after) - set(counts_before) <= set(batches)


def test_statistics_of_every_model_and_of_unknown_model(client: grpcclient.InferenceServerClient) -> None:
    every = client.get_inference_statistics()
    assert sorted((s.name, s.version) for s in every.model_stats) == sorted((m, "1") for m in NUMERIC_MODELS)
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index(client: grpcclient.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert sorted((m.name, m.version, m.state) for m in index.models) == sorted(
        (m, "1", "READY") for m in NUMERIC_MODELS
    )


def test_repository_index_ready_only(channel: grpc.Channel) -> None:
    index = channel.unary_unary(
        f"{SERVICE}/RepositoryIndex",
        request_serializer=pb.RepositoryIndexRequest.SerializeToString,
        response_deserializer=pb.RepositoryIndexResponse.FromString,
    )
    every = index(pb.RepositoryIndexRequest(), timeout=30)
    ready = index(pb.RepositoryIndexRequest(ready=True), timeout=30)
    assert sorted(m.name for m in ready.models) == sorted(m.name for m in every.models) == sorted(NUMERIC_MODELS)


def test_model_config_of_unknown_model_is_not_found(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in info.value.message()


# --- tritonclient.grpc: inference ---------------------------------------------------------------------


def _triton_input(name: str, array: Array) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), v2_datatype(array))
    tensor.set_data_from_numpy(array)
    return tensor


def _triton_inputs(feeds: Mapping[str, Array]) -> list[grpcclient.InferInput]:
    return [_triton_input(n, a) for n, a in feeds.items()]


def _triton_outputs(result: grpcclient.InferResult, names: Sequence[str]) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for name in names:
        array = result.as_numpy(name)
        assert array is not None, name
        out[name] = array
    return out


def test_infer_add(client: grpcclient.InferenceServerClient) -> None:
    feeds = add_arrays(batch=5)
    result = client.infer("add", _triton_inputs(feeds), request_id="req-add")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("add", "1", "req-add")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("sum", "FP32", [5, 16]),
        ("diff", "FP32", [5, 16]),
    ]
    expected = reference("add", feeds)
    assert_outputs_match(_triton_outputs(result, ["sum", "diff"]), expected)
    np.testing.assert_array_equal(expected["sum"], feeds["a"] + feeds["b"])


@pytest.mark.parametrize("requested", [["sum"], ["diff"], ["diff", "sum"]], ids=lambda r: "+".join(r))
def test_infer_requested_outputs(client: grpcclient.InferenceServerClient, requested: list[str]) -> None:
    feeds = add_arrays(batch=2, seed=4)
    result = client.infer(
        "add",
        _triton_inputs(feeds),
        model_version="1",
        outputs=[grpcclient.InferRequestedOutput(n) for n in requested],
    )
    response = result.get_response()
    assert response.model_version == "1"
    assert [o.name for o in response.outputs] == requested
    assert_outputs_match(_triton_outputs(result, requested), reference("add", feeds, requested))
    for name in {"sum", "diff"} - set(requested):
        assert result.as_numpy(name) is None


def test_infer_mixed_datatypes(client: grpcclient.InferenceServerClient) -> None:
    feeds = mixed_arrays()
    result = client.infer("mixed", _triton_inputs(feeds), request_id="mixed-1")
    response = result.get_response()
    assert (response.model_version, response.id) == ("1", "mixed-1")
    expected = reference("mixed", feeds)
    assert {o.name: o.datatype for o in response.outputs} == {n: v2_datatype(a) for n, a in expected.items()}
    got = _triton_outputs(result, list(expected))
    assert_outputs_match(got, expected)
    assert int(got["ids_x3"][0]) == (2**61 + 1) * 3  # exact beyond float64's 53 bits


def test_infer_strings(client: grpcclient.InferenceServerClient) -> None:
    text = strings_array()
    result = client.infer("strings", [_triton_input("text", text)])
    expected = reference("strings", {"text": text})
    got = _triton_outputs(result, ["echo", "count"])
    assert_outputs_match(got, expected)
    assert [v.decode("utf-8") for v in got["echo"]] == list(text)


def test_infer_fixed(client: grpcclient.InferenceServerClient) -> None:
    x = fixed_array()
    result = client.infer("fixed", [_triton_input("x", x)], model_version="1")
    assert_outputs_match(_triton_outputs(result, ["y"]), reference("fixed", {"x": x}))


def test_infer_with_gzip_compression(client: grpcclient.InferenceServerClient) -> None:
    feeds = add_arrays(batch=8, seed=15)
    result = client.infer("add", _triton_inputs(feeds), compression_algorithm="gzip")
    assert_outputs_match(_triton_outputs(result, ["sum", "diff"]), reference("add", feeds))


def test_infer_error_reaches_tritonclient(client: grpcclient.InferenceServerClient) -> None:
    wrong = np.zeros((1, 16), dtype=np.float64)
    with pytest.raises(InferenceServerException) as info:
        client.infer("add", [_triton_input("a", wrong), _triton_input("b", wrong)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expects FP32" in info.value.message()
    feeds = add_arrays(batch=1)
    result = client.infer("add", _triton_inputs(feeds))
    assert_outputs_match(_triton_outputs(result, ["sum", "diff"]), reference("add", feeds))


# --- ModelStreamInfer ------------------------------------------------------------------------------------


StreamItem = tuple[grpcclient.InferResult | None, InferenceServerException | None]


def _collect(responses: queue.Queue[StreamItem], count: int) -> list[StreamItem]:
    return [responses.get(timeout=30) for _ in range(count)]


def test_stream_infer_matches_each_result_by_id(numeric_server: RunningServer) -> None:
    responses: queue.Queue[StreamItem] = queue.Queue()
    stream_client = grpcclient.InferenceServerClient(numeric_server.grpc_address)
    wrong = np.zeros((1, 16), dtype=np.float64)
    # (request id, model, feeds); the bad ones answer an error and the stream goes on
    sent: list[tuple[str, str, dict[str, Array]]] = [
        ("s0", "add", add_arrays(batch=1, seed=10)),
        ("s1", "mixed", mixed_arrays(seed=11)),
        ("bad-datatype", "add", {"a": wrong, "b": wrong}),
        ("s2", "add", add_arrays(batch=4, seed=12)),
        ("s3", "strings", {"text": strings_array()}),
        ("bad-model", "no_such_model", add_arrays(batch=1)),
        ("s4", "fixed", {"x": fixed_array(seed=13)}),
        ("s5", "add", add_arrays(batch=8, seed=14)),
    ]
    try:
        stream_client.start_stream(callback=lambda result, error: responses.put((result, error)))
        for request_id, model, feeds in sent:
            stream_client.async_stream_infer(model, _triton_inputs(feeds), request_id=request_id)
        received = _collect(responses, len(sent))
    finally:
        stream_client.stop_stream()
        stream_client.close()
    assert responses.empty()

    results: dict[str, grpcclient.InferResult] = {}
    errors: list[tuple[int, str]] = []
    for position, (result, error) in enumerate(received):
        if error is not None:
            assert result is None
            errors.append((position, error.message()))
        else:
            assert result is not None
            response = result.get_response()
            assert response.model_version == "1"
            results[response.id] = result
    good = {request_id: (model, feeds) for request_id, model, feeds in sent if not request_id.startswith("bad")}
    assert sorted(results) == sorted(good)
    for request_id, (model, feeds) in good.items():
        result = results[request_id]
        assert result.get_response().model_name == model
        expected = reference(model, feeds)
        assert_outputs_match(_triton_outputs(result, list(expected)), expected)
    # The stream answers in order, so each error sits where its request was sent.
    bad_positions = [i for i, (request_id, _, _) in enumerate(sent) if request_id.startswith("bad")]
    assert [p for p, _ in errors] == bad_positions
    assert "expects FP32" in errors[0][1]
    assert "no_such_model" in errors[1][1]


def test_stream_survives_malformed_message(channel: grpc.Channel) -> None:
    stream = channel.stream_stream(
        f"{SERVICE}/ModelStreamInfer",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    first, second = add_arrays(batch=1, seed=1), add_arrays(batch=2, seed=2)
    sent: list[Any] = [
        raw_request("add", first, request_id="first"),
        b"\xff\xff\xff",
        typed_request("add", second, request_id="second"),
    ]
    received = list(stream(iter(sent), timeout=30))
    assert len(received) == 3
    assert not received[0].error_message
    assert received[0].infer_response.id == "first"
    assert_outputs_match(response_arrays(received[0].infer_response, raw=True), reference("add", first))
    assert "malformed" in received[1].error_message.lower()
    assert not received[2].error_message
    assert received[2].infer_response.id == "second"
    assert_outputs_match(response_arrays(received[2].infer_response, raw=False), reference("add", second))


def test_stream_error_answer_carries_the_request_id(channel: grpc.Channel) -> None:
    stream = channel.stream_stream(
        f"{SERVICE}/ModelStreamInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    wrong = {"a": np.zeros((1, 16), np.float64), "b": np.zeros((1, 16), np.float64)}
    sent = [raw_request("add", wrong, request_id="bad-1"), raw_request("add", add_arrays(batch=1), request_id="ok-2")]
    received = list(stream(iter(sent), timeout=30))
    assert "expects FP32" in received[0].error_message
    assert (received[0].infer_response.id, received[0].infer_response.model_name) == ("bad-1", "add")
    assert not received[1].error_message
    assert received[1].infer_response.id == "ok-2"


# --- raw gRPC: typed contents and raw contents ----------------------------------------------------------


def test_typed_fp32_request_gets_typed_response(infer: Rpc) -> None:
    feeds = add_arrays(batch=3, seed=5)
    response = infer(typed_request("add", feeds, request_id="typed-add"), timeout=30)
    assert (response.model_name, response.model_version, response.id) == ("add", "1", "typed-add")
    assert_outputs_match(response_arrays(response, raw=False), reference("add", feeds))


def test_raw_fp32_request_gets_raw_response(infer: Rpc) -> None:
    feeds = add_arrays(batch=3, seed=5)
    response = infer(raw_request("add", feeds, request_id="raw-add", version="1"), timeout=30)
    assert (response.model_version, response.id) == ("1", "raw-add")
    assert_outputs_match(response_arrays(response, raw=True), reference("add", feeds))


def test_typed_bytes_request_gets_typed_response(infer: Rpc) -> None:
    text = strings_array()
    response = infer(typed_request("strings", {"text": text}), timeout=30)
    got = response_arrays(response, raw=False)
    assert_outputs_match(got, reference("strings", {"text": text}))
    assert [v.decode("utf-8") for v in got["echo"]] == list(text)


def test_raw_bytes_request_gets_raw_response(infer: Rpc) -> None:
    text = strings_array()
    response = infer(raw_request("strings", {"text": text}), timeout=30)
    assert_outputs_match(response_arrays(response, raw=True), reference("strings", {"text": text}))


def test_typed_fixed_and_requested_output(infer: Rpc) -> None:
    x = fixed_array(seed=6)
    response = infer(typed_request("fixed", {"x": x}, outputs=["y"]), timeout=30)
    assert_outputs_match(response_arrays(response, raw=False), reference("fixed", {"x": x}))


def test_mixed_raw_request_with_fp16_gets_raw_response(infer: Rpc) -> None:
    feeds = mixed_arrays(seed=7)
    response = infer(raw_request("mixed", feeds, request_id="m"), timeout=30)
    assert_outputs_match(response_arrays(response, raw=True), reference("mixed", feeds))


def test_typed_contents_of_every_field(typed_channel: grpc.Channel) -> None:
    """INT64, BOOL, UINT8, INT8, FP64 and FP32 through their contents fields; the answer is typed too."""
    feeds = typed_arrays(seed=8)
    request = typed_request("typed", feeds, outputs=TYPED_OUTPUTS_WITHOUT_FP16, request_id="t")
    fields = {t.name: [f.name for f, _ in t.contents.ListFields()] for t in request.inputs}
    assert fields == {
        "ids": ["int64_contents"],
        "flags": ["bool_contents"],
        "small": ["uint_contents"],
        "signed": ["int_contents"],
        "wide": ["fp64_contents"],
        "single": ["fp32_contents"],
    }
    response = infer_rpc(typed_channel)(request, timeout=30)
    assert (response.model_name, response.model_version, response.id) == ("typed", "1", "t")
    got = response_arrays(response, raw=False)
    assert_outputs_match(got, reference("typed", feeds, TYPED_OUTPUTS_WITHOUT_FP16))
    assert int(got["ids_x3"][0]) == (2**61 + 1) * 3


def test_typed_request_with_fp16_output_gets_raw_response(typed_channel: grpc.Channel) -> None:
    feeds = typed_arrays(seed=9)
    requested = ["single_half", "ids_x3", "not_flags"]
    response = infer_rpc(typed_channel)(typed_request("typed", feeds, outputs=requested), timeout=30)
    got = response_arrays(response, raw=True)
    assert_outputs_match(got, reference("typed", feeds, requested))
    assert got["single_half"].dtype == np.float16


def test_raw_and_typed_requests_agree(typed_channel: grpc.Channel) -> None:
    feeds = typed_arrays(seed=10)
    call = infer_rpc(typed_channel)
    typed = response_arrays(call(typed_request("typed", feeds), timeout=30), raw=True)  # FP16 output: raw
    raw = response_arrays(call(raw_request("typed", feeds), timeout=30), raw=True)
    assert_outputs_match(typed, raw)
    assert_outputs_match(raw, reference("typed", feeds))


# --- bad requests ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    payload: bytes  # the serialized request (or not a request at all)
    code: grpc.StatusCode
    words: tuple[str, ...]
    server: str = "numeric"  # or "typed"


def _changed(message: pb.ModelInferRequest, change: Callable[[pb.ModelInferRequest], None]) -> bytes:
    copy = pb.ModelInferRequest()
    copy.CopyFrom(message)
    change(copy)
    data: bytes = copy.SerializeToString()
    return data


def _bad_cases() -> list[Any]:
    feeds = add_arrays(batch=2, seed=20)
    raw = raw_request("add", feeds)
    typed = typed_request("add", feeds)
    typed_feeds = typed_arrays(seed=21)
    text = raw_request("strings", {"text": np.array(["abc", "de"], dtype=object)})
    a_bytes = len(raw.raw_input_contents[0])

    def set_datatype(datatype: str) -> Callable[[pb.ModelInferRequest], None]:
        def change(m: pb.ModelInferRequest) -> None:
            m.inputs[0].datatype = datatype

        return change

    def truncate_a(m: pb.ModelInferRequest) -> None:
        m.raw_input_contents[0] = m.raw_input_contents[0][:64]

    def drop_second_raw(m: pb.ModelInferRequest) -> None:
        del m.raw_input_contents[1]

    def add_contents(m: pb.ModelInferRequest) -> None:
        m.inputs[0].contents.fp32_contents.extend(feeds["a"].reshape(-1).tolist())

    def negative_dim(m: pb.ModelInferRequest) -> None:
        m.inputs[0].shape[0] = -2

    def rename_b(m: pb.ModelInferRequest) -> None:
        m.inputs[1].name = "c"

    def drop_b(m: pb.ModelInferRequest) -> None:
        del m.inputs[1]
        del m.raw_input_contents[1]

    def short_fp32(m: pb.ModelInferRequest) -> None:
        del m.inputs[0].contents.fp32_contents[-1]

    def contents_in_wrong_field(m: pb.ModelInferRequest) -> None:
        m.inputs[0].contents.ClearField("fp32_contents")
        m.inputs[0].contents.fp64_contents.extend(feeds["a"].reshape(-1).tolist())

    def model(name: str, version: str = "") -> Callable[[pb.ModelInferRequest], None]:
        def change(m: pb.ModelInferRequest) -> None:
            m.model_name, m.model_version = name, version

        return change

    def no_inputs(m: pb.ModelInferRequest) -> None:
        m.ClearField("inputs")
        m.ClearField("raw_input_contents")

    def unnamed(m: pb.ModelInferRequest) -> None:
        m.inputs[0].name = ""

    def ask_output(name: str) -> Callable[[pb.ModelInferRequest], None]:
        def change(m: pb.ModelInferRequest) -> None:
            m.outputs.add(name=name)

        return change

    def many_parameters(m: pb.ModelInferRequest) -> None:
        for i in range(70_000):  # about 1 MB: a message under 2 MiB is not walked before parsing (rt21)
            m.parameters[f"p{i}"].bool_param = True

    def cut_bytes(m: pb.ModelInferRequest) -> None:
        m.raw_input_contents[0] = m.raw_input_contents[0][:-1]

    def typed_value(name: str, field: str, value: int) -> Callable[[pb.ModelInferRequest], None]:
        def change(m: pb.ModelInferRequest) -> None:
            tensor = next(t for t in m.inputs if t.name == name)
            getattr(tensor.contents, field)[1] = value

        return change

    mixed = raw_request("mixed", mixed_arrays())

    def fp16_as_contents(m: pb.ModelInferRequest) -> None:
        # the whole request typed: FP16 'half' has no contents field to travel in
        m.ClearField("raw_input_contents")
        for tensor, (name, array) in zip(m.inputs, mixed_arrays().items(), strict=True):
            datatype = v2_datatype(array)
            field = CONTENTS_FIELD.get(datatype, "fp32_contents")
            getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
            assert tensor.name == name

    typed_msg = typed_request("typed", typed_feeds)
    inv, nf = Code.INVALID_ARGUMENT, Code.NOT_FOUND
    cases: dict[str, Bad] = {
        "malformed_protobuf": Bad(b"\xff\xff\xff", inv, ("malformed", "ModelInferRequest")),
        "raw_length_vs_shape": Bad(
            _changed(raw, truncate_a), inv, ("'a'", "64 bytes", "FP32 [2, 16]", f"needs {a_bytes}")
        ),
        "raw_entries_vs_inputs": Bad(
            _changed(raw, drop_second_raw), inv, ("raw_input_contents", "1 entries", "2 inputs")
        ),
        "raw_and_contents_together": Bad(
            _changed(raw, add_contents), inv, ("'a'", "contents", "raw_input_contents", "one form")
        ),
        "wrong_datatype": Bad(
            raw_request("add", {n: a.astype(np.float64) for n, a in feeds.items()}).SerializeToString(),
            inv,
            ("'a'", "FP64", "expects FP32"),
        ),
        "raw_length_vs_datatype": Bad(
            _changed(raw, set_datatype("FP64")),
            inv,
            ("'a'", f"{a_bytes} bytes", "FP64 [2, 16]", f"needs {2 * a_bytes}"),
        ),
        "unknown_datatype_name": Bad(
            _changed(raw, set_datatype("FLOAT32")), inv, ("'a'", "unknown datatype 'FLOAT32'")
        ),
        "bf16_datatype": Bad(_changed(raw, set_datatype("BF16")), inv, ("'a'", "BF16", "not supported")),
        "negative_dim": Bad(_changed(raw, negative_dim), inv, ("'a'", "negative", "[-2, 16]")),
        "unknown_input": Bad(_changed(raw, rename_b), inv, ("unknown input 'c'", "'add'", "'b' (FP32 [-1, 16])")),
        "missing_input": Bad(_changed(raw, drop_b), inv, ("missing input", "'b'", "FP32 [-1, 16]")),
        "no_inputs": Bad(_changed(raw, no_inputs), inv, ("no inputs",)),
        "unnamed_input": Bad(_changed(raw, unnamed), inv, ("inputs[0]", "no name")),
        "unknown_output": Bad(_changed(raw, ask_output("product")), inv, ("unknown output 'product'", "sum", "diff")),
        "batch_above_max": Bad(
            raw_request("add", add_arrays(batch=9)).SerializeToString(), inv, ("batch size 9", "max_batch_size 8")
        ),
        "bytes_not_utf8": Bad(
            raw_request("strings", {"text": np.array([b"ok", b"\xff\xfe"], dtype=object)}).SerializeToString(),
            inv,
            ("'text'", "UTF-8"),
        ),
        "bytes_element_runs_past": Bad(_changed(text, cut_bytes), inv, ("'text'", "runs past")),
        "fp16_as_contents": Bad(
            _changed(mixed, fp16_as_contents), inv, ("'half'", "FP16", "only", "raw_input_contents")
        ),
        "contents_element_count": Bad(
            _changed(typed, short_fp32), inv, ("'a'", "fp32_contents", "31 elements", "[2, 16]", "32")
        ),
        "contents_in_wrong_field": Bad(
            _changed(typed, contents_in_wrong_field), inv, ("'a'", "fp32_contents", "0 elements", "32")
        ),
        "int8_out_of_range": Bad(
            _changed(typed_msg, typed_value("signed", "int_contents", 128)),
            inv,
            ("'signed'", "128", "INT8", "range"),
            "typed",
        ),
        "int8_below_range": Bad(
            _changed(typed_msg, typed_value("signed", "int_contents", -129)),
            inv,
            ("'signed'", "-129", "INT8", "range"),
            "typed",
        ),
        "uint8_out_of_range": Bad(
            _changed(typed_msg, typed_value("small", "uint_contents", 256)),
            inv,
            ("'small'", "256", "UINT8", "range"),
            "typed",
        ),
        "parameters_flood": Bad(_changed(raw, many_parameters), inv, ("more than 65536 entries",)),
        "unknown_model": Bad(_changed(raw, model("no_such_model")), nf, ("no_such_model",)),
        "unknown_version": Bad(_changed(raw, model("add", "7")), nf, ("'add'", "version 7")),
        "empty_model_name": Bad(_changed(raw, model("")), inv, ("model_name", "empty")),
    }
    return [pytest.param(case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize("case", _bad_cases())
def test_bad_request_is_refused_naming_the_problem(infer: Rpc, typed_channel: grpc.Channel, case: Bad) -> None:
    call = infer if case.server == "numeric" else infer_rpc(typed_channel)
    assert_rpc_error(lambda: call(case.payload, timeout=30), case.code, *case.words)
    check_good_add_request(infer)
    if case.server == "typed":
        feeds = typed_arrays(seed=30)
        response = call(typed_request("typed", feeds, outputs=TYPED_OUTPUTS_WITHOUT_FP16), timeout=30)
        assert_outputs_match(
            response_arrays(response, raw=False), reference("typed", feeds, TYPED_OUTPUTS_WITHOUT_FP16)
        )


def test_unknown_rpc_is_unimplemented(channel: grpc.Channel) -> None:
    method = channel.unary_unary(f"{SERVICE}/NoSuchRpc", request_serializer=None, response_deserializer=None)
    assert_rpc_error(lambda: method(b"", timeout=30), Code.UNIMPLEMENTED)
    check_good_add_request(infer_rpc(channel))


def test_malformed_message_to_metadata_rpc(channel: grpc.Channel) -> None:
    method = channel.unary_unary(
        f"{SERVICE}/ModelMetadata", request_serializer=None, response_deserializer=pb.ModelMetadataResponse.FromString
    )
    assert_rpc_error(lambda: method(b"\xff\xff\xff", timeout=30), Code.INVALID_ARGUMENT, "malformed")
    ok = method(pb.ModelMetadataRequest(name="add").SerializeToString(), timeout=30)
    assert ok.name == "add"


# --- message size limit -------------------------------------------------------------------------------------


def test_request_above_max_message_size_is_resource_exhausted(numeric_config: ServerConfig) -> None:
    limit = 64 * 1024
    server = start_in_background(
        numeric_config, ServerSettings(http_port=0, grpc_port=0, grpc_max_message_bytes=limit, log_level="warning")
    )
    try:
        with grpc.insecure_channel(server.grpc_address) as ch:
            call = infer_rpc(ch)
            x = np.ones((256, 256), dtype=np.float32)
            big = raw_request("slow", {"iterations": np.array(1, dtype=np.int64), "x": x})
            assert big.ByteSize() > limit
            assert_rpc_error(lambda: call(big, timeout=30), Code.RESOURCE_EXHAUSTED, str(limit))
            small = raw_request("add", add_arrays(batch=8, seed=40))
            assert small.ByteSize() < limit
            check_good_add_request(call)
            response = call(small, timeout=30)
            assert_outputs_match(response_arrays(response, raw=True), reference("add", add_arrays(batch=8, seed=40)))
    finally:
        server.stop()


# --- HTTP and gRPC agree ---------------------------------------------------------------------------------------


def _http_binary(
    http: httpx.Client, model: str, version: str, request: pb.ModelInferRequest, outputs: Sequence[str] = ()
) -> httpx.Response:
    """The same tensors as ``request`` (which must be raw) over HTTP's binary tensor extension."""
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": list(t.shape),
                "parameters": {"binary_data_size": len(data)},
            }
            for t, data in zip(request.inputs, request.raw_input_contents, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    if outputs:
        header["outputs"] = [{"name": n} for n in outputs]
    head = json.dumps(header).encode("utf-8")
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return http.post(
        path,
        content=head + b"".join(request.raw_input_contents),
        headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))},
    )


def _http_arrays(response: httpx.Response) -> dict[str, Array]:
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(response.content[:length])
    offset = length
    out: dict[str, Array] = {}
    for tensor in header["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        out[tensor["name"]] = decode_raw(response.content[offset : offset + size], tensor["datatype"], tensor["shape"])
        offset += size
    assert offset == len(response.content)
    return out


@pytest.mark.parametrize(
    ("model", "feeds"),
    [
        ("add", add_arrays(batch=4, seed=50)),
        ("mixed", mixed_arrays(seed=51)),
        ("strings", {"text": strings_array()}),
        ("fixed", {"x": fixed_array(seed=52)}),
    ],
    ids=["add", "mixed", "strings", "fixed"],
)
def test_http_and_grpc_give_identical_results(
    infer: Rpc, http: httpx.Client, model: str, feeds: dict[str, Array]
) -> None:
    request = raw_request(model, feeds)
    over_grpc = response_arrays(infer(request, timeout=30), raw=True)
    over_http = _http_arrays(_http_binary(http, model, "", request))
    assert_outputs_match(over_grpc, over_http)
    assert_outputs_match(over_grpc, reference(model, feeds))


def _parity_cases() -> list[Any]:
    feeds = add_arrays(batch=2, seed=60)
    wrong = {"a": feeds["a"].astype(np.float64), "b": feeds["b"].astype(np.float64)}
    good = raw_request("add", feeds)

    def changed(change: Callable[[pb.ModelInferRequest], None]) -> pb.ModelInferRequest:
        parsed: pb.ModelInferRequest = pb.ModelInferRequest.FromString(_changed(good, change))
        return parsed

    def set_shape(m: pb.ModelInferRequest) -> None:
        m.inputs[0].shape[0] = -2

    def set_name(m: pb.ModelInferRequest) -> None:
        m.inputs[0].datatype = "FLOAT32"

    def truncate(m: pb.ModelInferRequest) -> None:
        m.raw_input_contents[0] = m.raw_input_contents[0][:64]

    def rename(m: pb.ModelInferRequest) -> None:
        m.inputs[1].name = "c"

    def drop(m: pb.ModelInferRequest) -> None:
        del m.inputs[1]
        del m.raw_input_contents[1]

    cases: dict[str, tuple[str, str, pb.ModelInferRequest, tuple[str, ...]]] = {
        "wrong_datatype": ("add", "", raw_request("add", wrong), ()),
        "unknown_datatype_name": ("add", "", changed(set_name), ()),
        "negative_dim": ("add", "", changed(set_shape), ()),
        "raw_length_vs_shape": ("add", "", changed(truncate), ()),
        "unknown_input": ("add", "", changed(rename), ()),
        "missing_input": ("add", "", changed(drop), ()),
        "unknown_output": ("add", "", good, ("product",)),
        "batch_above_max": ("add", "", raw_request("add", add_arrays(batch=9)), ()),
        "unknown_model": ("no_such_model", "", good, ()),
        "unknown_version": ("add", "7", good, ()),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize(("model", "version", "request_message", "outputs"), _parity_cases())
def test_http_and_grpc_give_identical_errors(
    infer: Rpc,
    http: httpx.Client,
    model: str,
    version: str,
    request_message: pb.ModelInferRequest,
    outputs: tuple[str, ...],
) -> None:
    message = pb.ModelInferRequest()
    message.CopyFrom(request_message)
    message.model_name, message.model_version = model, version
    for name in outputs:
        message.outputs.add(name=name)
    error = rpc_error(lambda: infer(message, timeout=30))
    http_response = _http_binary(http, model, version, message, outputs)
    expected_code = {400: Code.INVALID_ARGUMENT, 404: Code.NOT_FOUND}[http_response.status_code]
    assert error.code() == expected_code
    assert http_response.json() == {"error": error.details()}
    check_good_add_request(infer)


def test_http_json_and_grpc_give_identical_datatype_error(infer: Rpc, http: httpx.Client) -> None:
    """The brief's example spelled out: FP64 data sent to add's FP32 inputs, as plain V2 JSON."""
    feeds = {n: a.astype(np.float64) for n, a in add_arrays(batch=2, seed=70).items()}
    doc = {
        "inputs": [
            {"name": n, "datatype": "FP64", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
            for n, a in feeds.items()
        ]
    }
    http_response = http.post("/v2/models/add/infer", json=doc)
    assert http_response.status_code == 400
    details = assert_rpc_error(lambda: infer(raw_request("add", feeds), timeout=30), Code.INVALID_ARGUMENT, "'a'")
    assert http_response.json() == {"error": details}
    assert "FP64" in details
    assert "expects FP32" in details


def _three_forms(
    model: str, tensors: dict[str, tuple[str, list[int], list[Any]]], grpc_form: bool = True
) -> tuple[str, dict[str, Any], pb.ModelInferRequest | None, dict[str, Any]]:
    """One set of tensors as a V2 JSON body, a typed gRPC request (None: not expressible) and a TF body."""
    v2 = {"inputs": [{"name": n, "datatype": d, "shape": s, "data": v} for n, (d, s, v) in tensors.items()]}
    message: pb.ModelInferRequest | None = None
    if grpc_form:
        message = pb.ModelInferRequest(model_name=model)
        for name, (datatype, shape, values) in tensors.items():
            tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
            field = {"FP32": "fp32_contents", "UINT8": "uint_contents"}[datatype]
            getattr(tensor.contents, field).extend(np.array(values).reshape(-1).tolist())
    tf = {"inputs": {name: values for name, (_, _, values) in tensors.items()}}
    return model, v2, message, tf


def _rows(count: int, width: int) -> list[list[float]]:
    return [[0.5] * width for _ in range(count)]


def _cross_protocol_cases() -> list[Any]:
    cases = {
        "unknown_input": _three_forms(
            "add", {"a": ("FP32", [2, 16], _rows(2, 16)), "c": ("FP32", [2, 16], _rows(2, 16))}
        ),
        "missing_input": _three_forms("add", {"a": ("FP32", [2, 16], _rows(2, 16))}),
        "wrong_shape": _three_forms(
            "add", {"a": ("FP32", [2, 15], _rows(2, 15)), "b": ("FP32", [2, 15], _rows(2, 15))}
        ),
        "out_of_range": _three_forms("mixed", {"small": ("UINT8", [4], [0, 1, 2, 256])}),
        "booleans_for_numbers": _three_forms("add", {"a": ("FP32", [1, 2], [[True, False]])}, grpc_form=False),
        "ragged": _three_forms("add", {"a": ("FP32", [2, 2], [[0.5, 0.5], [0.5]])}, grpc_form=False),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


@pytest.mark.parametrize(("model", "v2_doc", "grpc_message", "tf_doc"), _cross_protocol_cases())
def test_v2_rest_grpc_and_tf_serving_give_identical_errors(
    infer: Rpc,
    http: httpx.Client,
    model: str,
    v2_doc: dict[str, Any],
    grpc_message: pb.ModelInferRequest | None,
    tf_doc: dict[str, Any],
) -> None:
    """The same bad tensor gets the same message from every protocol (gRPC where it can express it)."""
    over_v2 = http.post(f"/v2/models/{model}/infer", json=v2_doc)
    over_tf = http.post(f"/v1/models/{model}:predict", json=tf_doc)
    assert over_v2.status_code == over_tf.status_code == 400, (over_v2.text, over_tf.text)
    assert over_tf.json() == over_v2.json()
    if grpc_message is not None:
        error = rpc_error(lambda: infer(grpc_message, timeout=30))
        assert error.code() == Code.INVALID_ARGUMENT
        assert over_v2.json() == {"error": error.details()}
    check_good_add_request(infer)
