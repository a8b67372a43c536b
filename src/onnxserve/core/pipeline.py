"""Text pipelines: the spec (``onnxserve.json``) that makes an exported version folder
self-describing, and the tokenization around the graph that lets clients send text.

The spec records the task, the graph's input names, labels, pooling and the tokenizer's max length,
so that the folder needs nothing else to be served as a text model.

Where the spec and tokenizer come from, first found wins:

1. the model file's own metadata (``metadata_props``): ``onnxserve.pipeline`` (the spec as JSON) and
   ``onnxserve.tokenizer`` (the text of ``tokenizer.json``), written by ``onnxserve export hf`` when
   its output is a single ``.onnx`` file;
2. ``onnxserve.json`` and ``tokenizer.json`` beside the model file;
3. a tokenizer alone beside a model whose inputs are token inputs (``input_ids``, and optionally
   ``attention_mask`` and ``token_type_ids``, all INT64): the spec is inferred (task ``tensors``):
   texts are tokenized and padded per batch, the answer is the graph's own output tensors (the first
   one unless others are named), truncated to the graph's fixed sequence length when it has one, else
   to the tokenizer's ``model_max_length``. A Hugging Face tokenizer folder without ``tokenizer.json``
   (``vocab.txt``, ``tokenizer_config.json``...) is converted when ``transformers`` is installed.

A graph with a fixed sequence length (``[1, 6]`` from a plain ``torch.onnx.export``) gets every text
padded (and truncated) to exactly that length; a fixed batch of 1 runs a request's texts one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tokenizers import Encoding, Tokenizer

from onnxserve.core import text_tasks
from onnxserve.core.tokens import TokenizedText
from onnxserve.core.types import InferenceRequest, Tensor, TensorSpec
from onnxserve.errors import ConfigError, InvalidInputError, ModelLoadError

log = logging.getLogger(__name__)

Arrays = dict[str, npt.NDArray[Any]]

PIPELINE_FILENAME = "onnxserve.json"
TOKENIZER_FILENAME = "tokenizer.json"

PIPELINE_METADATA = "onnxserve.pipeline"
"""The model file's metadata key holding the pipeline spec (JSON), for single-file exports."""

TOKENIZER_METADATA = "onnxserve.tokenizer"
"""The model file's metadata key holding the tokenizer (the text of tokenizer.json)."""

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
"""Graph inputs a tokenizer can fill."""

TENSORS_TASK = "tensors"
"""The task of an inferred pipeline: text in, the graph's own output tensors out."""

DEFAULT_MAX_LENGTH = 512
"""Truncation length when neither the graph nor the tokenizer says one."""


ClassIndex = Annotated[int, Field(ge=0, lt=2**31)]
"""A class's index in a classifier's labels: a column of its logits (outside attack rt31: a key of 10^20 was
taken, and TEI ``/info`` answered 500 on it for good, since no JSON encoder of 64-bit integers takes it)."""


def _problem(error: ValidationError) -> str:
    """The first problem of a spec, with where it is (``labels.100000000000000000000: ...``)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "[key]")
    return f"{where}: {first['msg']}" if where else str(first["msg"])


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str
    inputs: list[str]
    outputs: list[str]
    max_length: int
    pooling: Literal["mean", "cls", "none"] = "none"
    normalize: bool = False
    labels: dict[ClassIndex, str] = {}
    score_function: Literal["softmax", "sigmoid"] = "softmax"  # text-classification (sigmoid: multi-label)
    mask_token: str | None = None  # fill-mask
    source: str = ""

    def write(self, folder: Path) -> Path:
        path = folder / PIPELINE_FILENAME
        path.write_bytes(orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2))
        return path

    def to_json(self) -> str:
        return orjson.dumps(self.model_dump(mode="json")).decode()

    @classmethod
    def parse(cls, text: str | bytes, where: str) -> PipelineSpec:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise ConfigError(f"{where}: not a valid pipeline spec: {_problem(e)}") from None

    @classmethod
    def read(cls, folder: Path) -> PipelineSpec | None:
        path = folder / PIPELINE_FILENAME
        if not path.is_file():
            return None
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as e:
            raise ConfigError(f"{path}: not a valid pipeline spec: {_problem(e)}") from None


TEXT_INPUT = "text"
"""The input name that carries raw text to a model whose folder has a tokenizer."""

QUESTION_INPUT, CONTEXT_INPUT = "question", "context"
"""question-answering's text inputs."""

QUERY_INPUT = "query"
"""text-ranking's query input; each query pairs with the text of the ``text`` input at the same row."""

PAIR_INPUTS: dict[str, tuple[str, str]] = {
    "question-answering": (QUESTION_INPUT, CONTEXT_INPUT),
    "text-ranking": (QUERY_INPUT, TEXT_INPUT),
}
"""The two text inputs of the tasks that take pairs of texts."""

LOGITS_OUTPUT = "logits"
"""The graph output a classifier's (text, token classification, ranking, fill-mask) scores come from."""

SENTENCE_EMBEDDING = "sentence_embedding"
TOKEN_EMBEDDINGS = "last_hidden_state"
"""The graph outputs a feature-extraction pipeline embeds from: pooled (its spec's pooling), or not."""

EMBEDDING_OUTPUT = "embedding"
"""feature-extraction's text output: the pooled sentence embedding, or token embeddings without pooling."""

TASK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "feature-extraction": (EMBEDDING_OUTPUT,),
    "text-classification": ("label", "score", "logits"),
    "token-classification": ("entities", "logits"),
    "question-answering": ("answer", "score", "start", "end"),
    "fill-mask": ("token_str", "score", "token", "sequence"),
    "text-ranking": ("score",),
    TENSORS_TASK: (),  # the spec's outputs: the graph's first output
}
"""What a text request gets back by default, per task."""

TOKEN_COUNT_OUTPUT = "token_count"
"""Every text task's optional result: the tokens of each text (after truncation, special tokens included)."""

CLASS_LABELS_OUTPUT = "class_labels"
"""A text classifier's optional result of one name per (text, class), the largest a task makes."""

OPTIONAL_OUTPUTS: dict[str, tuple[str, ...]] = {
    "text-classification": ("probabilities", CLASS_LABELS_OUTPUT),
    "text-ranking": ("raw_score",),
}
"""Task results a text request gets only when it names them (besides ``token_count``, which every task has)."""


def text_inputs_of(task: str) -> tuple[str, ...]:
    """The input names a text model of ``task`` takes text under (besides strings for ``input_ids``)."""
    return (QUESTION_INPUT, CONTEXT_INPUT) if task == "question-answering" else (TEXT_INPUT,)


CHARACTERS_PER_TOKEN = 64
"""Characters tokenized per token a text may keep: no tokenizer makes fewer tokens of that much text."""

MIN_TEXT_CHARACTERS = 16384
"""The fewest characters of one text that are tokenized, whatever the model's max length."""

MAX_REQUEST_TEXTS = 2048
"""The most texts (or pairs) one request may send a text model, on every protocol (OpenAI's own limit of
inputs; TEI and TF Serving's bodies are held to it where they are decoded). Each is read and bounded on the
event loop: a KServe request of a million empty texts (4 KB of gzip) took it for most of a second."""

MAX_REQUEST_CHARACTERS = 1024 * 1024
"""The most characters one request's texts may hold together, after each was cut to what is tokenized
(about OpenAI's 300,000 tokens of ordinary text; ``core.text_budget`` bounds all requests together)."""


def request_characters(texts: Iterable[str], limit: int) -> int:
    """The characters ``texts`` hold once each is cut to ``limit`` (what is tokenized of them)."""
    return sum(min(len(t), limit) for t in texts)


def check_request_characters(characters: int, limit: int) -> None:
    """Refuse a request whose texts hold more than :data:`MAX_REQUEST_CHARACTERS` (each cut to ``limit``)
    together: the same refusal whether the request comes as one or is run in pieces."""
    if characters > MAX_REQUEST_CHARACTERS:
        raise InvalidInputError(
            f"the texts of this request hold {characters} characters (each cut to {limit}), more than the "
            f"{MAX_REQUEST_CHARACTERS} one request may send; send fewer or shorter texts"
        )


@dataclass(frozen=True)
class TextBatch:
    """The texts of one request (and, for question-answering, the contexts they pair with); ``cut``: the
    rows whose text was cut before tokenizing (they count as truncated)."""

    texts: list[str]
    pairs: list[str] | None = None
    cut: frozenset[int] = frozenset()

    @property
    def characters(self) -> int:
        return sum(map(len, self.texts)) + sum(map(len, self.pairs or ()))


def truncated_count(encodings: Sequence[TokenizedText], cut: frozenset[int] = frozenset()) -> int:
    """Texts that lost tokens: cut before tokenizing, or truncated by the tokenizer."""
    return sum(1 for row, e in enumerate(encodings) if e.overflowing or row in cut)


@dataclass(frozen=True)
class Encoded:
    """Token tensors for a batch of texts, the tokenizer's encodings, and how many were truncated."""

    feeds: dict[str, npt.NDArray[Any]]
    encodings: list[TokenizedText]
    truncated: int


@dataclass(frozen=True)
class MadeSize:
    """What post-processing would make beyond the graph's outputs: ``elements`` BYTES elements taking
    ``size`` bytes, ``what`` naming them for a refusal (``"output 'class_labels' ... would have"``)."""

    elements: int
    size: int
    what: str


class TextPipeline:
    """Tokenization before, and task post-processing after, a text model's graph.

    Requests may send text as an input named ``text``, as strings for the token-id input
    (``input_ids``), or for question-answering as ``question`` and ``context``; the texts are
    tokenized in one batch by the fast (Rust) tokenizer, padded to the longest with the tokenizer's
    pad id and truncated to the spec's ``max_length`` (the context only, for question-answering).
    """

    def __init__(
        self,
        folder: Path,
        spec: PipelineSpec,
        graph_inputs: Sequence[str],
        tokenizer: Tokenizer | None = None,
        fixed_shape: tuple[int, int] = (-1, -1),
    ) -> None:
        """``tokenizer``: given, or read from ``folder/tokenizer.json``; ``fixed_shape``: the graph's
        (batch, sequence) sizes of its token inputs, -1 where dynamic."""
        if tokenizer is None:
            tokenizer_file = folder / TOKENIZER_FILENAME
            if not tokenizer_file.is_file():
                raise ModelLoadError(
                    f"{folder}: {PIPELINE_FILENAME} describes a text model but tokenizer.json is missing"
                )
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        missing = [name for name in spec.inputs if name not in graph_inputs]
        if missing:
            raise ModelLoadError(f"{folder}: {PIPELINE_FILENAME} names inputs the graph lacks: {', '.join(missing)}")
        if spec.task not in TASK_OUTPUTS:
            raise ModelLoadError(f"{folder}: unknown pipeline task {spec.task!r}; known: {', '.join(TASK_OUTPUTS)}")
        self.spec = spec
        self.tokenizer = tokenizer
        self.fixed_batch, self.fixed_length = fixed_shape
        self._pad_id = _pad_id(folder, self.tokenizer)
        max_length = min(spec.max_length, self.fixed_length) if self.fixed_length > 0 else spec.max_length
        self.max_tokens = self.fixed_length if self.fixed_length > 0 else max(spec.max_length, _declared_length(folder))
        """The most tokens a row of token tensors sent directly may hold: the graph's fixed sequence length,
        else the spec's ``max_length`` or the tokenizer files' ``model_max_length``, whichever is larger
        (a sentence-transformers model truncates texts below what its positions allow)."""
        self.max_characters = max(MIN_TEXT_CHARACTERS, max_length * CHARACTERS_PER_TOKEN)
        self.max_length = max_length  # the tokens a text (a pair) is truncated to
        self.tokenizer.enable_truncation(
            max_length=max_length, strategy="only_second" if self.is_qa else "longest_first"
        )
        self.tokenizer.no_padding()
        self._mask_id: int | None = None
        if spec.task == "fill-mask":
            found = self.tokenizer.token_to_id(spec.mask_token or "")
            if found is None:
                raise ModelLoadError(f"{folder}: fill-mask needs the tokenizer's mask token, {spec.mask_token!r}")
            self._mask_id = found
        self.defaults = TASK_OUTPUTS[spec.task] or tuple(spec.outputs)

    @property
    def is_qa(self) -> bool:
        return self.spec.task == "question-answering"

    @property
    def takes_pairs(self) -> bool:
        return self.spec.task in PAIR_INPUTS

    def text_inputs(self) -> tuple[str, ...]:
        """The names a request may send text under (besides strings for ``input_ids``)."""
        return text_inputs_of(self.spec.task)

    def text_of(self, request: InferenceRequest, max_texts: int = 0) -> TextBatch | None:
        """The texts a request sends, or None when it sends token tensors for the graph itself; more than
        ``max_texts`` (the model's max_batch_size; 0: none) or :data:`MAX_REQUEST_TEXTS` are refused before a
        text is read."""
        by_name = {t.name: t for t in request.inputs}
        pair = PAIR_INPUTS.get(self.spec.task)
        if pair is not None and (pair[0] in by_name or pair[1] in by_name):
            return self._pairs(by_name, *pair, max_texts)
        carrier = by_name.get(TEXT_INPUT)
        if carrier is None:
            carrier = by_name.get("input_ids")
            if carrier is None or not carrier.datatype.is_bytes:
                return None
        if pair is not None:
            raise InvalidInputError(f"{self.spec.task} takes '{pair[0]}' and '{pair[1]}' texts")
        _no_others(carrier.name, by_name)
        texts = _texts(carrier, max_texts)
        if self.fixed_batch > 1 and len(texts) != self.fixed_batch:
            raise InvalidInputError(
                f"this model's graph takes exactly {self.fixed_batch} texts at a time (its token inputs have a "
                f"fixed batch size); got {len(texts)}"
            )
        return self.bounded(TextBatch(texts))

    def token_length(self, feeds: Mapping[str, npt.NDArray[Any]]) -> int:
        """Tokens per row of token tensors sent directly: those of its token inputs, whatever the graph
        names them (the spec's ``inputs``; an input renamed from ``input_ids`` was read as 1 token per row,
        so never cut into chunks nor bounded in memory: outside attack rt14)."""
        names = dict.fromkeys([*self.spec.inputs, *TOKEN_INPUTS])
        return max((int(a.shape[1]) for n in names if (a := feeds.get(n)) is not None and a.ndim == 2), default=0)

    def check_token_tensors(self, feeds: Mapping[str, npt.NDArray[Any]], model: str) -> None:
        """Refuse token tensors (sent directly, not as text) with rows longer than the model reads."""
        for name in dict.fromkeys([*self.spec.inputs, *TOKEN_INPUTS]):
            array = feeds.get(name)
            if array is not None and array.ndim == 2 and array.shape[1] > self.max_tokens:
                raise InvalidInputError(
                    f"input {name!r} has {array.shape[1]} tokens per row, more than the {self.max_tokens} "
                    f"model {model!r} reads (its max length); send at most {self.max_tokens} tokens per row, "
                    "or send the text itself, which is truncated to fit"
                )

    def bounded(self, batch: TextBatch) -> TextBatch:
        """The batch with every text cut to the characters that can matter (``max_characters``: no more
        than ``max_length`` tokens are kept of it anyway), so that tokenizing takes bounded time and
        memory whatever a client sends; too many characters in all is refused."""
        limit = self.max_characters
        texts = [t[:limit] for t in batch.texts]
        pairs = [t[:limit] for t in batch.pairs] if batch.pairs is not None else None
        cut = frozenset(
            row
            for row, text in enumerate(batch.texts)
            if len(text) > limit or (batch.pairs is not None and len(batch.pairs[row]) > limit)
        )
        bounded = TextBatch(texts, pairs, cut) if cut else batch
        check_request_characters(bounded.characters, limit)
        return bounded

    def _pairs(self, by_name: dict[str, Tensor], first: str, second: str, max_texts: int) -> TextBatch:
        task = self.spec.task
        for name in (first, second):
            if name not in by_name:
                raise InvalidInputError(f"{task} needs both '{first}' and '{second}'")
        extra = sorted(set(by_name) - {first, second})
        if extra:
            raise InvalidInputError(f"{task} takes only {first} and {second}; remove {', '.join(extra)}")
        firsts, seconds = _texts(by_name[first], max_texts), _texts(by_name[second], max_texts)
        if len(firsts) != len(seconds):
            raise InvalidInputError(f"{len(firsts)} {first} texts but {len(seconds)} {second} texts; give one per row")
        return self.bounded(TextBatch(firsts, seconds))

    def encode(self, batch: TextBatch) -> Encoded:
        """Token tensors for the batch, padded to the longest with the tokenizer's pad id."""
        return self.tensors(self.tokenize(batch))

    def tokenize(self, batch: TextBatch) -> list[Encoding]:
        pairs = list(zip(batch.texts, batch.pairs, strict=True)) if batch.pairs is not None else batch.texts
        try:
            encodings: list[Encoding] = self.tokenizer.encode_batch(pairs)
        except Exception as e:
            # The tokenizer truncates only the second text of a pair (the context, the passage): a first text
            # (a question, a query) that alone takes the model's max length cannot be made to fit.
            if batch.pairs is not None and str(e).startswith("Truncation error"):
                raise InvalidInputError(
                    f"a first text of a pair (a question or a query) is too long for this model: with its special "
                    f"tokens it must leave room for the second within the model's max length of {self.max_length} "
                    f"tokens; shorten it"
                ) from None
            raise
        return encodings

    @property
    def reads_positions(self) -> bool:
        """Whether the task maps tokens back to the text (offsets, token strings, which sequence)."""
        return self.spec.task in ("token-classification", "question-answering")

    def tensors(self, encodings: Sequence[TokenizedText]) -> Encoded:
        """The graph's token tensors for already tokenized texts, padded to the longest."""
        length = self.fixed_length if self.fixed_length > 0 else max((len(e.ids) for e in encodings), default=0)
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
        return Encoded(feeds, list(encodings), truncated_count(encodings))

    def select_outputs(
        self, requested: Sequence[str] | None, graph_outputs: Sequence[str]
    ) -> tuple[list[str], list[str]]:
        """The graph outputs to compute and the names to answer with, for a text request."""
        wanted = list(requested) if requested else list(self.defaults)
        extras = (*OPTIONAL_OUTPUTS.get(self.spec.task, ()), TOKEN_COUNT_OUTPUT)
        for name in wanted:
            if name not in self.defaults and name not in extras and name not in graph_outputs:
                known = ", ".join([*self.defaults, *extras, *(g for g in graph_outputs if g not in self.defaults)])
                raise InvalidInputError(
                    f"unknown output {name!r} for this {self.spec.task} model; outputs are: {known}"
                )
        fetch = list(self.spec.outputs) + [n for n in wanted if n in graph_outputs and n not in self.spec.outputs]
        return fetch, wanted

    def made_size(self, outputs: Mapping[str, npt.NDArray[Any]], wanted: Sequence[str]) -> MadeSize:
        """The BYTES elements and bytes of the results :meth:`postprocess` would make of these graph outputs
        that grow with rows x classes (``class_labels``), known before they are made, so that they are
        bounded as the graph's own outputs are. Other results are a few per text."""
        if self.spec.task != "text-classification" or CLASS_LABELS_OUTPUT not in wanted:
            return MadeSize(0, 0, "")
        logits = outputs[LOGITS_OUTPUT]
        rows, classes = (int(logits.shape[0]), int(logits.shape[-1])) if logits.ndim >= 2 else (1, logits.size)
        elements, size = text_tasks.class_labels_size(rows, text_tasks.class_names(self.spec.labels, classes))
        return MadeSize(elements, size, f"output {CLASS_LABELS_OUTPUT!r} ({rows} texts x {classes} classes) would have")

    def postprocess(self, outputs: Arrays, encoded: Encoded, batch: TextBatch, wanted: Sequence[str]) -> Arrays:
        """The task's results (and any graph outputs asked for by name), in the order asked."""
        task = self.spec.task
        results: Arrays
        if task == "feature-extraction":
            (source,) = task_sources(self.spec)
            results = {EMBEDDING_OUTPUT: outputs[source]}
        elif task == "text-classification":
            results = text_tasks.text_classification(
                outputs[LOGITS_OUTPUT], self.spec.labels, self.spec.score_function, CLASS_LABELS_OUTPUT in wanted
            )
        elif task == "token-classification":
            results = text_tasks.token_classification(outputs["logits"], encoded.encodings, self.spec.labels)
        elif task == "question-answering":
            assert batch.pairs is not None
            results = text_tasks.question_answering(
                outputs["start_logits"], outputs["end_logits"], encoded.encodings, batch.pairs
            )
        elif task == "text-ranking":
            results = text_tasks.text_ranking(outputs["logits"])
        elif task == TENSORS_TASK:
            results = {}
        else:
            assert self._mask_id is not None
            results = text_tasks.fill_mask(outputs["logits"], encoded.encodings, self.tokenizer, self._mask_id)
        if TOKEN_COUNT_OUTPUT in wanted:
            results[TOKEN_COUNT_OUTPUT] = np.array([len(e.ids) for e in encoded.encodings], dtype=np.int64)
        return {name: results[name] if name in results else outputs[name] for name in wanted}


def _texts(tensor: Tensor, max_texts: int = 0) -> list[str]:
    """The texts of a BYTES tensor of shape [N], refused before they are read when N is past ``max_texts``
    (the model's max_batch_size; 0: none) or :data:`MAX_REQUEST_TEXTS`: 16 connections sending 65,000 empty
    texts in 390 bytes of gzip, each read and bounded on the event loop before the count was checked, held
    health probes past 5 s (outside attack rt57)."""
    if not tensor.datatype.is_bytes:
        raise InvalidInputError(f"input {tensor.name!r} carries text and must be BYTES, not {tensor.datatype.v2}")
    if len(tensor.shape) != 1:
        raise InvalidInputError(f"input {tensor.name!r}: text must have shape [N], got {list(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise InvalidInputError(f"input {tensor.name!r} holds no text; send at least one (shape [N], N >= 1)")
    if max_texts and tensor.shape[0] > max_texts:
        raise InvalidInputError(
            f"{tensor.shape[0]} texts in one request, more than the model's max_batch_size {max_texts}"
        )
    if tensor.shape[0] > MAX_REQUEST_TEXTS:
        raise InvalidInputError(
            f"{tensor.shape[0]} texts in one request; send at most {MAX_REQUEST_TEXTS} (split them over several "
            "requests)"
        )
    try:
        return [b.decode("utf-8") for b in tensor.data]
    except UnicodeDecodeError:
        raise InvalidInputError(f"input {tensor.name!r}: text must be UTF-8") from None


def _no_others(carrier: str, by_name: dict[str, Tensor]) -> None:
    others = [name for name in by_name if name != carrier]
    if others:
        raise InvalidInputError(
            f"input {carrier!r} sends text, which is tokenized here; do not send {', '.join(others)} with it"
        )


def _pad_id(folder: Path, tokenizer: Tokenizer) -> int:
    """The tokenizer's pad id: its padding settings, else ``tokenizer_config.json``'s pad token, else 0."""
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


def load_pipeline(
    folder: Path,
    graph_inputs: Sequence[TensorSpec],
    graph_outputs: Sequence[TensorSpec] = (),
    metadata: Mapping[str, str] | None = None,
) -> TextPipeline | None:
    """The text pipeline a model carries (see the module for where it comes from), or None for a
    plain tensor model. ``metadata``: the model file's ``metadata_props``."""
    metadata = metadata or {}
    names = [s.name for s in graph_inputs]
    fixed = _fixed_shape(graph_inputs)
    tokenizer = _metadata_tokenizer(metadata, folder)
    if PIPELINE_METADATA in metadata:
        spec: PipelineSpec | None = PipelineSpec.parse(metadata[PIPELINE_METADATA], f"{folder}: model metadata")
    else:
        spec = PipelineSpec.read(folder)
    if spec is not None:
        others = [name for name in spec.inputs if name not in TOKEN_INPUTS]
        if others:  # a tokenizer cannot fill them, and token budgets would not know a row's length
            raise ConfigError(
                f"{folder}: the pipeline's inputs {', '.join(map(repr, others))} are not token inputs a tokenizer "
                f"fills ({', '.join(TOKEN_INPUTS)}); name the graph's token inputs so"
            )
        unfilled = [name for name in names if name not in spec.inputs]
        if unfilled:  # a text request could not fill them, and their lengths would be read nowhere
            raise ConfigError(
                f"{folder}: the graph's inputs {', '.join(map(repr, unfilled))} are not among the pipeline's "
                f"inputs ({', '.join(spec.inputs)}); a text request fills every input of the graph"
            )
        ranks = {s.name: len(s.shape) for s in graph_inputs}
        if other_ranks := [name for name in spec.inputs if ranks.get(name, 2) != 2]:
            # a text request cannot fill them, and lengths, chunks and execution memory are read from the
            # [batch, sequence] tensors: a [1, 1, 12288] input_ids ran whole at +4.6 GB (outside attack rt17),
            # an attention_mask [1, 1, 24000] the pipeline did not name beside a 4-token input_ids +2.2 GB (rt18)
            raise ConfigError(
                f"{folder}: the pipeline's token inputs {', '.join(map(repr, other_ranks))} are not "
                "[batch, sequence] in the graph (rank 2); a text pipeline feeds tokens so"
            )
        _check_outputs(folder, spec, graph_outputs)
        return TextPipeline(folder, spec, names, tokenizer, fixed)
    if not token_inputs(graph_inputs) or not graph_outputs:
        return None
    if tokenizer is None:
        tokenizer = _folder_tokenizer(folder)
        if tokenizer is None:
            return None
    max_length = fixed[1] if fixed[1] > 0 else _model_max_length(folder, tokenizer)
    spec = PipelineSpec(
        task=TENSORS_TASK, inputs=names, outputs=[graph_outputs[0].name], max_length=max_length, source="inferred"
    )
    log.info(
        "%s: a tokenizer is beside the model: text is accepted for its token inputs (%s)", folder, ", ".join(names)
    )
    return TextPipeline(folder, spec, names, tokenizer, fixed)


def task_sources(spec: PipelineSpec) -> tuple[str, ...]:
    """The graph outputs a task's results are made from (:meth:`TextPipeline.postprocess`)."""
    if spec.task == "feature-extraction":
        return (SENTENCE_EMBEDDING if spec.pooling != "none" else TOKEN_EMBEDDINGS,)
    if spec.task == "question-answering":
        return ("start_logits", "end_logits")
    if spec.task in ("text-classification", "token-classification", "text-ranking", "fill-mask"):
        return (LOGITS_OUTPUT,)
    return ()


def _check_outputs(folder: Path, spec: PipelineSpec, graph_outputs: Sequence[TensorSpec]) -> None:
    """Refuse a spec whose task's results come from outputs it does not fetch or the graph does not have:
    every text request to it would fail (outside attack rt35: a pooled feature-extraction spec of a graph
    without ``sentence_embedding`` loaded, and each V2 text request was a 500 with a traceback)."""
    missing = [name for name in task_sources(spec) if name not in spec.outputs]
    if missing:
        raise ConfigError(
            f"{folder}: a {spec.task} pipeline{_pooled(spec)} makes its results from the graph output(s) "
            f"{', '.join(map(repr, missing))}, which its spec's outputs ({', '.join(spec.outputs)}) do not name"
        )
    graph = {s.name: s for s in graph_outputs}
    if graph and (absent := [name for name in spec.outputs if name not in graph]):
        raise ConfigError(
            f"{folder}: the pipeline's outputs {', '.join(map(repr, absent))} are not outputs of the graph "
            f"({', '.join(sorted(graph))})"
        )
    rank = SOURCE_RANKS.get(spec.task, 0)
    for name in task_sources(spec) if rank and graph else ():
        declared = graph[name].shape
        wanted = TOKEN_RANK if name == TOKEN_EMBEDDINGS else rank
        if declared and len(declared) != wanted:  # a graph that declares no shape is checked by its runs
            raise ConfigError(
                f"{folder}: a {spec.task} pipeline reads the graph output {name!r} as {wanted} dimensions "
                f"({SOURCE_LAYOUTS[wanted]}); the graph declares {len(declared)}"
            )


TOKEN_RANK = 3
SOURCE_RANKS = {
    "feature-extraction": 2,
    "text-classification": 2,
    "text-ranking": 2,
    "question-answering": 2,
    "token-classification": TOKEN_RANK,
    "fill-mask": TOKEN_RANK,
}
"""The dimensions of each task's source outputs (``task_sources``): [batch, classes] or [batch, sequence]
for a row's scores, [batch, sequence, classes] for a token's (``last_hidden_state``: [batch, sequence,
hidden]). A graph whose outputs have others loaded, and every text request to it was a 500 (outside
attack rt36: token-classification, fill-mask and question-answering over [batch, 2] outputs)."""

SOURCE_LAYOUTS = {2: "[batch, classes] or [batch, sequence]", TOKEN_RANK: "[batch, sequence, classes]"}


def _pooled(spec: PipelineSpec) -> str:
    return f" with {spec.pooling} pooling" if spec.task == "feature-extraction" and spec.pooling != "none" else ""


def token_inputs(graph_inputs: Sequence[TensorSpec]) -> bool:
    """Whether every graph input is a token input a tokenizer fills (INT64 ``input_ids``, ...)."""
    names = {s.name for s in graph_inputs}
    return (
        "input_ids" in names
        and names <= set(TOKEN_INPUTS)
        and all(s.datatype.v2 == "INT64" and len(s.shape) == 2 for s in graph_inputs)
    )


def _fixed_shape(graph_inputs: Sequence[TensorSpec]) -> tuple[int, int]:
    for spec in graph_inputs:
        if spec.name == "input_ids" and len(spec.shape) == 2:
            return spec.shape[0], spec.shape[1]
    return -1, -1


def _metadata_tokenizer(metadata: Mapping[str, str], folder: Path) -> Tokenizer | None:
    text = metadata.get(TOKENIZER_METADATA)
    if text is None:
        return None
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises plain Exceptions for bad documents
        raise ModelLoadError(f"{folder}: the tokenizer in the model's metadata cannot be read: {e}") from None


def _folder_tokenizer(folder: Path) -> Tokenizer | None:
    """``tokenizer.json`` beside the model, or a Hugging Face tokenizer folder's files converted by
    ``transformers`` (when installed)."""
    tokenizer_file = folder / TOKENIZER_FILENAME
    if tokenizer_file.is_file():
        try:
            return Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad files
            raise ModelLoadError(f"{tokenizer_file}: not a tokenizer the tokenizers library can read: {e}") from None
    if not (folder / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning(
            "%s: a Hugging Face tokenizer folder without tokenizer.json; install transformers (the export "
            "extra) to convert it, or save tokenizer.json beside the model",
            folder,
        )
        return None
    try:
        converted = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types for unreadable folders
        raise ModelLoadError(f"{folder}: the tokenizer files cannot be read: {e}") from None
    backend = getattr(converted, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def _declared_length(folder: Path) -> int:
    """``model_max_length`` of the folder's ``tokenizer_config.json`` when it is a real length, else 0."""
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return 0
    try:
        value = orjson.loads(config.read_bytes()).get("model_max_length")
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return value if isinstance(value, int) and 0 < value <= 1_000_000 else 0


def _model_max_length(folder: Path, tokenizer: Tokenizer) -> int:
    truncation = tokenizer.truncation
    if truncation is not None and int(truncation["max_length"]) > 0:
        return int(truncation["max_length"])
    return _declared_length(folder) or DEFAULT_MAX_LENGTH
