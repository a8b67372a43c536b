"""Sentence embeddings over the InferenceService, for the routes that answer them (OpenAI's and TEI's).

A request of N inputs becomes N rows in the model's batcher, exactly like a V2 text request: texts
travel as the pipeline's ``text`` input (tokenized by the server), token ids as the graph's own token
tensors (padded, with their attention mask). Requests larger than the model's ``max_batch_size`` are
split into pieces (:func:`in_pieces`) that run concurrently, a few at a time: the pieces in flight hold
at most :data:`IN_FLIGHT_CHARACTERS` (and at least one piece), and a piece is encoded only when it is
submitted. The whole request's texts are bounded as one V2 request's are
(``pipeline.MAX_REQUEST_CHARACTERS``, each text counted as cut before tokenizing), whatever its pieces.
``dimensions`` keeps the first dimensions of each vector (Matryoshka truncation), normalized again
when the model's vectors are unit length.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from onnxserve.core.datatypes import from_v2
from onnxserve.core.pipeline import (
    EMBEDDING_OUTPUT,
    MAX_REQUEST_TEXTS,
    SENTENCE_EMBEDDING,
    TEXT_INPUT,
    TOKEN_COUNT_OUTPUT,
    check_request_characters,
    request_characters,
)
from onnxserve.core.types import InferenceRequest, InferenceResponse, ModelMetadata, Tensor, TensorSpec
from onnxserve.errors import InvalidInputError
from onnxserve.protocols import inflight
from onnxserve.protocols.model_id import parse_model_id

if TYPE_CHECKING:
    from onnxserve.core.pipeline import PipelineSpec
    from onnxserve.core.service import InferenceService

POOLED_OUTPUT = SENTENCE_EMBEDDING
"""The graph output of a pooled feature-extraction model (``onnxserve export hf`` names it so)."""

MAX_INPUTS = MAX_REQUEST_TEXTS
"""Inputs one request may embed (OpenAI's own limit; the core's for every protocol)."""

TokenIds = list[npt.NDArray[np.int64]]
"""Rows of token ids, one array per input: decoded in a worker process for a large body, arrays come back
in one copy, where lists of Python ints would cost the interpreter as long as parsing them did."""

BYTES, INT64 = from_v2("BYTES"), from_v2("INT64")


@dataclass(frozen=True)
class EmbeddingModel:
    """A served model version that embeds text, as an embedding route names it."""

    name: str
    version: str | None
    metadata: ModelMetadata
    dimensions: int
    normalized: bool
    max_batch_size: int  # 0: no limit on rows per request


@dataclass(frozen=True)
class Embedded:
    vectors: npt.NDArray[np.float32]  # [N, dimensions]
    tokens: int  # tokens the model read, over every input
    truncated: int = 0  # texts cut to the model's max length


def text_models(service: InferenceService) -> list[str]:
    """The served models that take text (have a tokenizer) and have a ready version, by name."""
    names = sorted({e.name for e in service.served_index(ready_only=True)})
    return [n for n in names if service.model_metadata(n).pipeline is not None]


def text_model(service: InferenceService, model_id: str) -> tuple[str, str, ModelMetadata]:
    """The model a model id names: its name, the number of the version it names now (the default: the
    highest ready one) and that version's metadata; a model without a tokenizer is refused."""
    name, version = parse_model_id(model_id)
    metadata = service.model_metadata(name, version)
    if metadata.pipeline is None:
        raise InvalidInputError(f"model {name!r} takes tensors, not text (it has no tokenizer); it cannot embed text")
    return name, metadata.version, metadata  # the version it resolved to: its pieces are pinned to it


def embeds_sentences(spec: PipelineSpec, outputs: Sequence[TensorSpec]) -> bool:
    """Whether a text model embeds sentences: pooled feature-extraction, with the pooled graph output."""
    return (
        spec.task == "feature-extraction" and spec.pooling != "none" and any(o.name == POOLED_OUTPUT for o in outputs)
    )


def embedding_model(service: InferenceService, model_id: str) -> EmbeddingModel:
    """The embedding model a model id names; a model that does not embed sentences is refused."""
    name, version, metadata = text_model(service, model_id)
    spec = metadata.pipeline
    assert spec is not None
    if not embeds_sentences(spec, metadata.outputs):
        what = "token embeddings (no pooling)" if spec.task == "feature-extraction" else f"{spec.task} results"
        raise InvalidInputError(
            f"model {name!r} does not embed sentences: it answers {what}; "
            "serve a feature-extraction model exported with pooling (mean or cls)"
        )
    pooled = next(o for o in metadata.outputs if o.name == POOLED_OUTPUT)
    max_batch = service.model_configuration(name, version).max_batch_size
    return EmbeddingModel(name, version, metadata, int(pooled.shape[-1]), spec.normalize, max_batch)


IN_FLIGHT_CHARACTERS = 128 * 1024
"""Characters (token ids for ids) of one request's pieces in the model's scheduler at once, beyond its
first piece. A request of many short texts keeps enough pieces queued for the batcher to merge them; one
of long texts about two at a time, as ``core.chunking`` keeps a V2 request's chunks, so that one request
neither fills every run slot and the text budget's small pool nor holds its texts encoded all at once
(a million characters in 16 or 64 pieces were all submitted together)."""


def chunks(count: int, size: int) -> list[range]:
    """``range(count)`` cut into pieces of at most ``size`` (0: one piece)."""
    step = size if size > 0 else max(count, 1)
    return [range(start, min(start + step, count)) for start in range(0, count, step)]


def text_request(
    name: str, version: str | None, texts: Sequence[str], outputs: Sequence[str], protocol: str
) -> InferenceRequest:
    data = np.empty(len(texts), dtype=object)
    data[:] = [t.encode("utf-8") for t in texts]
    return InferenceRequest(name, [Tensor(TEXT_INPUT, BYTES, data)], version, outputs=list(outputs), protocol=protocol)


def _ids_request(model: EmbeddingModel, rows: TokenIds, version: str, protocol: str) -> InferenceRequest:
    longest = max(len(r) for r in rows)
    ids = np.zeros((len(rows), longest), dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    inputs = [Tensor(s.name, INT64, available[s.name]) for s in model.metadata.inputs]
    return InferenceRequest(model.name, inputs, version, outputs=[POOLED_OUTPUT], protocol=protocol)


def check_characters(metadata: ModelMetadata, texts: Sequence[str], repeated: str = "") -> None:
    """Refuse a request whose texts (and ``repeated`` paired with each of them, a reranker's query)
    hold more characters together than one V2 text request may, each counted as cut before tokenizing."""
    limit = metadata.text_characters
    total = request_characters(texts, limit) + min(len(repeated), limit) * len(texts)
    check_request_characters(total, limit)


async def _oldest_or_failed(flying: deque[tuple[int, asyncio.Task[InferenceResponse]]]) -> None:
    """Wait until the oldest piece in flight is done, or raise at once the error of any piece that failed
    (a piece refused for time, ``core.pace``, fails the request now, not once the pieces before it are done)."""
    oldest = flying[0][1]
    if len(flying) == 1:
        await oldest  # its answer, or its error raised, as before
        return
    while not oldest.done():
        await asyncio.wait([task for _, task in flying], return_when=asyncio.FIRST_COMPLETED)
        for _, task in flying:
            if task.done() and not task.cancelled() and task.exception() is not None:
                task.result()  # raises its error


async def in_pieces(
    service: InferenceService,
    model: tuple[str, str | None],
    pieces: Sequence[range],
    size: Callable[[range], int],
    build: Callable[[range, str], InferenceRequest],
) -> list[InferenceResponse]:
    """The responses to ``build(piece, version)`` for each piece, in order, all from one version of the
    model (``model``: its name and the version a client named, None for the default), pinned for the whole
    request (``InferenceService.pinned``): a new version that takes over meanwhile answers the next
    request, not the rest of this one. The next piece is built and submitted while those in flight hold
    at most :data:`IN_FLIGHT_CHARACTERS` by ``size`` (always at least one); a piece that fails fails the
    request at once, and the pieces in flight are cancelled."""
    responses: list[InferenceResponse] = []
    flying: deque[tuple[int, asyncio.Task[InferenceResponse]]] = deque()
    held = 0
    with service.pinned(*model, parts=len(pieces)) as pin:
        try:
            for piece in pieces:
                weight = size(piece)
                while flying and held + weight > IN_FLIGHT_CHARACTERS:
                    await _oldest_or_failed(flying)
                    done, task = flying.popleft()
                    held -= done
                    responses.append(task.result())
                flying.append((weight, asyncio.ensure_future(service.infer(build(piece, pin.version), pin))))
                held += weight
            while flying:
                await _oldest_or_failed(flying)
                _, task = flying.popleft()
                responses.append(task.result())
        finally:
            for _, task in flying:
                task.cancel()
            if flying:  # until they have let go of what they hold
                await asyncio.gather(*(task for _, task in flying), return_exceptions=True)
    return responses


def token_row(values: Sequence[int], index: int) -> npt.NDArray[np.int64]:
    """One input's token ids (already checked to be integers) as an array."""
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        bad = next(v for v in values if not -(2**63) <= v < 2**63)
        raise InvalidInputError(f"input {index}: token id {bad} is outside every vocabulary") from None


def check_token_ids(model: EmbeddingModel, rows: TokenIds) -> None:
    spec = model.metadata.pipeline
    assert spec is not None
    vocabulary = model.metadata.vocabulary_size
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise InvalidInputError(f"input {i} holds no token ids; send at least one")
        if len(row) > spec.max_length:
            raise InvalidInputError(
                f"input {i} has {len(row)} tokens, more than model {model.name!r} reads ({spec.max_length})"
            )
        outside = row[(row < 0) | (row >= vocabulary)]
        if outside.size:
            bad = int(outside[0])
            raise InvalidInputError(
                f"input {i}: token id {bad} is outside model {model.name!r}'s vocabulary (0 to {vocabulary - 1}); "
                "token ids must come from the model's own tokenizer"
            )
    missing = {s.name for s in model.metadata.inputs} - {"input_ids", "attention_mask", "token_type_ids"}
    if missing:
        raise InvalidInputError(f"model {model.name!r} needs inputs {sorted(missing)} besides token ids; send text")


async def embed(
    service: InferenceService,
    model: EmbeddingModel,
    inputs: Sequence[str] | TokenIds,
    protocol: str,
    dimensions: int | None = None,
) -> Embedded:
    """Embed ``inputs`` (texts, or rows of the model's token ids) as rows of the model's batcher."""
    if not inputs:
        raise InvalidInputError("no input to embed; send at least one")
    if len(inputs) > MAX_INPUTS:
        raise InvalidInputError(f"{len(inputs)} inputs in one request; send at most {MAX_INPUTS}")
    if dimensions is not None and not 1 <= dimensions <= model.dimensions:
        raise InvalidInputError(
            f"dimensions must be between 1 and model {model.name!r}'s size, {model.dimensions}; got {dimensions}"
        )
    texts = all(isinstance(x, str) for x in inputs)
    if texts:
        strings = [str(x) for x in inputs]
        check_characters(model.metadata, strings)
        limit = model.metadata.text_characters
        outputs = [EMBEDDING_OUTPUT, TOKEN_COUNT_OUTPUT]
        responses = await in_pieces(
            service,
            (model.name, model.version),
            chunks(len(strings), model.max_batch_size),
            lambda r: request_characters(strings[r.start : r.stop], limit),
            lambda r, version: text_request(model.name, version, strings[r.start : r.stop], outputs, protocol),
        )
    else:
        rows: TokenIds = [x for x in inputs if not isinstance(x, str)]
        check_token_ids(model, rows)
        responses = await in_pieces(
            service,
            (model.name, model.version),
            chunks(len(rows), model.max_batch_size),
            lambda r: sum(len(row) for row in rows[r.start : r.stop]),
            lambda r, version: _ids_request(model, rows[r.start : r.stop], version, protocol),
        )
    vectors = np.concatenate([_output(r, EMBEDDING_OUTPUT if texts else POOLED_OUTPUT) for r in responses])
    if texts:
        tokens = int(sum(int(_output(r, TOKEN_COUNT_OUTPUT).sum()) for r in responses))
    else:
        tokens = sum(len(x) for x in inputs if not isinstance(x, str))
    truncated = sum(int(r.parameters.get("truncated", 0)) for r in responses)
    # Counted before it is encoded (then again as encoded, by ``http.guarded``), held until it is sent.
    vectors = inflight.held(truncate(vectors.astype(np.float32), dimensions, model.normalized), _nbytes)
    return Embedded(vectors, tokens, truncated)


def _nbytes(array: npt.NDArray[Any]) -> int:
    return int(array.nbytes)


def truncate(vectors: npt.NDArray[np.float32], dimensions: int | None, normalized: bool) -> npt.NDArray[np.float32]:
    """The first ``dimensions`` of each vector (all with None), unit length again when ``normalized``."""
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    kept = vectors[:, :dimensions].astype(np.float64)
    if normalized:
        norms = np.linalg.norm(kept, axis=1, keepdims=True)
        kept = kept / np.where(norms > 0, norms, 1)
    result: npt.NDArray[np.float32] = np.ascontiguousarray(kept, dtype=np.float32)
    return result


def _output(response: InferenceResponse, name: str) -> npt.NDArray[Any]:
    return next(t.data for t in response.outputs if t.name == name)
