"""A large ModelInferRequest is decoded without copying its raw tensor bytes (``v2_grpc.raw_contents``),
and a parse that runs out of memory is RESOURCE_EXHAUSTED, not "malformed" (issue 14, outside attack rt8)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from onnxserve.errors import InvalidInputError
from onnxserve.protocols.v2_grpc import codec, raw_contents, servicer
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

LARGE = 300_000  # FP32 elements: 1.2 MB, above raw_contents.SPLIT_BYTES


def _request(*arrays: np.ndarray, request_id: str = "abc") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", model_version="2", id=request_id)
    request.parameters["priority"].int64_param = 3
    for index, array in enumerate(arrays):
        datatype = {"float32": "FP32", "int64": "INT64", "uint8": "UINT8"}[str(array.dtype)]
        request.inputs.add(name=f"x{index}", datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    request.outputs.add(name="y")
    return request


def _within(array: np.ndarray, data: bytes) -> bool:
    """Whether ``array``'s elements lie inside the buffer of ``data``."""
    return np.shares_memory(array, np.frombuffer(data, dtype=np.uint8))


def _aligned_message(x: np.ndarray) -> bytes:
    """A message of one raw input ``x`` whose values lie where they can be read in place (the id's length
    moves them), so they are viewed, not copied aligned."""
    for length in range(8):
        data = _request(x, request_id="i" * length).SerializeToString()
        start = data.index(x.tobytes())
        if (np.frombuffer(data, dtype=np.uint8).ctypes.data + start) % x.dtype.itemsize == 0:
            return data
    raise AssertionError("no id length places the values aligned")


def test_a_large_messages_raw_tensors_view_the_received_bytes() -> None:
    x = np.arange(LARGE, dtype=np.float32).reshape(3, -1)
    data = _aligned_message(x)
    message, raw = servicer.parse_inference(data)
    assert raw is not None
    assert len(message.raw_input_contents) == 0  # protobuf never copied them
    decoded = codec.decode_infer_request(message, raw)
    assert decoded.raw
    request = decoded.request
    assert (request.model_name, request.model_version, request.parameters) == ("m", "2", {"priority": 3})
    assert request.outputs == ["y"]
    (tensor,) = request.inputs
    assert tensor.data.tolist() == x.tolist()
    assert _within(tensor.data, data)


def test_a_large_message_decodes_every_raw_input_aligned_wherever_it_lies() -> None:
    x = np.arange(LARGE, dtype=np.float32).reshape(3, -1)
    ids = np.array([5, -6], dtype=np.int64)
    for length in range(8):
        data = _request(x, ids, request_id="i" * length).SerializeToString()
        message, raw = servicer.parse_inference(data)
        decoded = codec.decode_infer_request(message, raw).request
        assert decoded.id == "i" * length or (length == 0 and decoded.id is None)
        first, second = decoded.inputs
        assert first.data.flags.aligned
        assert second.data.flags.aligned
        assert first.data.tolist() == x.tolist()
        assert second.data.tolist() == ids.tolist()


def test_split_keeps_every_other_field_in_order_wherever_raw_contents_appear() -> None:
    x = np.arange(LARGE, dtype=np.float32)
    small = np.arange(7, dtype=np.uint8)
    whole = _request(x, small)
    # raw contents first, then the rest, then more raw contents: protobuf accepts any field order
    first, second = whole.raw_input_contents
    head = pb.ModelInferRequest()
    head.raw_input_contents.append(first)
    rest = pb.ModelInferRequest()
    rest.CopyFrom(whole)
    del rest.raw_input_contents[:]
    tail = pb.ModelInferRequest()
    tail.raw_input_contents.append(second)
    data = head.SerializeToString() + rest.SerializeToString() + tail.SerializeToString()
    parts = raw_contents.split(data)
    assert parts is not None
    assert [bytes(v) for v in parts.raw] == [first, second]
    assert pb.ModelInferRequest.FromString(parts.rest) == rest
    assert all(v.obj is data for v in parts.raw)


@pytest.mark.parametrize(
    "data",
    [
        _request(np.arange(10, dtype=np.float32)).SerializeToString(),  # small: parsed whole
        b"\x3a\xff\xff\xff\x7f" + bytes(raw_contents.SPLIT_BYTES),  # a length past the end
        b"\x3f" + bytes(raw_contents.SPLIT_BYTES),  # wire type 7 does not exist
        b"\x08\x01" * raw_contents.MAX_TOP_FIELDS + b"\x3a\x01x",  # more fields than a request has
    ],
    ids=["small", "length-past-end", "bad-wire-type", "field-flood"],
)
def test_messages_the_walk_does_not_take_are_parsed_whole(data: bytes) -> None:
    assert raw_contents.split(data) is None


def test_a_malformed_large_message_is_still_named_malformed() -> None:
    data = _request(np.arange(LARGE, dtype=np.float32)).SerializeToString()
    with pytest.raises(InvalidInputError, match="malformed ModelInferRequest protobuf"):
        servicer.parse_inference(data[:-10])


def test_a_parse_that_runs_out_of_memory_is_resource_exhausted_not_malformed() -> None:
    """Under an address-space cap a valid typed message of 48 MB cannot be parsed: upb reports its failed
    allocation as a parse error, which must not reach the client as INVALID_ARGUMENT."""
    script = textwrap.dedent(
        """
        import resource
        import numpy as np
        from onnxserve.errors import OnnxServeError
        from onnxserve.protocols.v2_grpc import servicer
        from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

        from onnxserve.protocols.v2_grpc.wire_size import field_header

        fp32 = pb.InferTensorContents.DESCRIPTOR.fields_by_name["fp32_contents"].number
        values = np.ones(12_000_000, dtype="<f4").tobytes()
        contents = field_header(fp32, len(values)) + values
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[12_000_000])
        tensor_bytes = tensor.SerializeToString() + field_header(5, len(contents)) + contents
        head = pb.ModelInferRequest(model_name="m").SerializeToString()
        data = head + field_header(5, len(tensor_bytes)) + tensor_bytes
        del values, contents, tensor_bytes
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + 16 * 2**20, resource.RLIM_INFINITY))
        try:
            servicer.parse_inference(data)
            print("parsed")
        except OnnxServeError as e:
            print(e.kind.name, e.message)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = "RESOURCE_EXHAUSTED the server has no memory to decode this gRPC message now; retry later"
    assert done.stdout.strip() == expected, done.stdout
