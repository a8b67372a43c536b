"""Typed-contents gRPC tensors (``fp32_contents``, ``int64_contents``...) keep their values both ways, on
tensors larger than one slice of the answer's packed encoding (``wire_size.SLICE_ELEMENTS``), with no Python
object per element held at once (F9: a 60 MB FP32 answer took 450 MB more than its size)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxserve.core import datatypes
from onnxserve.core.types import InferenceResponse, Tensor
from onnxserve.protocols.v2_grpc import codec, wire_size
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

SIZE = 2 * wire_size.SLICE_ELEMENTS + 3  # crosses two slice boundaries


@pytest.mark.parametrize("v2", ["BOOL", "INT8", "INT32", "INT64", "UINT16", "UINT64", "FP32", "FP64"])
def test_typed_contents_round_trip_equal(v2: str) -> None:
    dtype = datatypes.from_v2(v2)
    rng = np.random.default_rng(1)
    if dtype.numpy.kind == "f":
        values = rng.standard_normal(SIZE).astype(dtype.numpy)
    elif dtype.numpy.kind == "b":
        values = rng.integers(0, 2, SIZE).astype(bool)
    else:
        info = np.iinfo(dtype.numpy)
        values = rng.integers(info.min, info.max, SIZE, dtype=dtype.numpy, endpoint=True)
    request = pb.ModelInferRequest(model_name="m")
    contents = request.inputs.add(name="x", datatype=v2, shape=[1, SIZE]).contents
    codec._fill_contents(contents, Tensor("x", dtype, values))
    decoded = codec.decode_infer_request(request).request.inputs[0].data
    assert decoded.dtype == dtype.numpy
    assert np.array_equal(decoded.ravel(), values)
    answer = codec.encode_infer_response(InferenceResponse("m", "1", [Tensor("y", dtype, decoded)]), raw=False)
    back = np.asarray(getattr(answer.outputs[0].contents, codec.CONTENTS_FIELD[v2])).astype(dtype.numpy)
    assert list(answer.outputs[0].shape) == [1, SIZE]
    assert np.array_equal(back, values)
