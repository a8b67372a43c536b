"""KServe V2 REST endpoints: each one decodes, calls the InferenceService, and encodes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from onnxserve.core.wire import output_bytes
from onnxserve.errors import InvalidInputError, OnnxServeError
from onnxserve.protocols import inflight, offload
from onnxserve.protocols.http import body_bytes, guarded, json_body
from onnxserve.protocols.v2_rest import codec

if TYPE_CHECKING:
    from onnxserve.core.service import InferenceService

PROTOCOL = "v2_rest"
"""The protocol label of this front end's requests, as the codec tags them."""


def json_response(doc: Any, status: int = 200) -> Response:
    return json_body(codec.dumps(doc), status)


def _status(ok: bool) -> Response:
    return Response(status_code=200 if ok else 503)


def _version(request: Request) -> str | None:
    version: str | None = request.path_params.get("version")
    return version


def routes(service: InferenceService) -> list[Route]:
    """Every endpoint; the service counts each inference request (``guarded(..., service=service)``)."""

    async def live(request: Request) -> Response:
        return _status(service.live())

    async def ready(request: Request) -> Response:
        return _status(service.ready())

    async def server_metadata(request: Request) -> Response:
        return json_response(codec.encode_server_metadata(service.server_metadata()))

    async def model_ready(request: Request) -> Response:
        return _status(service.model_ready(request.path_params["name"], _version(request)))

    async def model_metadata(request: Request) -> Response:
        meta = service.model_metadata(request.path_params["name"], _version(request))
        return json_response(codec.encode_model_metadata(meta))

    async def model_config(request: Request) -> Response:
        config = service.model_configuration(request.path_params["name"], _version(request))
        return json_response(codec.encode_model_configuration(config))

    async def statistics(request: Request) -> Response:
        stats = service.model_statistics(request.path_params.get("name", ""), _version(request))
        return json_response(codec.encode_statistics(stats))

    async def repository_index(request: Request) -> Response:
        ready_only = codec.decode_repository_index_request(await request.body())
        return json_response(codec.encode_repository_index(await service.repository_index(ready_only)))

    async def load(request: Request) -> Response:
        await service.load_model(request.path_params["name"], codec.decode_load_request(await request.body()))
        return json_response({})

    async def unload(request: Request) -> Response:
        await service.unload_model(request.path_params["name"])
        return json_response({})

    async def infer(request: Request) -> Response:
        body = await body_bytes(request)
        header_length = _header_length(request)
        decoded = await offload.parse(
            codec.decode_work(body, header_length),
            codec.decode_infer_request,
            body,
            request.path_params["name"],
            _version(request),
            header_length,
        )
        response = await service.infer(decoded.request)
        # Counted before it is encoded, at the most its encoding may take, held until it is sent. A refused
        # answer is dropped before the raise (the error's traceback keeps this frame).
        limit = service.max_response_bytes
        try:
            size = await offload.convert(output_bytes(response), codec.infer_response_size, response, decoded, limit)
            if (refused := inflight.hold_answer(size)) is not None:
                raise refused
            payload, json_length = inflight.held(
                await offload.convert(
                    codec.encode_work(response, decoded), codec.encode_infer_response, response, decoded, limit
                ),
                _payload_length,
            )
        except OnnxServeError:
            del response
            raise
        del response
        if json_length is None:
            return json_body(payload)
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={codec.HEADER_LENGTH: str(json_length)},
        )

    model_paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    table: list[Route] = [
        Route("/v2/health/live", guarded(live), methods=["GET"]),
        Route("/v2/health/ready", guarded(ready), methods=["GET"]),
        Route("/v2", guarded(server_metadata), methods=["GET"]),
        Route("/v2/models/stats", guarded(statistics), methods=["GET"]),
        Route("/v2/repository/index", guarded(repository_index), methods=["POST"]),
        Route("/v2/repository/models/{name}/load", guarded(load), methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", guarded(unload), methods=["POST"]),
    ]
    for base in model_paths:
        table += [
            Route(base, guarded(model_metadata), methods=["GET"]),
            Route(f"{base}/ready", guarded(model_ready), methods=["GET"]),
            Route(f"{base}/config", guarded(model_config), methods=["GET"]),
            Route(f"{base}/stats", guarded(statistics), methods=["GET"]),
        ]
    # The inference routes first: Starlette tries routes in order, and no other route's path matches
    # theirs, so they are found at the first tries instead of after a dozen.
    infer_routes = [
        Route(f"{base}/infer", guarded(infer, protocol=PROTOCOL, service=service), methods=["POST"])
        for base in model_paths
    ]
    return infer_routes + table


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(codec.HEADER_LENGTH)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(f"{codec.HEADER_LENGTH} must be an integer, got {raw!r}") from None


def _payload_length(encoded: tuple[bytes, int | None]) -> int:
    return len(encoded[0])
