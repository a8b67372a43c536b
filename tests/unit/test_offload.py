"""offload.parse: a large JSON body is decoded in a worker process, with the same result and the same
errors (their messages and attributes) as a small one decoded here."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from onnxserve.errors import InvalidInputError, OnnxServeError
from onnxserve.protocols import offload
from onnxserve.protocols.openai import codec as openai
from onnxserve.protocols.public_errors import public_message
from onnxserve.protocols.v2_rest import codec as v2

LARGE = offload.PROCESS_BYTES + 1024


def _embeddings_body(size: int, extra: str = "") -> bytes:
    ids = [7] * max(1, size // 3)
    doc = {"model": "m", "input": [ids[: len(ids) // 2], ids[len(ids) // 2 :]]}
    if extra:
        doc[extra] = 1
    return orjson.dumps(doc)


def _parse(body: bytes) -> openai.EmbeddingsRequest:
    return asyncio.run(offload.parse(len(body), openai.decode_embeddings, body))


def test_a_large_body_comes_back_decoded_with_token_ids_as_arrays() -> None:
    try:
        decoded = _parse(_embeddings_body(LARGE))
        small = openai.decode_embeddings(_embeddings_body(LARGE))
    finally:
        offload.shutdown()
    assert decoded.model == "m"
    assert [len(r) for r in decoded.inputs] == [len(r) for r in small.inputs]
    assert all(isinstance(r, np.ndarray) and r.dtype == np.int64 for r in decoded.inputs)


def test_an_error_raised_in_the_worker_keeps_its_type_message_and_parameter() -> None:
    errors = []
    try:
        for size in (100, LARGE):
            with pytest.raises(openai.ParameterError) as refused:
                _parse(_embeddings_body(size, "bogus"))
            errors.append(refused.value)
        body = b'{"inputs": [' + b"1.5, " * (LARGE // 5) + b"]"
        with pytest.raises(InvalidInputError, match="not valid JSON"):
            asyncio.run(offload.parse(len(body), v2.decode_infer_request, body, "m", None, None))
    finally:
        offload.shutdown()
    assert [(type(e), e.message, e.param) for e in errors] == [(openai.ParameterError, errors[0].message, "bogus")] * 2


def _kinds(base: type[OnnxServeError]) -> list[type[OnnxServeError]]:
    found = [base]
    for kind in base.__subclasses__():
        found += _kinds(kind)
    return found


@pytest.mark.parametrize("kind", _kinds(OnnxServeError), ids=lambda k: k.__name__)
def test_every_error_kind_a_worker_sends_back_is_rebuilt_with_its_message(kind: type[OnnxServeError]) -> None:
    # a worker that runs out of memory sends its refusal with no state of the error's own
    rebuilt = offload.Refusal(kind, "what went wrong", {}).error()
    assert type(rebuilt) is kind
    assert rebuilt.message == "what went wrong"
    assert public_message(rebuilt) == "what went wrong"
    assert str(rebuilt) == "what went wrong"


def _dense(size: int, item: bytes) -> bytes:
    """A V2 body of ``size`` bytes at most whose tensor data is ``item`` repeated."""
    head, tail = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":[', b"]}]}"
    return head + b",".join([item] * ((size - len(head) - len(tail)) // (len(item) + 1))) + tail


def test_a_body_under_the_size_threshold_dense_with_arrays_is_decoded_in_a_worker() -> None:
    """The size threshold alone let 1.4 M empty lists in 4 MiB - 1 be parsed in the server (an outside
    attack held probes 2-3 s with 24 of them); counted '[' and '{' send such a body to a worker."""
    under = offload.PROCESS_BYTES - 1
    assert offload.decodes_in_worker(under, _dense(under, b"[]"))
    assert offload.decodes_in_worker(under, _dense(under, b'""'))  # strings do not (an outside attack)
    texts = (
        b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[2000],"data":['
        + b",".join([b'"' + b"a" * 50 + b'"'] * 2000)
        + b"]}]}"
    )
    assert not offload.decodes_in_worker(len(texts), texts)  # ordinary text requests are decoded inline
    assert offload.decodes_in_worker(offload.PROCESS_BYTES, _dense(offload.PROCESS_BYTES, b"1.5"))
    # an empty list costs its comma and CONTAINER_VALUES (the outer list its CONTAINER_VALUES, no comma)
    lists = (offload.INLINE_VALUES - offload.CONTAINER_VALUES + 1) // (offload.CONTAINER_VALUES + 1)
    few = b"[" + b",".join([b"[]"] * lists) + b"]"
    assert offload.decode_cost(few, len(few)) <= offload.INLINE_VALUES
    assert not offload.decodes_in_worker(len(few), few)
    many = b"[" + b",".join([b"[]"] * (lists + 1)) + b"]"
    assert offload.decodes_in_worker(len(many), many)
    # a binary-extension body counts only its JSON header (the size given)
    assert not offload.decodes_in_worker(len(few), few + b"[" * 100_000)


def test_a_body_under_the_size_threshold_dense_with_numbers_is_decoded_in_a_worker() -> None:
    """Numbers were not counted: 48 bodies of 4 MiB - 1 bytes of two million numbers each held probes 1.2 to
    2.5 s (an outside attack, V2 and TF Serving); their commas are counted now."""
    under = offload.PROCESS_BYTES - 1
    assert offload.decodes_in_worker(under, _dense(under, b"0"))
    assert offload.decodes_in_worker(under, _dense(under, b"1.5e-3"))
    rows = b'{"instances":[[' + b",".join([b"0"] * (under // 2 - 20)) + b"]]}"  # TF Serving
    assert len(rows) < offload.PROCESS_BYTES
    assert offload.decodes_in_worker(len(rows), rows)
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1],"data":['  # 4 commas, 5 [ and {, 7 strings
    overhead = 4 + offload.CONTAINER_VALUES * 5 + offload.STRING_VALUES * 7

    def floats(count: int) -> bytes:
        return head + b",".join([b"1.5"] * count) + b"]}]}"

    inline = floats(offload.INLINE_VALUES - overhead + 1)  # count - 1 commas in its data
    assert offload.decode_cost(inline, len(inline)) == offload.INLINE_VALUES
    assert not offload.decodes_in_worker(len(inline), inline)
    one_more = floats(offload.INLINE_VALUES - overhead + 2)
    assert offload.decodes_in_worker(len(one_more), one_more)


def test_small_and_ordinary_bodies_are_decoded_in_the_server() -> None:
    """The latency path: no hop for small requests (a [1,16] FP32 body, a 12-word text: not even counted),
    nor for a 1 MiB FP32 body as perf_analyzer sends it (95 thousand numbers)."""
    small = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.5] * 16}]})
    text = orjson.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["word " * 12]}]})
    for body in (small, text, b"[" * offload.INLINE_SCAN_BYTES):
        assert not offload.decodes_in_worker(len(body), body)
    values = np.random.default_rng(1).random((1024 * 1024) // 11).astype(np.float32)
    perf = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [values.size], "data": values}]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    assert 0.9 * 1024 * 1024 < len(perf) < offload.PROCESS_BYTES
    assert not offload.decodes_in_worker(len(perf), perf)


def test_a_dense_body_decoded_in_a_worker_gives_the_same_request_and_errors() -> None:
    rows = offload.INLINE_VALUES // (offload.CONTAINER_VALUES + 1) + 10
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 1], "data": [[float(i)] for i in range(rows)]}]}
    body = orjson.dumps(doc)
    assert len(body) < offload.PROCESS_BYTES
    assert offload.decodes_in_worker(len(body), body)
    empties = _dense(offload.PROCESS_BYTES - 1, b"[]")
    try:
        decoded = asyncio.run(offload.parse(len(body), v2.decode_infer_request, body, "m", None, None))
        assert offload._pool._idle, "the body was decoded by a worker process"
        with pytest.raises(InvalidInputError) as refused:
            asyncio.run(offload.parse(len(empties), v2.decode_infer_request, empties, "m", None, None))
    finally:
        offload.shutdown()
    (tensor,) = decoded.request.inputs
    np.testing.assert_array_equal(tensor.data, np.arange(rows, dtype=np.float32).reshape(rows, 1))
    with pytest.raises(InvalidInputError) as inline:
        v2.decode_infer_request(empties, "m", None, None)
    assert refused.value.message == inline.value.message
