"""Bounds on KServe V2 JSON answers, checked against what orjson really writes, for every datatype."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from onnxserve.core.datatypes import from_v2
from onnxserve.core.types import InferenceRequest, InferenceResponse, Tensor
from onnxserve.errors import TooLargeError
from onnxserve.protocols import json_size
from onnxserve.protocols.v2_rest import codec
from onnxserve.protocols.v2_rest.codec import DecodedRequest

RNG = np.random.default_rng(11)

NUMERIC = ["BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "FP16", "FP32", "FP64"]


def _decoded(binary: frozenset[str] = frozenset()) -> DecodedRequest:
    return DecodedRequest(InferenceRequest(model_name="m", inputs=[]), binary, False)


def _extremes(v2: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The values whose text is widest and narrowest in ``v2``."""
    dtype = from_v2(v2).numpy
    if v2 == "BOOL":
        return np.array([False]), np.array([True])
    if v2.startswith("FP"):
        widest = {"FP16": -6.0975e-05, "FP32": -1.1754944e-38, "FP64": -2.2250738585072014e-308}[v2]
        return np.array([widest], dtype=dtype), np.array([0.0], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([info.min if info.min else info.max], dtype=dtype), np.array([0], dtype=dtype)


def _reference(response: InferenceResponse) -> bytes:
    """The whole document built at once, as the encoder did before it wrote slices and counted."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = dict(response.parameters)
    doc["outputs"] = [
        {
            "name": t.name,
            "datatype": t.datatype.v2,
            "shape": list(t.shape),
            "data": [v.decode() for v in t.data.reshape(-1)] if t.datatype.is_bytes else t.data.reshape(-1),
        }
        for t in response.outputs
    ]
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


@pytest.mark.parametrize("v2", NUMERIC)
@pytest.mark.parametrize("count", [0, 1, 9, codec.DATA_SLICE_ELEMENTS + 5])
def test_numeric_answers_are_byte_equal_and_within_their_bounds(v2: str, count: int) -> None:
    widest, narrowest = _extremes(v2)
    for values in (widest, narrowest, np.array([np.nan, -np.inf, 1.5]), RNG.standard_normal(37) * 1e6):
        with np.errstate(all="ignore"):  # random values wrap into the small types
            data = np.resize(values, count).astype(from_v2(v2).numpy).reshape(1, count)
        response = InferenceResponse("m", "1", [Tensor("y", from_v2(v2), data)], id="r", parameters={"p": 1})
        written, header = codec.encode_infer_response(response, _decoded())
        assert header is None
        assert written == _reference(response)
        bounds = codec.answer_bounds(response, _decoded())
        assert bounds.least <= len(written) <= bounds.most
        if values is widest and v2 not in ("FP16", "FP32"):  # one bound serves every float: FP64's widest
            assert len(written) == bounds.most, (v2, written[-80:])
        if values is narrowest and not v2.startswith("FP"):  # a float's text is at least "0.0"
            assert len(written) == bounds.least, (v2, written[-80:])


def test_texts_are_counted_exactly_as_orjson_escapes_them() -> None:
    every_ascii = bytes(range(128))
    items = [b"", every_ascii, "\u00e9\u2028\U0001f600".encode(), b'"\\', b"\x01" * 1000, b"plain"]
    for item in items:
        assert json_size.orjson_strings_length([item]) == len(orjson.dumps(item.decode()))
    assert json_size.orjson_strings_length(items) == sum(len(orjson.dumps(i.decode())) for i in items)
    many = [b'\x01\n"x\xc3\xa9' * 3000] * 1000  # past one slice of joined text
    assert json_size.orjson_strings_length(many) == len(orjson.dumps([m.decode() for m in many])) - 2 - 999


@pytest.mark.parametrize("count", [0, 1, 3, codec.DATA_SLICE_ELEMENTS + 5])
def test_bytes_answers_are_counted_exactly(count: int) -> None:
    pool = [b"", bytes(range(1, 128)), "\u00e9t\u00e9".encode(), b"\x01" * 50]
    data = np.empty(count, dtype=object)
    data[:] = [pool[i % len(pool)] for i in range(count)]
    response = InferenceResponse("m", "1", [Tensor("s", from_v2("BYTES"), data)])
    written, _ = codec.encode_infer_response(response, _decoded())
    assert written == _reference(response)
    assert codec.answer_bounds(response, _decoded()) == json_size.Bounds.exact(len(written))


def test_binary_outputs_count_at_their_raw_size() -> None:
    text = np.array([b"ab", b"\x01" * 9], dtype=object)
    outputs = [
        Tensor("f", from_v2("FP64"), np.full(1000, -1e-300)),
        Tensor("s", from_v2("BYTES"), text),
        Tensor("b", from_v2("BOOL"), np.zeros(5, bool)),
    ]
    response = InferenceResponse("m", "1", outputs)
    decoded = _decoded(frozenset({"f", "s"}))
    written, header = codec.encode_infer_response(response, decoded)
    assert header is not None
    assert len(written) - header == 8000 + 2 * 4 + 2 + 9
    bounds = codec.answer_bounds(response, decoded)
    assert bounds.least <= len(written) <= bounds.most
    assert bounds.most - bounds.least == (5 - 4) * 5  # only the BOOL data is not exact: "false" or "true"


def test_an_answer_whose_smallest_text_is_over_the_limit_is_refused_before_encoding() -> None:
    text = np.array([b"\x01" * 1000] * 600, dtype=object)  # 600 KB of tensor, 3.6 MB of JSON
    response = InferenceResponse("m", "1", [Tensor("s", from_v2("BYTES"), text)])
    size = codec.answer_bounds(response, _decoded()).least
    assert size > 6 * 600_000
    with pytest.raises(TooLargeError, match=f"would be {size} bytes encoded as KServe V2 JSON, above the limit"):
        codec.infer_response_size(response, _decoded(), 1_000_000)
    assert codec.infer_response_size(response, _decoded(), size) == size
    assert len(codec.encode_infer_response(response, _decoded(), size)[0]) == size


def test_an_answer_past_the_limit_is_refused_while_it_is_written() -> None:
    response = InferenceResponse("m", "1", [Tensor("y", from_v2("FP64"), np.full(300_000, -1e-300))])
    full = len(codec.encode_infer_response(response, _decoded())[0])
    bounds = codec.answer_bounds(response, _decoded())
    assert bounds.least < 1_000_000 < full
    assert codec.infer_response_size(response, _decoded(), 1_000_000) == 1_000_000  # held: at most the limit
    with pytest.raises(TooLargeError, match="more than 1000000 bytes encoded as KServe V2 JSON"):
        codec.encode_infer_response(response, _decoded(), 1_000_000)
    assert len(codec.encode_infer_response(response, _decoded(), full)[0]) == full
    binary = _decoded(frozenset({"y"}))
    raw = len(codec.encode_infer_response(response, binary)[0])
    with pytest.raises(TooLargeError, match="KServe V2 JSON"):
        codec.encode_infer_response(response, binary, raw - 1)
