"""TEI-compatible endpoints: each one decodes, calls the InferenceService, and encodes.

A TEI server serves one model; onnxserve serves many. A request names its model with the
``X-Model`` header or the ``model`` query parameter (``NAME``, ``NAME:VERSION`` or ``NAME@LABEL``);
without either, the route answers with the one served model that fits it (the one embedding model for
``/embed``, the one reranker for ``/rerank``, the one classifier for ``/predict``, the one text model
for ``/tokenize`` and ``/info``) and refuses to guess when there are several.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from onnxserve.core.pipeline import QUERY_INPUT, TEXT_INPUT, request_characters
from onnxserve.core.types import InferenceRequest, InferenceResponse, ModelMetadata, Tensor
from onnxserve.core.wire import response_too_large
from onnxserve.errors import InvalidInputError, ModelNotFoundError
from onnxserve.protocols import class_scores, inflight, offload
from onnxserve.protocols.embeddings import (
    BYTES,
    MAX_INPUTS,
    check_characters,
    chunks,
    embed,
    embedding_model,
    embeds_sentences,
    in_pieces,
    text_model,
    text_models,
    text_request,
)
from onnxserve.protocols.errors import TEI_HTTP_STATUS
from onnxserve.protocols.http import Endpoint, body_bytes, guarded, json_body
from onnxserve.protocols.tei import codec

if TYPE_CHECKING:
    from onnxserve.core.service import InferenceService

TOKEN_ANSWER_BYTES = 64
"""About what one token takes in a ``/tokenize`` answer (its id, text, flags and offsets as JSON)."""

PATHS = ("/embed", "/rerank", "/predict", "/tokenize", "/info")
"""The paths whose errors (including refused tokens) take TEI's shape."""

ROUTE_TASKS: dict[str, str | None] = {
    "/embed": "feature-extraction",
    "/rerank": "text-ranking",
    "/predict": "text-classification",
    "/tokenize": None,
    "/info": None,
}
"""The task of the models each route answers with (None: any text model)."""

EXPORT_HINT = {
    "feature-extraction": "export one with `onnxserve export hf --task feature-extraction` (pooled)",
    "text-ranking": "export a cross-encoder with `onnxserve export hf --task text-ranking`",
    "text-classification": "export one with `onnxserve export hf --task text-classification`",
}


def _fits(meta: ModelMetadata, task: str | None) -> bool:
    if task is None or meta.pipeline is None:
        return task is None
    if task == "feature-extraction":
        return embeds_sentences(meta.pipeline, meta.outputs)
    return meta.pipeline.task == task


def model_id(service: InferenceService, request: Request) -> str:
    """The model the request names (header or query), or the only served model that fits its route."""
    given = request.headers.get(codec.MODEL_HEADER) or request.query_params.get(codec.MODEL_QUERY)
    if given:
        return given
    path = request.url.path
    task = ROUTE_TASKS[path]
    candidates = [name for name in text_models(service) if _fits(service.model_metadata(name), task)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        what = f"{task} model" if task else "text model"
        raise ModelNotFoundError(f"no {what} is served for {path}" + (f"; {EXPORT_HINT[task]}" if task else ""))
    raise InvalidInputError(
        f"several models could answer {path} ({', '.join(candidates)}): name one with the X-Model header "
        "or the ?model= query parameter"
    )


def _task_model(service: InferenceService, request: Request) -> tuple[str, str, ModelMetadata]:
    name, version, meta = text_model(service, model_id(service, request))
    task = ROUTE_TASKS[request.url.path]
    assert meta.pipeline is not None
    if task is not None and meta.pipeline.task != task:
        raise InvalidInputError(
            f"model {name!r} is a {meta.pipeline.task} model; {request.url.path} needs a {task} model "
            f"({EXPORT_HINT[task]})"
        )
    return name, version, meta


def _too_long(truncated: int, meta: ModelMetadata) -> InvalidInputError:
    length = meta.pipeline.max_length if meta.pipeline is not None else 0
    return InvalidInputError(
        f"{truncated} input(s) are longer than model {meta.name!r} reads ({length} tokens); "
        "send 'truncate': true to cut them"
    )


def _output(response: InferenceResponse, name: str) -> npt.NDArray[Any]:
    return next(t.data for t in response.outputs if t.name == name)


def _strings(values: Sequence[str]) -> npt.NDArray[Any]:
    array = np.empty(len(values), dtype=object)
    array[:] = [v.encode("utf-8") for v in values]
    return array


async def _decoded(request: Request, allowed: Sequence[str], required: Sequence[str]) -> codec.Body:
    body = await body_bytes(request)
    return await offload.parse(len(body), codec.decode, body, request.url.path, allowed, required)


INFO_ANSWERS_KEPT = 16
"""Versions whose ``/info`` labels stay encoded (a classifier's labels can be millions)."""


def _labels(labels: dict[int, str]) -> dict[str, Any]:
    """TEI's ``id2label`` and ``label2id`` of ``labels``."""
    return {"id2label": {str(i): v for i, v in labels.items()}, "label2id": {v: i for i, v in labels.items()}}


class _InfoBodies:
    """Each text model version's ``/info`` answer, encoded once: built once per loaded version (off the event
    loop when its labels are many), shared by concurrent first requests and by every answer, the last
    ``INFO_ANSWERS_KEPT`` kept. A million labels of 100 characters held the loop 5 s on every request (outside
    attack rt12), then made a 112 MB answer per request (rt13: 32 at once ended the process)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[str, str], tuple[object, asyncio.Task[bytes]]] = OrderedDict()

    async def get(self, key: tuple[str, str], spec: object, size: int, build: Callable[[], bytes]) -> bytes:
        found = self._kept.get(key)
        if found is None or found[0] is not spec:  # a version loaded again has an answer of its own
            found = (spec, asyncio.ensure_future(offload.convert(size, build)))
            self._kept[key] = found
            while len(self._kept) > INFO_ANSWERS_KEPT:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        try:
            return await asyncio.shield(found[1])
        except BaseException:
            if found[1].done() and self._kept.get(key) is found:
                del self._kept[key]  # failed (no memory): the next request tries again
            raise


def routes(service: InferenceService) -> list[Route]:
    info_bodies = _InfoBodies()

    async def embed_route(request: Request) -> Response:
        allowed = ("inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "dimensions")
        body = await _decoded(request, allowed, ("inputs",))
        doc = body.doc
        if doc.get("prompt_name") is not None:
            raise InvalidInputError("'prompt_name' is not supported: put the prompt in the text")
        normalize, cut = codec.flag(doc, "normalize", True), codec.flag(doc, "truncate", False)
        codec.direction(doc)
        assert body.inputs is not None
        inputs = body.inputs
        model = embedding_model(service, model_id(service, request))
        embedded = await embed(service, model, inputs.values, codec.PROTOCOL, codec.dimensions(doc))
        if embedded.truncated and not cut:
            raise _too_long(embedded.truncated, model.metadata)
        vectors = embedded.vectors
        if normalize and not model.normalized:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)
        return codec.vectors(vectors)

    async def rerank(request: Request) -> Response:
        allowed = ("query", "texts", "truncate", "truncation_direction", "raw_scores", "return_text")
        doc = (await _decoded(request, allowed, ("query", "texts"))).doc
        query = doc["query"]
        if not isinstance(query, str):
            raise InvalidInputError("'query' must be a string")
        candidates = doc["texts"]
        if not isinstance(candidates, list) or not candidates or not all(isinstance(t, str) for t in candidates):
            raise InvalidInputError("'texts' must be a non-empty list of strings")
        raw, cut, with_text = (codec.flag(doc, n, False) for n in ("raw_scores", "truncate", "return_text"))
        codec.direction(doc)
        name, version, meta = _task_model(service, request)
        output = "raw_score" if raw else "score"
        max_batch = service.model_configuration(name, version).max_batch_size
        check_characters(meta, candidates, query)
        limit, asked = meta.text_characters, min(len(query), meta.text_characters)

        def pairs(r: range, version: str) -> InferenceRequest:
            queries = Tensor(QUERY_INPUT, BYTES, _strings([query] * len(r)))
            texts = Tensor(TEXT_INPUT, BYTES, _strings(candidates[r.start : r.stop]))
            return InferenceRequest(name, [queries, texts], version, outputs=[output], protocol=codec.PROTOCOL)

        responses = await in_pieces(
            service,
            (name, version),
            chunks(len(candidates), max_batch),
            lambda r: request_characters(candidates[r.start : r.stop], limit) + asked * len(r),
            pairs,
        )
        truncated = sum(int(r.parameters.get("truncated", 0)) for r in responses)
        if truncated and not cut:
            raise _too_long(truncated, meta)
        scores = np.concatenate([_output(r, output) for r in responses])
        return codec.ranks(scores, candidates, with_text)

    async def predict(request: Request) -> Response:
        body = await _decoded(request, ("inputs", "truncate", "truncation_direction", "raw_scores"), ("inputs",))
        doc, inputs = body.doc, body.inputs
        assert inputs is not None
        raw, cut = codec.flag(doc, "raw_scores", False), codec.flag(doc, "truncate", False)
        codec.direction(doc)
        name, version, meta = _task_model(service, request)
        texts = [str(t) for t in inputs.values]
        output = "logits" if raw else "probabilities"
        max_batch = service.model_configuration(name, version).max_batch_size
        check_characters(meta, texts)
        form = class_scores.TEI_SINGLE if inputs.single else class_scores.TEI_ROWS
        class_scores.refuse_before_run(meta, len(texts), form, service.max_response_bytes)
        limit = meta.text_characters
        responses = await in_pieces(
            service,
            (name, version),
            chunks(len(texts), max_batch),
            lambda r: request_characters(texts[r.start : r.stop], limit),
            lambda r, pinned: text_request(name, pinned, texts[r.start : r.stop], [output], codec.PROTOCOL),
        )
        truncated = sum(int(r.parameters.get("truncated", 0)) for r in responses)
        if truncated and not cut:
            raise _too_long(truncated, meta)
        scores = np.concatenate([_output(r, output) for r in responses])
        del responses
        # One entry per (input, class), named from the model's labels: bounded before it is built, built
        # and encoded a slice of rows at a time, off the event loop when large (protocols.class_scores).
        assert meta.pipeline is not None
        labels, limit = meta.pipeline.labels, service.max_response_bytes
        hint = scores.nbytes * 8
        size = await offload.convert(hint, class_scores.size, name, scores, labels, form, limit)
        if (refused := inflight.hold_answer(size)) is not None:
            raise refused
        answer = await offload.convert(size, class_scores.encode, name, scores, labels, form, limit)
        return json_body(inflight.held(answer, len))

    async def tokenize(request: Request) -> Response:
        body = await _decoded(request, ("inputs", "add_special_tokens", "prompt_name"), ("inputs",))
        doc, inputs = body.doc, body.inputs
        assert inputs is not None
        if doc.get("prompt_name") is not None:
            raise InvalidInputError("'prompt_name' is not supported: put the prompt in the text")
        special = codec.flag(doc, "add_special_tokens", True)
        name, version, _ = text_model(service, model_id(service, request))
        texts = [str(t) for t in inputs.values]
        async with service.tokenized(name, version, texts, special) as encodings:
            size = sum(len(e.ids) for e in encodings) * TOKEN_ANSWER_BYTES
            if 0 < service.max_response_bytes < size:
                raise response_too_large(name, size, service.max_response_bytes, encoding="as TEI /tokenize JSON")
            # Built text by text, off the event loop when there are many tokens.
            return await offload.convert(size, codec.tokens, encodings, texts)

    async def info(request: Request) -> Response:
        name, version, meta = text_model(service, model_id(service, request))
        spec = meta.pipeline
        assert spec is not None
        max_batch = service.model_configuration(name, version).max_batch_size

        def build() -> bytes:
            model_type: dict[str, Any]
            if spec.task == "feature-extraction":
                model_type = {"embedding": {"pooling": spec.pooling}}
            elif spec.task == "text-ranking":
                model_type = {"reranker": _labels(spec.labels)}
            elif spec.task == "text-classification":
                model_type = {"classifier": _labels(spec.labels)}
            else:
                model_type = {"other": {"task": spec.task}}
            document = {
                "model_id": name,
                "model_sha": None,
                "model_version": meta.version,
                "model_dtype": "float32",
                "model_type": model_type,
                "max_input_length": spec.max_length,
                "max_batch_requests": max_batch or None,
                "max_client_batch_size": MAX_INPUTS,
                "version": service.server_metadata().version,
            }
            return orjson.dumps(document)

        size = sum(len(v) for v in spec.labels.values()) * 2 + 24 * len(spec.labels)
        body = await info_bodies.get((name, str(version)), spec, size, build)
        # counted in the in-flight budget while it is sent, as inference answers are (answers of 256 KiB
        # and more), so many slow readers of a large one are refused 503 rather than held at once
        return json_body(inflight.held(body, len))

    def inference(handler: Endpoint) -> Endpoint:
        return guarded(
            handler,
            TEI_HTTP_STATUS,
            protocol=codec.PROTOCOL,
            service=service,
            render=codec.render_error,
        )

    return [
        Route("/embed", inference(embed_route), methods=["POST"]),
        Route("/rerank", inference(rerank), methods=["POST"]),
        Route("/predict", inference(predict), methods=["POST"]),
        Route("/tokenize", guarded(tokenize, TEI_HTTP_STATUS, render=codec.render_error), methods=["POST"]),
        Route("/info", guarded(info, TEI_HTTP_STATUS, render=codec.render_error), methods=["GET"]),
    ]
