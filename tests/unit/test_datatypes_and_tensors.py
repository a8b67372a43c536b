"""The datatype table, V2 tensor data in JSON and binary form, the V2 REST codec, and request validation."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx.helper
import onnxruntime as ort
import orjson
import pytest

import models
from onnxserve.config import ModelConfig
from onnxserve.core import datatypes, wire
from onnxserve.core.registry import ModelVersion, load_version
from onnxserve.core.repository import VersionFolder
from onnxserve.core.types import InferenceRequest, InferenceResponse, Tensor
from onnxserve.core.validation import prepare_feeds
from onnxserve.errors import InvalidInputError, ModelLoadError
from onnxserve.protocols.v2_rest import codec, tensors
from onnxserve.protocols.v2_rest.codec import HEADER_LENGTH, DecodedRequest

SERVED = [name for name in datatypes.V2_DATATYPES if name != "BF16"]
NUMERIC = [name for name in SERVED if name not in ("BOOL", "BYTES")]
INTEGER = [name for name in NUMERIC if name.startswith(("INT", "UINT"))]
FLOATING = [name for name in NUMERIC if name.startswith("FP")]


def dt(name: str) -> datatypes.DataType:
    return datatypes.from_v2(name)


def _bytes_array(values: list[bytes], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


# --- the datatype table ----------------------------------------------------------------------------


def test_table_names_every_v2_datatype() -> None:
    integers = ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
    assert sorted(datatypes.V2_DATATYPES) == sorted(["BOOL", *integers, "FP16", "FP32", "FP64", "BF16", "BYTES"])


@pytest.mark.parametrize("name", SERVED)
def test_from_v2_round_trips(name: str) -> None:
    datatype = dt(name)
    assert datatype.v2 == name
    assert datatypes.from_ort(datatype.ort, "somewhere") is datatype
    if datatype.is_bytes:
        assert datatypes.from_numpy(np.dtype(object)) is datatype
        assert datatype.itemsize == 0
    else:
        assert datatypes.from_numpy(datatype.numpy) is datatype
        assert datatype.itemsize == datatype.numpy.itemsize


@pytest.mark.parametrize("name", SERVED)
def test_table_agrees_with_onnx(name: str) -> None:
    datatype = dt(name)
    assert onnx.helper.tensor_dtype_to_np_dtype(datatype.onnx) == datatype.numpy


@pytest.mark.parametrize("name", SERVED)
def test_table_agrees_with_onnx_runtime(name: str) -> None:
    """The ort type string is what a real ONNX Runtime session reports for that ONNX element type."""
    datatype = dt(name)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [onnx.helper.make_tensor_value_info("x", datatype.onnx, ["n"])],
        [onnx.helper.make_tensor_value_info("y", datatype.onnx, ["n"])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == datatype.ort


def test_triton_config_names() -> None:
    assert dt("FP32").triton_config == "TYPE_FP32"
    assert dt("INT64").triton_config == "TYPE_INT64"
    assert dt("BOOL").triton_config == "TYPE_BOOL"
    assert dt("BYTES").triton_config == "TYPE_STRING"


@pytest.mark.parametrize("dtype", [np.dtype("U5"), np.dtype("S3"), np.dtype(object)])
def test_from_numpy_text_is_bytes(dtype: np.dtype[Any]) -> None:
    assert datatypes.from_numpy(dtype).v2 == "BYTES"


def test_from_numpy_unknown() -> None:
    with pytest.raises(InvalidInputError) as caught:
        datatypes.from_numpy(np.dtype(np.complex64))
    assert "complex64" in caught.value.message


def test_bf16_is_refused_by_name() -> None:
    with pytest.raises(InvalidInputError) as caught:
        datatypes.from_v2("BF16")
    assert "BF16" in caught.value.message
    assert "not supported" in caught.value.message


@pytest.mark.parametrize("name", ["FLOAT32", "fp32", "STRING", ""])
def test_unknown_v2_name(name: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        datatypes.from_v2(name)
    assert repr(name) in caught.value.message
    assert "FP32" in caught.value.message  # lists what is expected
    assert "BYTES" in caught.value.message


def test_from_ort_unknown_names_the_tensor() -> None:
    with pytest.raises(ModelLoadError) as caught:
        datatypes.from_ort("tensor(bfloat16)", "input tensor 'x'")
    assert "input tensor 'x'" in caught.value.message
    assert "tensor(bfloat16)" in caught.value.message


# --- JSON tensor data ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", INTEGER)
@pytest.mark.parametrize("nested", [True, False])
def test_from_json_integers(name: str, nested: bool) -> None:
    info = np.iinfo(dt(name).numpy)
    rows = [[0, 1, int(info.max)], [int(info.min), 7, 42]]
    data: Any = rows if nested else [v for row in rows for v in row]
    tensor = tensors.from_json("x", dt(name), (2, 3), data)
    assert tensor.name == "x"
    assert tensor.datatype is dt(name)
    assert tensor.data.dtype == dt(name).numpy
    assert tensor.shape == (2, 3)
    np.testing.assert_array_equal(tensor.data, np.array(rows, dtype=dt(name).numpy))


@pytest.mark.parametrize("name", FLOATING)
@pytest.mark.parametrize("nested", [True, False])
def test_from_json_floats(name: str, nested: bool) -> None:
    rows = [[0.1, -1.25, 3], [1e-3, 2.5, -7]]  # ints are fine for a float tensor
    data: Any = rows if nested else [v for row in rows for v in row]
    tensor = tensors.from_json("x", dt(name), (2, 3), data)
    assert tensor.data.dtype == dt(name).numpy
    np.testing.assert_array_equal(tensor.data, np.array(rows, dtype=dt(name).numpy))


@pytest.mark.parametrize("nested", [True, False])
def test_from_json_bool(nested: bool) -> None:
    rows = [[True, False], [False, True]]
    data: Any = rows if nested else [v for row in rows for v in row]
    tensor = tensors.from_json("flags", dt("BOOL"), (2, 2), data)
    assert tensor.data.dtype == np.bool_
    np.testing.assert_array_equal(tensor.data, np.array(rows))


@pytest.mark.parametrize("nested", [True, False])
def test_from_json_bytes(nested: bool) -> None:
    rows = [["a", "héllo"], ["", "日本"]]
    data: Any = rows if nested else [v for row in rows for v in row]
    tensor = tensors.from_json("text", dt("BYTES"), (2, 2), data)
    assert tensor.data.dtype == np.object_
    assert tensor.shape == (2, 2)
    assert tensor.data.tolist() == [[s.encode("utf-8") for s in row] for row in rows]


def test_from_json_scalar_and_empty() -> None:
    scalar = tensors.from_json("s", dt("INT32"), (), 5)
    assert scalar.shape == ()
    assert scalar.data.dtype == np.int32
    assert int(scalar.data) == 5
    empty = tensors.from_json("e", dt("FP32"), (0, 3), [])
    assert empty.shape == (0, 3)
    assert empty.data.dtype == np.float32
    text = tensors.from_json("t", dt("BYTES"), (1,), "only")
    assert text.data.tolist() == [b"only"]


def test_from_json_element_count_mismatch() -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("x", dt("FP32"), (2, 3), [1, 2, 3, 4, 5])
    message = caught.value.message
    assert "'x'" in message
    assert "5 elements" in message
    assert "[2, 3]" in message
    assert "6" in message


def test_from_json_bytes_element_count_mismatch() -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("text", dt("BYTES"), (3,), ["a", "b"])
    assert "'text'" in caught.value.message
    assert "2 elements" in caught.value.message


def test_from_json_ragged_nested_list() -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("x", dt("INT64"), (3,), [[1, 2], [3]])
    assert "'x'" in caught.value.message
    assert "evenly nested" in caught.value.message


def test_from_json_ragged_bytes_is_flattened() -> None:
    # BYTES data is flattened row-major whatever its nesting; only the element count must fit.
    tensor = tensors.from_json("t", dt("BYTES"), (3,), [["a", "b"], ["c"]])
    assert tensor.data.tolist() == [b"a", b"b", b"c"]


@pytest.mark.parametrize("name", NUMERIC)
def test_from_json_strings_for_a_numeric_type(name: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("x", dt(name), (2,), ["1", "2"])
    assert "'x'" in caught.value.message
    assert name in caught.value.message
    assert "strings" in caught.value.message


@pytest.mark.parametrize("name", INTEGER)
@pytest.mark.parametrize("data", [[1.5, 2], [1.0, 2.0]])
def test_from_json_floats_for_an_int_type(name: str, data: list[float]) -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("x", dt(name), (2,), data)
    assert name in caught.value.message
    assert "non-integer" in caught.value.message


@pytest.mark.parametrize("name", [*FLOATING, *INTEGER])
def test_from_json_bools_for_a_numeric_type(name: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("x", dt(name), (2,), [True, False])
    assert name in caught.value.message
    assert "booleans" in caught.value.message


@pytest.mark.parametrize("data", [[0, 1], [0.0, 1.0], ["true", "false"]])
def test_from_json_non_bools_for_bool(data: list[Any]) -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("flags", dt("BOOL"), (2,), data)
    assert "'flags'" in caught.value.message
    assert "BOOL" in caught.value.message


@pytest.mark.parametrize(
    ("name", "value"),
    [("UINT8", 256), ("UINT8", -1), ("INT8", 128), ("INT8", -129), ("UINT16", 65536), ("INT64", 2**63)],
)
def test_from_json_out_of_range_ints(name: str, value: int) -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("x", dt(name), (2,), [1, value])
    assert "out of range" in caught.value.message
    assert str(value) in caught.value.message
    assert name in caught.value.message


def test_from_json_uint64_max_is_exact() -> None:
    tensor = tensors.from_json("x", dt("UINT64"), (2,), [0, 2**64 - 1])
    assert tensor.data.dtype == np.uint64
    assert int(tensor.data[1]) == 2**64 - 1


def test_from_json_int_too_large_for_any_type() -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("x", dt("UINT64"), (1,), [2**64])
    assert "'x'" in caught.value.message


def test_from_json_non_strings_for_bytes() -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.from_json("text", dt("BYTES"), (2,), ["a", 3])
    assert "'text'" in caught.value.message
    assert "strings" in caught.value.message
    assert "found a number" in caught.value.message


@pytest.mark.parametrize("shape", [[2, -1], [-3]])
def test_negative_shape_dims(shape: list[int]) -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.parse_shape("x", shape)
    assert "'x'" in caught.value.message
    assert "negative" in caught.value.message


@pytest.mark.parametrize("shape", [[2.0], [True], "2", None, [[2]]])
def test_shape_must_be_a_list_of_ints(shape: Any) -> None:
    with pytest.raises(InvalidInputError) as caught:
        tensors.parse_shape("x", shape)
    assert "list of integers" in caught.value.message


def test_to_json_data() -> None:
    values = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert list(tensors.to_json_data(Tensor("x", dt("INT32"), values))) == values.reshape(-1).tolist()
    text = Tensor("t", dt("BYTES"), _bytes_array([b"a", "é".encode()], (2,)))
    assert tensors.to_json_data(text) == ["a", "é"]
    with pytest.raises(InvalidInputError) as caught:
        tensors.to_json_data(Tensor("raw", dt("BYTES"), _bytes_array([b"\xff\xfe"], (1,))))
    assert "'raw'" in caught.value.message
    assert "binary_data" in caught.value.message


# --- binary tensor data ----------------------------------------------------------------------------


def _binary_cases() -> list[tuple[str, npt.NDArray[Any], bytes]]:
    """(datatype, array, its little-endian bytes built with struct, independently of numpy's tobytes)."""
    fp32 = np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.0]], dtype=np.float32)
    fp16 = np.array([0.5, -65504.0, 1.0], dtype=np.float16)
    int64 = np.array([[-(2**63), 2**63 - 1], [0, -5]], dtype=np.int64)
    flags = np.array([True, False, True, True])
    words = [b"hello", b"", "日本".encode(), b"\x00\xff"]
    return [
        ("FP32", fp32, struct.pack("<6f", *fp32.reshape(-1).tolist())),
        ("FP16", fp16, struct.pack("<3e", *fp16.tolist())),
        ("INT64", int64, struct.pack("<4q", *int64.reshape(-1).tolist())),
        ("BOOL", flags, bytes([1, 0, 1, 1])),
        ("BYTES", _bytes_array(words, (2, 2)), b"".join(struct.pack("<I", len(w)) + w for w in words)),
    ]


@pytest.mark.parametrize(("name", "array", "raw"), _binary_cases(), ids=[c[0] for c in _binary_cases()])
def test_binary_round_trip(name: str, array: npt.NDArray[Any], raw: bytes) -> None:
    assert bytes(wire.to_raw(Tensor("x", dt(name), array))) == raw
    back = wire.from_raw("x", dt(name), array.shape, raw)
    assert back.datatype is dt(name)
    assert back.shape == array.shape
    assert back.data.dtype == array.dtype
    assert back.data.tolist() == array.tolist()


def test_to_binary_of_a_non_contiguous_array() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3).T  # column-major view
    raw = bytes(wire.to_raw(Tensor("x", dt("FP32"), values)))
    assert raw == struct.pack("<6f", *values.reshape(-1).tolist())


@pytest.mark.parametrize(("name", "length"), [("FP32", 7), ("FP32", 12), ("INT64", 8), ("BOOL", 3)])
def test_from_binary_wrong_byte_length(name: str, length: int) -> None:
    with pytest.raises(InvalidInputError) as caught:
        wire.from_raw("x", dt(name), (2,), b"\x00" * length)
    message = caught.value.message
    expected = 2 * dt(name).itemsize
    assert "'x'" in message
    assert f"{length} bytes" in message
    assert str(expected) in message
    assert name in message


def test_from_binary_truncated_bytes_length_prefix() -> None:
    raw = struct.pack("<I", 1) + b"a" + b"\x02\x00"
    with pytest.raises(InvalidInputError) as caught:
        wire.from_raw("text", dt("BYTES"), (2,), raw)
    assert "'text'" in caught.value.message
    assert "4-byte length" in caught.value.message


def test_from_binary_bytes_element_runs_past_the_data() -> None:
    raw = struct.pack("<I", 10) + b"short"
    with pytest.raises(InvalidInputError) as caught:
        wire.from_raw("text", dt("BYTES"), (1,), raw)
    assert "'text'" in caught.value.message
    assert "10 bytes" in caught.value.message


def test_from_binary_bytes_element_count_mismatch() -> None:
    raw = struct.pack("<I", 1) + b"a"
    with pytest.raises(InvalidInputError) as caught:
        wire.from_raw("text", dt("BYTES"), (2,), raw)
    assert "1 elements" in caught.value.message


# --- the V2 REST codec: requests -------------------------------------------------------------------


def test_decode_json_request() -> None:
    body = orjson.dumps(
        {
            "id": "req-1",
            "parameters": {"priority": 2},
            "inputs": [
                {"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]},
                {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["x", "yz"]},
            ],
            "outputs": [{"name": "sum"}, {"name": "diff", "parameters": {"binary_data": True}}],
        }
    )
    decoded = codec.decode_infer_request(body, "add", "2")
    request = decoded.request
    assert request.model_name == "add"
    assert request.model_version == "2"
    assert request.id == "req-1"
    assert dict(request.parameters) == {"priority": 2}
    assert [t.name for t in request.inputs] == ["a", "t"]
    np.testing.assert_array_equal(request.inputs[0].data, np.array([[1, 2], [3, 4.5]], dtype=np.float32))
    assert request.inputs[0].data.dtype == np.float32
    assert request.inputs[1].data.tolist() == [b"x", b"yz"]
    assert request.outputs == ["sum", "diff"]
    assert decoded.binary_outputs == frozenset({"diff"})
    assert decoded.all_binary is False


def test_decode_request_level_binary_output_and_no_outputs() -> None:
    body = orjson.dumps(
        {
            "parameters": {"binary_data_output": True, "other": "kept"},
            "inputs": [{"name": "a", "shape": [1], "datatype": "INT64", "data": [3]}],
        }
    )
    decoded = codec.decode_infer_request(body, "m", None)
    assert decoded.all_binary is True
    assert dict(decoded.request.parameters) == {"other": "kept"}
    assert decoded.request.outputs is None
    assert decoded.request.id is None
    assert decoded.request.model_version is None


def _binary_body(extra: bytes = b"") -> tuple[bytes, int, npt.NDArray[Any], npt.NDArray[Any], list[bytes]]:
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    b = np.array([-1, 2**40], dtype=np.int64)
    words = [b"one", "två".encode()]
    raw_a = struct.pack("<6f", *a.reshape(-1).tolist())
    raw_c = b"".join(struct.pack("<I", len(w)) + w for w in words)
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "a", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": len(raw_a)}},
                {"name": "b", "shape": [2], "datatype": "INT64", "data": b.tolist()},
                {"name": "c", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw_c)}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    return header + raw_a + raw_c + extra, len(header), a, b, words


def test_decode_binary_request() -> None:
    body, header_length, a, b, words = _binary_body()
    decoded = codec.decode_infer_request(body, "m", "1", header_length)
    inputs = {t.name: t for t in decoded.request.inputs}
    assert [t.name for t in decoded.request.inputs] == ["a", "b", "c"]
    np.testing.assert_array_equal(inputs["a"].data, a)
    assert inputs["a"].data.dtype == np.float32
    np.testing.assert_array_equal(inputs["b"].data, b)
    assert inputs["c"].data.tolist() == words
    assert decoded.binary_outputs == frozenset({"y"})


def test_decode_header_length_larger_than_the_body() -> None:
    body, _, _, _, _ = _binary_body()
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(body, "m", None, len(body) + 1)
    message = caught.value.message
    assert HEADER_LENGTH in message.lower()
    assert str(len(body) + 1) in message
    assert str(len(body)) in message


def test_decode_negative_header_length() -> None:
    body, _, _, _, _ = _binary_body()
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(body, "m", None, -1)
    assert HEADER_LENGTH in caught.value.message.lower()


def test_decode_leftover_binary_bytes() -> None:
    body, header_length, _, _, _ = _binary_body(extra=b"\x00\x01\x02")
    declared = len(body) - header_length - 3
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(body, "m", None, header_length)
    message = caught.value.message
    assert str(declared + 3) in message
    assert str(declared) in message


def test_decode_binary_data_size_past_the_body() -> None:
    body, header_length, _, _, _ = _binary_body()
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(body[:-2], "m", None, header_length)
    assert "'c'" in caught.value.message
    assert "binary_data_size" in caught.value.message


def test_decode_binary_input_without_header_length() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}
    )
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(body, "m", None)
    assert "'a'" in caught.value.message
    assert "binary_data_size" in caught.value.message


def test_decode_binary_wrong_size_for_shape() -> None:
    header = orjson.dumps(
        {"inputs": [{"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}
    )
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(header + b"\x00" * 4, "m", None, len(header))
    assert "'a'" in caught.value.message
    assert "4 bytes" in caught.value.message


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"inputs": []}, ["inputs"]),
        ({}, ["inputs"]),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}], "bogus": 1}, ["bogus"]),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1], "dims": [1]}]}, ["dims", "'a'"]),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FLOAT", "data": [1]}]}, ["FLOAT"]),
        ({"inputs": [{"name": "a", "shape": [-1], "datatype": "FP32", "data": [1]}]}, ["'a'", "negative"]),
        ({"inputs": [{"name": "a", "datatype": "FP32", "data": [1]}]}, ["'a'", "shape"]),
        ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}, ["'a'", "data"]),
        ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}, ["inputs[0]", "name"]),
        ({"id": 5, "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}]}, ["id"]),
        (
            {
                "inputs": [
                    {
                        "name": "a",
                        "shape": [1],
                        "datatype": "FP32",
                        "data": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            ["'a'", "both"],
        ),
    ],
)
def test_decode_refusals(document: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(orjson.dumps(document), "m", None)
    for word in words:
        assert word in caught.value.message


def test_decode_body_that_is_not_json() -> None:
    with pytest.raises(InvalidInputError) as caught:
        codec.decode_infer_request(b"{not json", "m", None)
    assert "JSON" in caught.value.message


# --- the V2 REST codec: responses ------------------------------------------------------------------


def _response(id: str | None = "r7") -> InferenceResponse:
    return InferenceResponse(
        model_name="m",
        model_version="3",
        id=id,
        outputs=[
            Tensor("sum", dt("FP32"), np.array([[0.5, -1.0], [2.0, 3.5]], dtype=np.float32)),
            Tensor("flags", dt("BOOL"), np.array([True, False, True])),
            Tensor("text", dt("BYTES"), _bytes_array([b"ab", "ü".encode()], (2,))),
            Tensor("ids", dt("INT64"), np.array([[-3], [2**40]], dtype=np.int64)),
            Tensor("half", dt("FP16"), np.array([0.5, -2.0], dtype=np.float16)),
        ],
    )


def _decoded(binary: frozenset[str] = frozenset(), all_binary: bool = False) -> DecodedRequest:
    request = InferenceRequest(model_name="m", inputs=[])
    return DecodedRequest(request, binary, all_binary)


def test_encode_json_response() -> None:
    response = _response()
    body, header_length = codec.encode_infer_response(response, _decoded())
    assert header_length is None
    doc = orjson.loads(body)
    assert doc["model_name"] == "m"
    assert doc["model_version"] == "3"
    assert doc["id"] == "r7"
    assert "parameters" not in doc
    assert [o["name"] for o in doc["outputs"]] == [t.name for t in response.outputs]
    for out, tensor in zip(doc["outputs"], response.outputs, strict=True):
        assert out["datatype"] == tensor.datatype.v2
        assert out["shape"] == list(tensor.data.shape)
        assert "parameters" not in out
        if tensor.datatype.is_bytes:
            assert out["data"] == [b.decode("utf-8") for b in tensor.data.reshape(-1)]
        else:
            assert out["data"] == tensor.data.reshape(-1).tolist()


def test_encode_response_without_id_with_parameters() -> None:
    response = InferenceResponse(
        model_name="m",
        model_version="1",
        outputs=[Tensor("y", dt("INT32"), np.array([1], dtype=np.int32))],
        parameters={"sequence_end": True},
    )
    doc = orjson.loads(codec.encode_infer_response(response, _decoded())[0])
    assert "id" not in doc
    assert doc["parameters"] == {"sequence_end": True}


def test_encode_one_binary_output() -> None:
    response = _response()
    body, header_length = codec.encode_infer_response(response, _decoded(frozenset({"sum"})))
    assert header_length is not None
    doc = orjson.loads(body[:header_length])
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert "data" not in outputs["sum"]
    assert outputs["sum"]["parameters"] == {"binary_data_size": 16}
    assert outputs["sum"]["shape"] == [2, 2]
    assert outputs["sum"]["datatype"] == "FP32"
    assert body[header_length:] == struct.pack("<4f", 0.5, -1.0, 2.0, 3.5)
    for name in ("flags", "text", "ids", "half"):
        assert "data" in outputs[name]
        assert "parameters" not in outputs[name]


def test_encode_all_binary_outputs_in_order() -> None:
    response = _response()
    body, header_length = codec.encode_infer_response(response, _decoded(all_binary=True))
    assert header_length is not None
    doc = orjson.loads(body[:header_length])
    offset = header_length
    for out, tensor in zip(doc["outputs"], response.outputs, strict=True):
        assert "data" not in out
        size = out["parameters"]["binary_data_size"]
        back = wire.from_raw(out["name"], dt(out["datatype"]), tuple(out["shape"]), body[offset : offset + size])
        assert back.data.tolist() == tensor.data.tolist()
        assert back.data.dtype == tensor.data.dtype
        offset += size
    assert offset == len(body)
    text = doc["outputs"][2]
    assert text["parameters"]["binary_data_size"] == (4 + 2) + (4 + len("ü".encode()))


def test_encode_non_utf8_bytes_as_json_is_refused_but_binary_works() -> None:
    response = InferenceResponse(
        model_name="m", model_version="1", outputs=[Tensor("raw", dt("BYTES"), _bytes_array([b"\xff"], (1,)))]
    )
    with pytest.raises(InvalidInputError) as caught:
        codec.encode_infer_response(response, _decoded())
    assert "'raw'" in caught.value.message
    body, header_length = codec.encode_infer_response(response, _decoded(frozenset({"raw"})))
    assert header_length is not None
    assert body[header_length:] == struct.pack("<I", 1) + b"\xff"


# --- validation against a real model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("validation")
    models.write_version(path, "add", 1, models.add_model())
    models.write_version(path, "mixed", 1, models.mixed_model())
    models.write_version(
        path,
        "two",
        1,
        models.parse(
            "two (float[n, 4] a, float[m, 4] b) => (float[n, 4] a2, float[m, 4] b2) { a2 = Neg(a)  b2 = Neg(b) }"
        ),
    )
    return path


def _version(repo: Path, name: str, max_batch_size: int = 0) -> ModelVersion:
    config = ModelConfig(name=name, base_path=repo / name, max_batch_size=max_batch_size)
    return load_version(config, VersionFolder(1, repo / name / "1"))


@pytest.fixture(scope="module")
def add(repo: Path) -> ModelVersion:
    return _version(repo, "add", max_batch_size=8)


def _fp32(name: str, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return Tensor(name, dt("FP32"), np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _request(*inputs: Tensor, outputs: list[str] | None = None) -> InferenceRequest:
    return InferenceRequest(model_name="add", inputs=list(inputs), outputs=outputs)


def _refusal(request: InferenceRequest, model: ModelVersion) -> str:
    with pytest.raises(InvalidInputError) as caught:
        prepare_feeds(request, model)
    return caught.value.message


def test_prepare_feeds_accepts_a_good_request(add: ModelVersion) -> None:
    a, b = _fp32("a", (3, 16), 1), _fp32("b", (3, 16), 2)
    feeds, names = prepare_feeds(_request(b, a), add)
    assert set(feeds) == {"a", "b"}
    assert names == ["sum", "diff"]
    results = add.session.run(feeds, names)
    np.testing.assert_array_equal(results["sum"], a.data + b.data)
    np.testing.assert_array_equal(results["diff"], a.data - b.data)


def test_prepare_feeds_requested_outputs_keep_their_order(add: ModelVersion) -> None:
    request = _request(_fp32("a", (1, 16)), _fp32("b", (1, 16)), outputs=["diff", "sum"])
    assert prepare_feeds(request, add)[1] == ["diff", "sum"]
    request = _request(_fp32("a", (1, 16)), _fp32("b", (1, 16)), outputs=[])
    assert prepare_feeds(request, add)[1] == ["sum", "diff"]


def test_prepare_feeds_batch_of_exactly_max(add: ModelVersion) -> None:
    feeds, _ = prepare_feeds(_request(_fp32("a", (8, 16)), _fp32("b", (8, 16))), add)
    assert feeds["a"].shape == (8, 16)


def test_unknown_input(add: ModelVersion) -> None:
    message = _refusal(_request(_fp32("a", (1, 16)), _fp32("c", (1, 16))), add)
    assert "unknown input 'c'" in message
    assert "'a'" in message
    assert "'b'" in message  # lists what is expected
    assert "FP32" in message


def test_missing_input(add: ModelVersion) -> None:
    message = _refusal(_request(_fp32("a", (1, 16))), add)
    assert "missing" in message
    assert "'b'" in message
    assert "[-1, 16]" in message


def test_duplicate_input(add: ModelVersion) -> None:
    message = _refusal(_request(_fp32("a", (1, 16)), _fp32("a", (1, 16)), _fp32("b", (1, 16))), add)
    assert "'a'" in message
    assert "more than once" in message


def test_wrong_datatype(add: ModelVersion) -> None:
    wide = Tensor("a", dt("FP64"), np.zeros((1, 16), dtype=np.float64))
    message = _refusal(_request(wide, _fp32("b", (1, 16))), add)
    assert "'a'" in message
    assert "FP64" in message
    assert "FP32" in message


@pytest.mark.parametrize("shape", [(16,), (1, 1, 16), (1, 15), (2, 17)])
def test_wrong_rank_or_fixed_dim(add: ModelVersion, shape: tuple[int, ...]) -> None:
    message = _refusal(_request(_fp32("a", shape), _fp32("b", (1, 16))), add)
    assert "'a'" in message
    assert "[" + ", ".join(str(d) for d in shape) + "]" in message
    assert "[-1, 16]" in message


def test_symbolic_dims_disagree(add: ModelVersion) -> None:
    message = _refusal(_request(_fp32("a", (2, 16)), _fp32("b", (3, 16))), add)
    assert "batch" in message
    assert "'a'" in message
    assert "'b'" in message
    assert "batch=2" in message
    assert "batch=3" in message


def test_symbolic_dims_disagree_without_batching(repo: Path) -> None:
    mixed = _version(repo, "mixed")
    assert mixed.max_batch_size == 0
    inputs = [
        Tensor("ids", dt("INT64"), np.zeros(3, dtype=np.int64)),
        Tensor("flags", dt("BOOL"), np.zeros(2, dtype=np.bool_)),
    ]
    message = _refusal(InferenceRequest(model_name="mixed", inputs=inputs), mixed)
    assert "n=2" in message
    assert "n=3" in message
    assert "'flags'" in message
    assert "'ids'" in message


def test_batch_larger_than_max_batch_size(add: ModelVersion) -> None:
    message = _refusal(_request(_fp32("a", (9, 16)), _fp32("b", (9, 16))), add)
    assert "batch size 9" in message
    assert "max_batch_size 8" in message


def test_inputs_disagree_on_the_batch_size(repo: Path) -> None:
    two = _version(repo, "two", max_batch_size=8)
    assert two.max_batch_size == 8
    message = _refusal(_request(_fp32("a", (2, 4)), _fp32("b", (3, 4))), two)
    assert "batch size" in message
    assert "a=2" in message
    assert "b=3" in message
    unbatched = _version(repo, "two", max_batch_size=0)
    feeds, _ = prepare_feeds(_request(_fp32("a", (2, 4)), _fp32("b", (3, 4))), unbatched)
    assert feeds["b"].shape == (3, 4)


def test_unknown_requested_output(add: ModelVersion) -> None:
    message = _refusal(_request(_fp32("a", (1, 16)), _fp32("b", (1, 16)), outputs=["sum", "prod"]), add)
    assert "unknown output 'prod'" in message
    assert "sum" in message
    assert "diff" in message


def test_duplicate_requested_output(add: ModelVersion) -> None:
    message = _refusal(_request(_fp32("a", (1, 16)), _fp32("b", (1, 16)), outputs=["sum", "sum"]), add)
    assert "'sum'" in message
    assert "more than once" in message


def test_decoded_request_validates_and_runs(add: ModelVersion) -> None:
    """The whole path: a binary V2 body, decoded, validated, run, and encoded back."""
    a = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    b = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
    header = orjson.dumps(
        {
            "id": "x",
            "inputs": [
                {"name": "a", "shape": [2, 16], "datatype": "FP32", "parameters": {"binary_data_size": a.nbytes}},
                {"name": "b", "shape": [2, 16], "datatype": "FP32", "data": b.tolist()},
            ],
            "outputs": [{"name": "sum", "parameters": {"binary_data": True}}],
        }
    )
    decoded = codec.decode_infer_request(header + a.astype("<f4").tobytes(), "add", None, len(header))
    feeds, names = prepare_feeds(decoded.request, add)
    results = add.session.run(feeds, names)
    response = InferenceResponse(
        model_name="add",
        model_version=str(add.version),
        id=decoded.request.id,
        outputs=[Tensor(n, add.outputs[0].datatype, results[n]) for n in names],
    )
    body, header_length = codec.encode_infer_response(response, decoded)
    assert header_length is not None
    doc = orjson.loads(body[:header_length])
    assert doc["id"] == "x"
    assert [o["name"] for o in doc["outputs"]] == ["sum"]
    out = np.frombuffer(body[header_length:], dtype="<f4").reshape(2, 16)
    np.testing.assert_array_equal(out, a + b)
