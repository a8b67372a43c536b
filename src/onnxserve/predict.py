"""Local inference on a text model folder, without a server: ``onnxserve.Pipeline``.

``Pipeline("models/minilm/1")(["a sentence", ...])`` returns what the matching Hugging Face
pipeline (or sentence-transformers, for sentence embeddings) returns for the task:

- feature-extraction: a float32 array ``[N, dim]`` (pooled), or a list of ``[tokens, dim]`` arrays;
- text-classification: ``[{"label", "score"}]``;
- token-classification: a list of entities ``{"entity", "score", "index", "word", "start", "end"}`` per text;
- question-answering: ``[{"score", "start", "end", "answer"}]`` (pass ``context=``);
- fill-mask: ``[[{"score", "token", "token_str", "sequence"}, ...]]``, the top 5 per text;
- text-ranking (cross-encoders): a float32 array of relevance scores in [0, 1], one per (query, text)
  pair, as sentence-transformers' ``CrossEncoder.predict`` gives; pass ``[(query, text), ...]``, or
  queries with ``context=`` the texts (one query is paired with every text). ``rank(query, texts)``
  answers ``[{"corpus_id", "score"}]``, best first, like ``CrossEncoder.rank``.

A single string (or pair) gives a single result instead of a list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxserve.config import ExecutionProvider, SessionOptions
from onnxserve.core.pipeline import TENSORS_TASK, Arrays, Encoded, PipelineSpec, TextBatch, TextPipeline, load_pipeline
from onnxserve.core.repository import MODEL_FILENAME
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import InvalidInputError, ModelLoadError


class Pipeline:
    """A text model folder (``model.onnx`` + tokenizer + ``onnxserve.json``), or a single ``.onnx`` file
    that carries them in its metadata (``onnxserve export hf --output X.onnx``), ready to run locally."""

    def __init__(
        self,
        folder: str | Path,
        providers: Sequence[ExecutionProvider] = (),
        options: SessionOptions | None = None,
    ) -> None:
        path = Path(folder)
        if path.suffix == ".onnx" and path.is_file():  # a single-file export: the spec is in its metadata
            self.session = ModelSession(path, providers, options, name=str(path))
            text = load_pipeline(path.parent, self.session.inputs, self.session.outputs, self.session.metadata)
            if text is None or text.spec.task == TENSORS_TASK:
                raise ModelLoadError(
                    f"{path} carries no pipeline spec; export one with `onnxserve export hf ... --output X.onnx`"
                )
            self.text, self.spec = text, text.spec
            return
        spec = PipelineSpec.read(path)
        if spec is None:
            raise ModelLoadError(
                f"{path} is not a text model folder (no onnxserve.json); export one with `onnxserve export hf`"
            )
        self.session = ModelSession(path / MODEL_FILENAME, providers, options, name=str(path))
        self.text = TextPipeline(path, spec, [s.name for s in self.session.inputs])
        self.spec = spec

    @property
    def task(self) -> str:
        return self.spec.task

    def run(self, batch: TextBatch) -> tuple[Arrays, Encoded]:
        """The task's named result arrays for a batch (what the server answers), and the encodings."""
        encoded = self.text.encode(batch)
        outputs = self.session.run(encoded.feeds, list(self.spec.outputs))
        return self.text.postprocess(outputs, encoded, batch, self.text.defaults), encoded

    def __call__(
        self, inputs: str | Sequence[str] | Sequence[tuple[str, str]], context: str | Sequence[str] | None = None
    ) -> Any:
        if self.task == "text-ranking":
            return self._score(inputs, context)
        if not (isinstance(inputs, str) or all(isinstance(x, str) for x in inputs)):
            raise InvalidInputError(f"a {self.task} model takes texts, not pairs")
        inputs = [str(x) for x in inputs] if not isinstance(inputs, str) else inputs
        single = isinstance(inputs, str)
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        contexts = None if context is None else ([context] if isinstance(context, str) else list(context))
        if self.task == "question-answering" and contexts is None:
            raise InvalidInputError("question-answering needs context=")
        if self.task != "question-answering" and contexts is not None:
            raise InvalidInputError(f"context= is for question-answering, not {self.task}")
        results, encoded = self.run(TextBatch(texts, contexts))
        rows = _rows(self.task, results, encoded, self.spec.pooling)
        return rows[0] if single else rows

    def _score(self, inputs: Any, context: str | Sequence[str] | None) -> Any:
        single = isinstance(inputs, tuple) or (isinstance(inputs, str) and isinstance(context, str))
        if context is None:
            pairs = [inputs] if isinstance(inputs, tuple) else list(inputs)
            if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
                raise InvalidInputError("text-ranking scores (query, text) pairs: pass pairs, or queries and context=")
            queries, texts = [str(p[0]) for p in pairs], [str(p[1]) for p in pairs]
        else:
            queries = [inputs] if isinstance(inputs, str) else [str(q) for q in inputs]
            texts = [context] if isinstance(context, str) else list(context)
            if len(queries) == 1:
                queries = queries * len(texts)
            if len(queries) != len(texts):
                raise InvalidInputError(
                    f"{len(queries)} queries but {len(texts)} texts; give one query or one per text"
                )
        results, _ = self.run(TextBatch(queries, texts))
        scores = results["score"]
        return float(scores[0]) if single else scores

    def rank(self, query: str, texts: Sequence[str]) -> list[dict[str, Any]]:
        """``[{"corpus_id", "score"}]`` for a text-ranking model, highest score first."""
        if self.task != "text-ranking":
            raise InvalidInputError(f"rank() needs a text-ranking model, not {self.task}")
        scores = self._score(query, list(texts))
        order = sorted(range(len(texts)), key=lambda i: -float(scores[i]))
        return [{"corpus_id": i, "score": float(scores[i])} for i in order]


def _rows(task: str, results: Arrays, encoded: Encoded, pooling: str) -> Any:
    if task == "feature-extraction":
        embedding = results["embedding"]
        if pooling != "none":
            return embedding
        return [embedding[i, : len(e.ids)] for i, e in enumerate(encoded.encodings)]
    if task == "text-classification":
        return [
            {"label": label.decode(), "score": float(score)}
            for label, score in zip(results["label"], results["score"], strict=True)
        ]
    if task == "token-classification":
        return [json.loads(row) for row in results["entities"]]
    if task == "question-answering":
        return [
            {"score": float(s), "start": int(b), "end": int(e), "answer": a.decode()}
            for s, b, e, a in zip(results["score"], results["start"], results["end"], results["answer"], strict=True)
        ]
    return [
        [
            {"score": float(s), "token": int(t), "token_str": ts.decode(), "sequence": seq.decode()}
            for s, t, ts, seq in zip(scores, tokens, token_strs, sequences, strict=True)
        ]
        for scores, tokens, token_strs, sequences in zip(
            results["score"], results["token"], results["token_str"], results["sequence"], strict=True
        )
    ]
