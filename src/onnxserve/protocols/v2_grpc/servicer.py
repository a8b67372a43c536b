"""The ``inference.GRPCInferenceService`` handlers: decode, call the InferenceService, encode.

Handlers receive the request as bytes and parse it themselves, so a malformed protobuf is answered
with INVALID_ARGUMENT and a message, rather than gRPC's generic deserialization failure.

Every call has a request id: the client's ``x-request-id`` metadata when usable, else a new one. It is
sent back in the trailing metadata (errors too) and carried by every log line made while handling it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from onnxserve.core.memory import release_frames, short_of_memory
from onnxserve.core.wire import output_bytes, response_too_large
from onnxserve.errors import InvalidInputError, OnnxServeError, TooLargeError
from onnxserve.log_throttle import log_unexpected
from onnxserve.protocols import context, inflight, offload
from onnxserve.protocols.errors import GRPC_STATUS
from onnxserve.protocols.public_errors import public_message, redact_paths
from onnxserve.protocols.v2_grpc import codec, element_count, raw_contents
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from onnxserve.core.service import InferenceCall, InferenceService
    from onnxserve.core.types import InferenceResponse

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
PROTOCOL = "v2_grpc"

_time_left: ContextVar[float | None] = ContextVar("onnxserve_grpc_time_left", default=None)
"""Seconds the unary call being handled has left before its client's deadline (None: no deadline)."""

_wire_size: ContextVar[int] = ContextVar("onnxserve_grpc_wire_size", default=0)
"""Bytes of the request message being handled: a large one is decoded off the event loop."""

MAX_CONTROL_MESSAGE_BYTES = 64 * 1024
"""The largest request message of any method but ModelInfer (names, versions, a few parameters). protobuf
parses a message in one call that holds the interpreter lock, and a map of a million entries takes seconds:
a 62 MB RepositoryModelLoad of 4.4 million parameters stood the whole server still 6.7 s a call, its HTTP
health probes with it, and grew it past 1.5 GB (outside attack rt53). A ModelInfer request's lists are
counted before it is parsed (``element_count``)."""

DECODE_BYTES_PER_ENTRY = 256
"""What decoding one tensor or parameter of a request counts as, in bytes of message, where the decode's place
is chosen (``offload.INLINE_BYTES``: on the event loop below it): a message of 18,723 empty inputs (256 KB,
584 bytes gzipped) was decoded on the loop, 0.15 s each, and one client's stream of them held every new
gRPC call past 5 s (outside attack rt56)."""

M = TypeVar("M", bound=Message)
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message | bytes]]


def parse(message_type: type[M], data: bytes, walked: bool = False) -> M:
    """The message in ``data``; an inference request is first checked for element floods (unparsed, unless
    ``walked`` already), and its lists and parameter maps counted once parsed (``element_count.check_entries``)."""
    if message_type is pb.ModelInferRequest:
        if not walked:
            element_count.check_unparsed(data)
    elif len(data) > MAX_CONTROL_MESSAGE_BYTES:
        raise InvalidInputError(
            f"a {message_type.__name__} of {len(data):,} bytes; a request other than ModelInfer may have at most "
            f"{MAX_CONTROL_MESSAGE_BYTES:,}"
        )
    try:
        message: M = message_type.FromString(data)
    except MemoryError:
        raise inflight.no_memory("to decode this gRPC message") from None
    except DecodeError as e:
        # protobuf (upb) reports a failed allocation as "Error parsing message" too: a message that parses
        # once there is room again was never malformed (a small one too: a message of packed numbers takes
        # eight times its size once parsed).
        if short_of_memory(len(data)):
            raise inflight.no_memory("to decode this gRPC message") from None
        try:
            message = message_type.FromString(data)
        except (DecodeError, MemoryError):
            if short_of_memory(len(data)):
                raise inflight.no_memory("to decode this gRPC message") from None
            raise InvalidInputError(f"malformed {message_type.__name__} protobuf: {e}") from None
    if isinstance(message, pb.ModelInferRequest):
        element_count.check_entries(message)  # a small message is not walked before parsing
    return message


def parse_inference(data: bytes) -> tuple[pb.ModelInferRequest, list[memoryview] | None]:
    """A ModelInferRequest, and its ``raw_input_contents`` as views of ``data`` when it is large (None:
    the message's own): such a message's tensor bytes are not copied (``raw_contents``)."""
    element_count.check_unparsed(data)
    parts = raw_contents.split(data)
    if parts is None:
        return parse(pb.ModelInferRequest, data, walked=True), None
    return parse(pb.ModelInferRequest, parts.rest, walked=True), parts.raw


def decode_work(message: pb.ModelInferRequest, wire_size: int) -> int:
    """What decoding a parsed request of ``wire_size`` bytes counts as, in bytes of work, where the decode's
    place is chosen (``offload.convert``): its size, or its tensors and parameters, and its BYTES elements."""
    tensors = len(message.inputs) + len(message.outputs) + len(message.parameters)
    work = max(wire_size, tensors * DECODE_BYTES_PER_ENTRY)
    if work < offload.INLINE_BYTES:  # a few tensors: their BYTES elements count too, typed or raw
        raw = message.raw_input_contents
        elements = sum(len(t.contents.bytes_contents) for t in message.inputs)
        elements += sum(  # as many as 4-byte length prefixes fit (outside attack rt58: 65,500 raw ones, 40 ms)
            len(raw[i]) // 4 for i, t in enumerate(message.inputs) if i < len(raw) and t.datatype == "BYTES"
        )
        work += offload.BYTES_ELEMENT_WORK * elements
    return work


def _request_id(grpc_context: grpc.aio.ServicerContext) -> str:
    """The client's ``x-request-id`` when usable, else a new id; sent back in the trailing metadata."""
    given = next(
        (
            v
            for k, v in grpc_context.invocation_metadata() or ()
            if k == context.REQUEST_ID_METADATA and isinstance(v, str)
        ),
        None,
    )
    request_id = context.accept_request_id(given)
    grpc_context.set_trailing_metadata(((context.REQUEST_ID_METADATA, request_id),))
    return request_id


async def _parse_inference(call_scope: InferenceCall, data: bytes) -> Received:
    """Parse a ModelInferRequest inside its ``InferenceCall``, which then knows the model it names."""
    request, raw = await offload.convert(len(data), parse_inference, data)
    call_scope.target(request.model_name, request.model_version)
    return Received(request, raw)


@dataclass
class Received:
    """A parsed ModelInferRequest; a large one's raw contents apart, as views of the received bytes."""

    message: pb.ModelInferRequest
    raw: list[memoryview] | None  # None: the message's own ``raw_input_contents``


class InferenceServicer:
    """One method per RPC; each takes the parsed request and returns the response message.

    Each inference request (ModelInfer, and each message of ModelStreamInfer) is an ``InferenceCall``
    of the service, from its bytes to its answer: the service counts it once however it ends.
    """

    def __init__(self, service: InferenceService, max_send_bytes: int = 0) -> None:
        self.service = service
        self.max_send_bytes = max_send_bytes  # the largest message grpc will send (0: no limit)

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.service.live())

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return codec.encode_server_metadata(self.service.server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        return codec.encode_model_metadata(self.service.model_metadata(request.name, request.version or None))

    async def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        return codec.encode_model_configuration(self.service.model_configuration(request.name, request.version or None))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        return codec.encode_statistics(self.service.model_statistics(request.name, request.version or None))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in await self.service.repository_index(ready_only=request.ready):
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=redact_paths(entry.reason)
            )
        return response

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        await self.service.load_model(request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
        await self.service.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest | Received) -> pb.ModelInferResponse:
        """The answer as a message (a ModelStreamInfer answer holds it)."""
        plan, response = await self._planned(request)
        encoded = await offload.convert(plan.size, codec.fill_infer_response, plan, response)
        del response, plan
        return encoded

    async def serialized_infer(self, request: pb.ModelInferRequest | Received) -> bytes:
        """The unary ModelInfer's answer, serialized here (off the event loop when large; grpc would do it on
        the loop), a raw answer without building its values into a message first."""
        plan, response = await self._planned(request)
        serialized = await offload.convert(plan.size, codec.serialize_infer_response, plan, response)
        del response, plan
        return serialized

    async def _planned(
        self, request: pb.ModelInferRequest | Received
    ) -> tuple[codec.PlannedResponse, InferenceResponse]:
        """The answer computed, checked against every limit and held in the in-flight budget, planned."""
        received = request if isinstance(request, Received) else Received(request, None)
        del request
        message = received.message
        try:
            decoded = await offload.convert(
                decode_work(message, _wire_size.get()),
                codec.decode_infer_request,
                message,
                received.raw,
            )
        finally:
            received.raw = None  # the tensors hold what they need of the received bytes (views, or copies)
        time_left = _time_left.get()
        inference = decoded.request if time_left is None else replace(decoded.request, time_left=time_left)
        model_name, raw = inference.model_name, decoded.raw
        del decoded
        response = await self.service.infer(inference)
        del inference  # the request's tensors (and the received bytes they view) go before the answer is encoded
        # Counted before it is encoded, held until the call ends; a refused answer is dropped before the raise.
        if (refused := inflight.hold_answer(tensor_bytes := output_bytes(response))) is not None:
            del response
            raise refused
        # Its exact size on the wire is computed before a value is encoded (a typed INT8 answer can be ten
        # times its tensor): too large, or not fitting in the in-flight budget, it is refused unbuilt.
        plan = await offload.convert(tensor_bytes, codec.plan_infer_response, response, raw)
        size, limit = plan.size, self.service.max_response_bytes
        if self.max_send_bytes and size > self.max_send_bytes:
            # Refused here with a message that says why, not by grpc with an error in the log (and without
            # the answer: the error's traceback keeps this frame).
            del response, plan
            raise TooLargeError(
                f"model {model_name!r}: the gRPC response would be {size} bytes, above the "
                f"{self.max_send_bytes} bytes a gRPC message may take (--grpc-max-message-bytes); ask for "
                "less (smaller input values, fewer outputs)"
            )
        if 0 < limit < plan.values:  # the values as encoded; the envelope has room beyond the limit
            values = plan.values
            del response, plan
            raise response_too_large(model_name, values, limit, encoding="as gRPC protobuf")
        if (refused := inflight.hold_answer(size)) is not None:
            del response, plan
            raise refused
        return plan, response

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], grpc_context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers each request in order; an error answers that request only and the stream goes on.

        An error answer carries the request's id, model name and version (when the request parsed),
        so a client can match it like a success.
        """
        request_id = _request_id(grpc_context)
        client = context.client_identity(context.grpc_peer_host(grpc_context.peer()))
        async for data in requests:
            answer = self._stream_one(data, request_id, client)
            del data  # the received bytes live only as long as what is made of them
            yield await answer

    async def _stream_one(self, data: bytes, request_id: str, client: str) -> pb.ModelStreamInferResponse:
        id_token = context.set_request_id(request_id)
        request: pb.ModelInferRequest | None = None
        try:
            size_token = _wire_size.set(len(data))
            try:
                async with self.service.call(PROTOCOL, client=client) as call:
                    received = await _parse_inference(call, data)
                    del data
                    request = received.message
                    return pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(received))
            finally:
                _wire_size.reset(size_token)
        except Exception as e:
            error = inflight.no_memory("to handle this gRPC message") if isinstance(e, MemoryError) else e
            if isinstance(error, OnnxServeError):
                message = public_message(error)
            else:
                log_unexpected(log, "ModelStreamInfer", "unexpected error in ModelStreamInfer")
                message = "internal server error"
            del error  # nothing the message brought may stay reachable from a reference cycle (see _unary)
            release_frames(e)
            echo = pb.ModelInferResponse()
            if request is not None:
                echo = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
            return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)
        finally:
            context.reset_request_id(id_token)


_UNARY: dict[str, type[Message]] = {
    "ServerLive": pb.ServerLiveRequest,
    "ServerReady": pb.ServerReadyRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ServerMetadata": pb.ServerMetadataRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelConfig": pb.ModelConfigRequest,
    "ModelStatistics": pb.ModelStatisticsRequest,
    "RepositoryIndex": pb.RepositoryIndexRequest,
    "RepositoryModelLoad": pb.RepositoryModelLoadRequest,
    "RepositoryModelUnload": pb.RepositoryModelUnloadRequest,
    "ModelInfer": pb.ModelInferRequest,
}


def _unary(
    method: Callable[[Any], Awaitable[Message | bytes]],
    request_type: type[Message],
    counted_by: InferenceService | None = None,
) -> Handler:
    """The handler of one unary RPC; with ``counted_by`` it is an inference RPC (ModelInfer), each call an
    ``InferenceCall`` of that service."""
    name = request_type.__name__.removesuffix("Request")

    async def handler(data: bytes, grpc_context: grpc.aio.ServicerContext) -> Message | bytes:
        started = time.perf_counter_ns()
        request_id = _request_id(grpc_context)
        id_token = context.set_request_id(request_id)
        code = grpc.StatusCode.OK
        time_token = _time_left.set(grpc_context.time_remaining())
        size_token = _wire_size.set(len(data))
        # The received bytes live only as long as what is made of them: this frame lets go of them once
        # they are parsed, or failed to be (see the abort below).
        unparsed = [data]
        del data
        try:
            if counted_by is None:
                size = len(unparsed[0])
                return await method(await offload.convert(size, parse, request_type, unparsed.pop()))
            client = context.client_identity(context.grpc_peer_host(grpc_context.peer()))
            # Parsed and answered in a frame of its own: this one must not hold the parsed request (see below).
            return await _counted_inference(counted_by, client, method, unparsed.pop())  # serialized already
        except Exception as e:
            # Short of memory now (a large message under a tight limit): the client may retry later.
            error = inflight.no_memory("to handle this gRPC call") if isinstance(e, MemoryError) else e
            if isinstance(error, OnnxServeError):
                code, message = GRPC_STATUS[error.kind], public_message(error)
            else:
                log_unexpected(log, name, "unexpected error in %s", name)
                code, message = grpc.StatusCode.INTERNAL, "internal server error"
            # grpc keeps the abort's error, and through it this one and this frame, in a reference cycle until
            # the garbage collector runs: nothing the call received may stay reachable from them (a refused
            # 4 MB request kept its parsed 60 MB until then, outside every budget, when this frame held it).
            del error
            unparsed.clear()
            release_frames(e)
            await grpc_context.abort(code, message, ((context.REQUEST_ID_METADATA, request_id),))
            raise  # abort raises; this line only tells type checkers so
        finally:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("gRPC %s %s %.2f ms", name, code.name, (time.perf_counter_ns() - started) / 1e6)
            context.reset_request_id(id_token)
            _time_left.reset(time_token)
            _wire_size.reset(size_token)

    return handler


async def _counted_inference(
    service: InferenceService, client: str, method: Callable[[Any], Awaitable[Message | bytes]], data: bytes
) -> Message | bytes:
    """One inference call of ``service``, from its received bytes to ``method``'s answer. A refusal's
    traceback holds this frame and what it parsed: the caller drops the traceback (``release_frames``)."""
    async with service.call(PROTOCOL, client=client) as call:
        received = await _parse_inference(call, data)
        del data
        return await method(received)


def _serialize(message: Message | bytes) -> bytes:
    """A response message's bytes; an inference answer comes already serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def generic_handler(service: InferenceService, max_send_bytes: int = 0) -> grpc.GenericRpcHandler:
    """Every RPC of the service; the service counts each inference request. ``max_send_bytes``: the
    server's send limit, which an inference response is checked against before grpc sends it."""
    servicer = InferenceServicer(service, max_send_bytes)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(servicer.serialized_infer, request_type, service)
            if name == "ModelInfer"
            else _unary(getattr(servicer, name), request_type),
            response_serializer=_serialize,
        )
        for name, request_type in _UNARY.items()
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, response_serializer=lambda m: m.SerializeToString()
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
