"""Text pipelines: the spec (``onnxserve.json``) that makes an exported version folder
self-describing, and the tokenization around the graph that lets clients send text.

The spec records the task, the graph's input names, labels, pooling and the tokenizer's max length,
so that the folder needs nothing else to be served as a text model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from tokenizers import Tokenizer

from onnxserve.core.types import InferenceRequest
from onnxserve.errors import ConfigError, InvalidInputError, ModelLoadError

PIPELINE_FILENAME = "onnxserve.json"


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    inputs: list[str]
    outputs: list[str]
    max_length: int
    pooling: Literal["mean", "cls", "none"] = "none"
    normalize: bool = False
    labels: dict[int, str] = {}
    source: str = ""

    def write(self, folder: Path) -> Path:
        path = folder / PIPELINE_FILENAME
        path.write_bytes(orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
        return path

    @classmethod
    def read(cls, folder: Path) -> PipelineSpec | None:
        path = folder / PIPELINE_FILENAME
        if not path.is_file():
            return None
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as e:
            raise ConfigError(f"{path}: not a valid pipeline spec: {e.errors()[0]['msg']}") from None


TEXT_INPUT = "text"
"""The input name that carries raw text to a model whose folder has a tokenizer."""

EMBEDDING_OUTPUT = "embedding"
"""feature-extraction's text output: the pooled sentence embedding, or token embeddings without pooling."""

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Encoded:
    """Token tensors for a batch of texts, and how many of the texts were truncated."""

    feeds: dict[str, npt.NDArray[Any]]
    truncated: int


class TextPipeline:
    """Tokenization before, and output naming after, a text model's graph.

    Requests may send text as an input named ``text`` or as strings for the token-id input
    (``input_ids``); either is tokenized in one batch by the fast (Rust) tokenizer, padded to the
    longest text and truncated to the spec's ``max_length``.
    """

    def __init__(self, folder: Path, spec: PipelineSpec, graph_inputs: Sequence[str]) -> None:
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{folder}: {PIPELINE_FILENAME} describes a text model but tokenizer.json is missing")
        missing = [name for name in spec.inputs if name not in graph_inputs]
        if missing:
            raise ModelLoadError(f"{folder}: {PIPELINE_FILENAME} names inputs the graph lacks: {', '.join(missing)}")
        if spec.task != "feature-extraction":
            raise ModelLoadError(f"{folder}: pipeline task {spec.task!r} cannot be served yet")
        self.spec = spec
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.enable_truncation(max_length=spec.max_length)
        self._tokenizer.no_padding()
        self._pad_id = _pad_id(folder, self._tokenizer)
        self.graph_outputs = ["sentence_embedding"] if spec.pooling != "none" else ["last_hidden_state"]

    def text_of(self, request: InferenceRequest) -> list[str] | None:
        """The texts a request sends, or None when it sends token tensors for the graph itself."""
        by_name = {t.name: t for t in request.inputs}
        carrier = by_name.get(TEXT_INPUT)
        if carrier is None:
            carrier = by_name.get("input_ids")
            if carrier is None or not carrier.datatype.is_bytes:
                return None
        if not carrier.datatype.is_bytes:
            raise InvalidInputError(f"input {carrier.name!r} carries text and must be BYTES, not {carrier.datatype.v2}")
        others = [name for name in by_name if name != carrier.name]
        if others:
            raise InvalidInputError(
                f"input {carrier.name!r} sends text, which is tokenized here; do not send {', '.join(others)} with it"
            )
        if len(carrier.shape) != 1:
            raise InvalidInputError(f"input {carrier.name!r}: text must have shape [N], got {list(carrier.shape)}")
        try:
            return [b.decode("utf-8") for b in carrier.data]
        except UnicodeDecodeError:
            raise InvalidInputError(f"input {carrier.name!r}: text must be UTF-8") from None

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Token tensors for ``texts``, padded to the longest with the tokenizer's pad id."""
        encodings = self._tokenizer.encode_batch(list(texts))
        length = max((len(e.ids) for e in encodings), default=0)
        ids = np.full((len(encodings), length), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            mask[row, :n] = e.attention_mask
            types[row, :n] = e.type_ids
        available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {name: available[name] for name in self.spec.inputs}
        return Encoded(feeds, sum(1 for e in encodings if e.overflowing))

    def output_names(self, requested: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
        """Graph outputs to fetch for a text request, and the names to answer them under."""
        if not requested:
            return list(self.graph_outputs), {self.graph_outputs[0]: EMBEDDING_OUTPUT}
        fetch: list[str] = []
        rename: dict[str, str] = {}
        for name in requested:
            graph_name = self.graph_outputs[0] if name == EMBEDDING_OUTPUT else name
            fetch.append(graph_name)
            if name == EMBEDDING_OUTPUT:
                rename[graph_name] = EMBEDDING_OUTPUT
        return fetch, rename


def _pad_id(folder: Path, tokenizer: Tokenizer) -> int:
    padding = tokenizer.padding
    if padding is not None:
        return int(padding["pad_id"])
    config = folder / "tokenizer_config.json"
    token = None
    if config.is_file():
        pad = orjson.loads(config.read_bytes()).get("pad_token")
        token = pad.get("content") if isinstance(pad, dict) else pad
    found = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return int(found) if found is not None else 0


def load_pipeline(folder: Path, graph_inputs: Sequence[str]) -> TextPipeline | None:
    """The text pipeline a version folder describes, or None for a plain tensor model."""
    spec = PipelineSpec.read(folder)
    return TextPipeline(folder, spec, graph_inputs) if spec is not None else None
