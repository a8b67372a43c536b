"""OpenAI-compatible endpoints: each one decodes, calls the InferenceService (through
``protocols.embeddings``), and encodes.

``GET /v1/models/{name}`` is TF Serving's model status too: for a model that takes text it answers one
document holding both TF Serving's ``model_version_status`` and OpenAI's model object (``id``,
``object``, ``created``, ``owned_by``), so each client reads the keys it knows; for a tensor model
(never listed by ``GET /v1/models``) TF Serving's status alone. Errors there keep TF Serving's shape.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from onnxserve.errors import ModelNotFoundError, OnnxServeError
from onnxserve.protocols import offload
from onnxserve.protocols.embeddings import embed, embedding_model, text_models
from onnxserve.protocols.errors import OPENAI_HTTP_STATUS, TFSERVING_HTTP_STATUS
from onnxserve.protocols.http import body_bytes, guarded, json_body
from onnxserve.protocols.openai import codec
from onnxserve.protocols.tfserving_rest import codec as tfserving
from onnxserve.protocols.tfserving_rest.routes import BASES

if TYPE_CHECKING:
    from onnxserve.core.service import InferenceService

PATHS = ("/v1/embeddings", "/v1/models")
"""The paths whose errors (including refused tokens) take OpenAI's shape."""


def _takes_text(service: InferenceService, name: str) -> bool:
    try:
        return service.model_metadata(name).pipeline is not None
    except OnnxServeError:  # no ready version: the status says so, in TF Serving's words alone
        return False


def routes(service: InferenceService) -> list[Route]:
    created = int(time.time())

    async def embeddings(request: Request) -> Response:
        body = await body_bytes(request)
        decoded = await offload.parse(len(body), codec.decode_embeddings, body)
        model = embedding_model(service, decoded.model)
        embedded = await embed(service, model, decoded.inputs, codec.PROTOCOL, decoded.dimensions)
        return codec.encode_embeddings(decoded.model, embedded, decoded.encoding_format)

    async def models(request: Request) -> Response:
        return codec.encode_models(text_models(service), created)

    async def model(request: Request) -> Response:
        name: str = request.path_params["name"]
        states = service.version_states(name)
        if not states:
            raise ModelNotFoundError(f"model {name!r} has no versions")
        document = tfserving.encode_status(states)
        if _takes_text(service, name):
            document.update(codec.model_object(name, created))
        return json_body(orjson.dumps(document))

    return [
        Route(
            "/v1/embeddings",
            guarded(
                embeddings,
                OPENAI_HTTP_STATUS,
                protocol=codec.PROTOCOL,
                service=service,
                render=codec.render_error,
            ),
            methods=["POST"],
        ),
        Route("/v1/models", guarded(models, OPENAI_HTTP_STATUS, render=codec.render_error), methods=["GET"]),
        Route(BASES[0], guarded(model, TFSERVING_HTTP_STATUS), methods=["GET"]),
    ]
