"""TF Serving REST endpoints: each one decodes, calls the InferenceService, and encodes.

Every API answers on three paths: ``/v1/models/{name}`` (the highest ready version),
``.../versions/{v}`` and ``.../labels/{label}``; verbs follow a colon (``:predict``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from onnxserve.core.client_text import clipped, shown
from onnxserve.core.wire import output_bytes
from onnxserve.errors import InvalidInputError, ModelNotFoundError, OnnxServeError
from onnxserve.protocols import class_scores, inflight, offload
from onnxserve.protocols.errors import TFSERVING_HTTP_STATUS
from onnxserve.protocols.http import Endpoint, body_bytes, guarded, json_body
from onnxserve.protocols.tfserving_rest import codec

if TYPE_CHECKING:
    from onnxserve.core.service import InferenceService


class _Segment(Convertor[str]):
    """A path segment that stops at a colon, so ``/v1/models/m:predict`` names model ``m``."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _Version(Convertor[str]):
    """A version number segment, kept as text: the core parses it (``core.repository.version_number``),
    so a number too long for Python's int() is an unknown version (404), not a 500."""

    regex = "[0-9]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("tfs_segment", _Segment())
register_url_convertor("tfs_version", _Version())

BASES = (
    "/v1/models/{name:tfs_segment}",
    "/v1/models/{name:tfs_segment}/versions/{version:tfs_version}",
    "/v1/models/{name:tfs_segment}/labels/{label:tfs_segment}",
)


def _target(request: Request) -> tuple[str, str | None]:
    """The model name, and the version number or label the path names (None for the default)."""
    name: str = request.path_params["name"]
    params: dict[str, Any] = request.path_params
    if "version" in params:
        return name, str(params["version"])
    label: str | None = params.get("label")
    if label is not None and label.isdigit():
        raise ModelNotFoundError(
            f"model {shown(name)} has no label {shown(label)}; a version number goes in /versions/{clipped(label)}"
        )
    return name, label


def routes(service: InferenceService) -> list[Route]:
    """Every endpoint; the service counts each inference request (``guarded(..., service=service)``)."""

    async def status(request: Request) -> Response:
        name, version = _target(request)
        return json_body(codec.dumps(codec.encode_status(service.version_states(name, version))))

    async def metadata(request: Request) -> Response:
        name, version = _target(request)
        meta = service.model_metadata(name, version)
        return json_body(codec.dumps(codec.encode_metadata(meta)))

    async def predict(request: Request) -> Response:
        name, version = _target(request)
        meta = service.model_metadata(name, version)
        body = await body_bytes(request)
        # meta.version pins the version resolved here, so decode and inference see the same model
        decoded = await offload.parse(len(body), codec.decode_predict_body, body, meta, meta.version)
        response = await service.infer(decoded.request)
        # Counted before it is encoded, at the most its text may take, held until it is sent. A refused
        # answer is dropped before the raise (the error's traceback keeps this frame).
        limit = service.max_response_bytes
        try:
            size = await offload.convert(output_bytes(response), codec.predict_size, response, decoded.rows, limit)
            if (refused := inflight.hold_answer(size)) is not None:
                raise refused
            body = inflight.held(await offload.convert(size, codec.encode_predict, response, decoded.rows, limit), len)
        except OnnxServeError:
            del response
            raise
        del response
        return json_body(body)

    async def classify(request: Request) -> Response:
        name, version = _target(request)
        meta = service.model_metadata(name, version)
        body = await body_bytes(request)
        inference = await offload.parse(len(body), codec.decode_classify_body, body, meta, meta.version)
        form = class_scores.TF_CLASSIFY
        class_scores.refuse_before_run(meta, inference.inputs[0].shape[0], form, service.max_response_bytes)
        response = await service.infer(inference)
        scores = next(t.data for t in response.outputs if t.name == codec.CLASSIFY_OUTPUT)
        del response
        # One [label, score] per (example, class), named from the model's labels: bounded before it is
        # built, built and encoded a slice of rows at a time, off the event loop when large.
        assert meta.pipeline is not None
        labels, limit = meta.pipeline.labels, service.max_response_bytes
        size = await offload.convert(scores.nbytes * 8, class_scores.size, meta.name, scores, labels, form, limit)
        if (refused := inflight.hold_answer(size)) is not None:
            raise refused
        answer = await offload.convert(size, class_scores.encode, meta.name, scores, labels, form, limit)
        return json_body(inflight.held(answer, len))

    async def regress(request: Request) -> Response:
        name, version = _target(request)
        service.model_metadata(name, version)  # an unknown model or version is 404, not 400
        raise InvalidInputError(
            f":regress is not supported: model {name!r} is not a regression model (onnxserve has no "
            "regression pipelines); use :predict"
        )

    def inference(handler: Endpoint) -> Endpoint:
        return guarded(handler, TFSERVING_HTTP_STATUS, protocol=codec.PROTOCOL, service=service)

    table: list[Route] = []
    for base in BASES:
        table += [
            Route(base, guarded(status, TFSERVING_HTTP_STATUS), methods=["GET"]),
            Route(f"{base}/metadata", guarded(metadata, TFSERVING_HTTP_STATUS), methods=["GET"]),
            Route(f"{base}:predict", inference(predict), methods=["POST"]),
            Route(f"{base}:classify", inference(classify), methods=["POST"]),
            Route(f"{base}:regress", inference(regress), methods=["POST"]),
        ]
    return table
