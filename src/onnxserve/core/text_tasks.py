"""What each text task makes of a graph's outputs: labels, entities, answer spans, filled masks.

Every function returns named numpy arrays, one row per text, so that the same results travel over
any protocol (ragged results such as entity lists are JSON strings in a BYTES tensor) and the Python
``Pipeline`` can turn them into what Hugging Face pipelines return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from tokenizers import Tokenizer

from onnxserve.core.tokens import TokenizedText
from onnxserve.core.types import BYTES_ELEMENT_OVERHEAD
from onnxserve.errors import InvalidInputError

Arrays = dict[str, npt.NDArray[Any]]

MAX_ANSWER_TOKENS = 15
"""Longest answer span question-answering considers (Hugging Face's default)."""

TOP_K = 5
"""Candidates fill-mask returns per text (Hugging Face's default)."""

IGNORED_ENTITY_LABELS = ("O",)


def softmax(x: npt.NDArray[Any], axis: int = -1) -> npt.NDArray[np.float32]:
    shifted = x.astype(np.float64) - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    result: npt.NDArray[np.float32] = (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    return result


def sigmoid(x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    result: npt.NDArray[np.float32] = (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
    return result


def strings(values: Sequence[str]) -> npt.NDArray[Any]:
    array = np.empty(len(values), dtype=object)
    array[:] = [v.encode("utf-8") for v in values]
    return array


def _label(labels: Mapping[int, str], index: int) -> str:
    return labels.get(index, f"LABEL_{index}")


def class_names(labels: Mapping[int, str], count: int) -> list[str]:
    """The names of a classifier's ``count`` classes: its labels, ``LABEL_i`` where it has none."""
    return [_label(labels, i) for i in range(count)]


def class_labels_size(rows: int, names: Sequence[str]) -> tuple[int, int]:
    """The BYTES elements and bytes (``core.types.payload_bytes``) of ``class_labels`` for ``rows`` texts
    of a classifier whose classes are ``names``, known before it is made: one element per (text, class)."""
    per_row = sum(len(name.encode("utf-8")) for name in names) + BYTES_ELEMENT_OVERHEAD * len(names)
    return rows * len(names), rows * per_row


def text_classification(
    logits: npt.NDArray[Any], labels: Mapping[int, str], function: str, with_class_labels: bool = False
) -> Arrays:
    """``label`` and ``score`` of the most likely class and the raw ``logits``; also every class's
    ``probabilities``, and with ``with_class_labels`` their ``class_labels`` (what TF Serving's classify
    answers): one element per (text, class), each row the same names (the same ``bytes`` objects), made
    only when asked for and counted against the answer's limits before (``class_labels_size``)."""
    probabilities = sigmoid(logits) if function == "sigmoid" else softmax(logits)
    best = probabilities.argmax(axis=-1)
    names = class_names(labels, logits.shape[-1])
    results = {
        "label": strings([names[int(i)] for i in best]),
        "score": probabilities[np.arange(len(best)), best].astype(np.float32),
        "logits": logits.astype(np.float32),
        "probabilities": probabilities,
    }
    if with_class_labels:
        results["class_labels"] = np.tile(strings(names), (len(best), 1))
    return results


def token_classification(
    logits: npt.NDArray[Any], encodings: Sequence[TokenizedText], labels: Mapping[int, str]
) -> Arrays:
    """``entities``: per text, a JSON list of ``{entity, score, index, word, start, end}`` (no aggregation,
    special tokens and the ``O`` label left out, as Hugging Face's default pipeline does)."""
    probabilities = softmax(logits)
    rows = []
    for row, encoding in enumerate(encodings):
        entities = []
        for index, (token, special, (start, end)) in enumerate(
            zip(encoding.tokens, encoding.special_tokens_mask, encoding.offsets, strict=True)
        ):
            if special:
                continue
            best = int(probabilities[row, index].argmax())
            label = _label(labels, best)
            if label in IGNORED_ENTITY_LABELS:
                continue
            entities.append(
                {
                    "entity": label,
                    "score": float(probabilities[row, index, best]),
                    "index": index,
                    "word": token,
                    "start": start,
                    "end": end,
                }
            )
        rows.append(orjson.dumps(entities).decode())
    return {"entities": strings(rows), "logits": logits.astype(np.float32)}


def question_answering(
    start_logits: npt.NDArray[Any],
    end_logits: npt.NDArray[Any],
    encodings: Sequence[TokenizedText],
    contexts: Sequence[str],
) -> Arrays:
    """The best span in each context: ``answer`` text, ``score`` (p(start) * p(end)), character ``start``
    and ``end`` in the context."""
    answers, scores, starts, ends = [], [], [], []
    for row, encoding in enumerate(encodings):
        in_context = np.array([s == 1 for s in encoding.sequence_ids])
        length = len(encoding.sequence_ids)
        if not in_context.any():
            answers.append("")
            scores.append(0.0)
            starts.append(0)
            ends.append(0)
            continue
        p_start = softmax(np.where(in_context, start_logits[row, :length], -np.inf))
        p_end = softmax(np.where(in_context, end_logits[row, :length], -np.inf))
        pair = np.triu(np.outer(p_start, p_end))  # start <= end
        pair = np.tril(pair, MAX_ANSWER_TOKENS - 1)  # end - start < MAX_ANSWER_TOKENS
        s, e = np.unravel_index(int(pair.argmax()), pair.shape)
        char_start, char_end = encoding.offsets[s][0], encoding.offsets[e][1]
        answers.append(contexts[row][char_start:char_end])
        scores.append(float(pair[s, e]))
        starts.append(char_start)
        ends.append(char_end)
    return {
        "answer": strings(answers),
        "score": np.array(scores, dtype=np.float32),
        "start": np.array(starts, dtype=np.int64),
        "end": np.array(ends, dtype=np.int64),
    }


def fill_mask(
    logits: npt.NDArray[Any], encodings: Sequence[TokenizedText], tokenizer: Tokenizer, mask_id: int, top_k: int = TOP_K
) -> Arrays:
    """For the first mask token of each text, the ``top_k`` candidates: ``token`` ids, ``token_str``,
    ``score`` and the completed ``sequence``."""
    top_k = min(top_k, logits.shape[-1])
    tokens = np.zeros((len(encodings), top_k), dtype=np.int64)
    scores = np.zeros((len(encodings), top_k), dtype=np.float32)
    token_strs: list[str] = []
    sequences: list[str] = []
    for row, encoding in enumerate(encodings):
        positions = [i for i, token_id in enumerate(encoding.ids) if token_id == mask_id]
        if not positions:
            raise InvalidInputError(f"text {row} has no mask token ({tokenizer.id_to_token(mask_id)})")
        probabilities = softmax(logits[row, positions[0]])
        best = np.argsort(-probabilities)[:top_k]
        tokens[row, : len(best)] = best
        scores[row, : len(best)] = probabilities[best]
        for candidate in best:
            ids = list(encoding.ids)
            ids[positions[0]] = int(candidate)
            token_strs.append(tokenizer.decode([int(candidate)], skip_special_tokens=False))
            sequences.append(tokenizer.decode(ids, skip_special_tokens=True))
    shape = (len(encodings), top_k)
    return {
        "token": tokens,
        "token_str": strings(token_strs).reshape(shape),
        "score": scores,
        "sequence": strings(sequences).reshape(shape),
    }


def ranking_logit(logits: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """A cross-encoder's relevance logit per pair: its one logit, or with two classes the positive one's
    margin over the negative (so that its sigmoid is the positive class's softmax probability)."""
    if logits.ndim != 2 or logits.shape[-1] not in (1, 2):
        raise InvalidInputError(f"text-ranking needs one or two logits per pair, the model gives {logits.shape[1:]}")
    raw = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
    result: npt.NDArray[np.float32] = raw.astype(np.float32)
    return result


def text_ranking(logits: npt.NDArray[Any]) -> Arrays:
    """``score``: each (query, text) pair's relevance in [0, 1] (the sigmoid of ``raw_score``, what
    sentence-transformers' ``CrossEncoder`` predicts for one-logit models), and the ``raw_score`` logit."""
    raw = ranking_logit(logits)
    return {"score": sigmoid(raw), "raw_score": raw}
