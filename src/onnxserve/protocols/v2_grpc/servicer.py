"""The ``inference.GRPCInferenceService`` handlers: decode, call the InferenceService, encode.

Handlers receive the request as bytes and parse it themselves, so a malformed protobuf is answered
with INVALID_ARGUMENT and a message, rather than gRPC's generic deserialization failure.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from onnxserve.core.service import InferenceService
from onnxserve.errors import InvalidInputError, OnnxServeError
from onnxserve.protocols.errors import GRPC_STATUS
from onnxserve.protocols.v2_grpc import codec
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"

M = TypeVar("M", bound=Message)
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


def parse(message_type: type[M], data: bytes) -> M:
    try:
        message: M = message_type.FromString(data)
        return message
    except DecodeError as e:
        raise InvalidInputError(f"malformed {message_type.__name__} protobuf: {e}") from None


class InferenceServicer:
    """One method per RPC; each takes the parsed request and returns the response message."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

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
        for entry in self.service.repository_index(ready_only=request.ready):
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response

    async def ModelInfer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        decoded = codec.decode_infer_request(request)
        response = await self.service.infer(decoded.request)
        return codec.encode_infer_response(response, decoded.raw)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answers each request in order; an error answers that request only and the stream goes on.

        An error answer carries the request's id, model name and version (when the request parsed),
        so a client can match it like a success.
        """
        async for data in requests:
            request: pb.ModelInferRequest | None = None
            try:
                request = parse(pb.ModelInferRequest, data)
                yield pb.ModelStreamInferResponse(infer_response=await self.ModelInfer(request))
            except Exception as e:
                if isinstance(e, OnnxServeError):
                    message = e.message
                else:
                    log.exception("unexpected error in ModelStreamInfer")
                    message = "internal server error"
                echo = pb.ModelInferResponse()
                if request is not None:
                    echo = pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id
                    )
                yield pb.ModelStreamInferResponse(error_message=message, infer_response=echo)


_UNARY: dict[str, type[Message]] = {
    "ServerLive": pb.ServerLiveRequest,
    "ServerReady": pb.ServerReadyRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ServerMetadata": pb.ServerMetadataRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelConfig": pb.ModelConfigRequest,
    "ModelStatistics": pb.ModelStatisticsRequest,
    "RepositoryIndex": pb.RepositoryIndexRequest,
    "ModelInfer": pb.ModelInferRequest,
}


def _unary(method: Callable[[Any], Awaitable[Message]], request_type: type[Message]) -> Handler:
    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            return await method(parse(request_type, data))
        except OnnxServeError as e:
            await context.abort(GRPC_STATUS[e.kind], e.message)
        except Exception:
            log.exception("unexpected error in %s", request_type.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        raise AssertionError("context.abort returns only by raising")

    return handler


def generic_handler(service: InferenceService) -> grpc.GenericRpcHandler:
    servicer = InferenceServicer(service)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name), request_type), response_serializer=lambda m: m.SerializeToString()
        )
        for name, request_type in _UNARY.items()
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer, response_serializer=lambda m: m.SerializeToString()
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
