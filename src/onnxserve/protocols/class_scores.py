"""Answers of every class of every input with its score: TEI ``/predict`` and TF Serving ``:classify``.

Such an answer has one entry per (input, class): 1,000 inputs to a 1,000-class model are a million
entries, 170 inputs to a 20,000-class model 3.4 million. Built as one document of Python objects on the
event loop, that one 1.5 KB request made a 183 MB answer (``--max-response-bytes`` is 64 MiB), took
+1 GB and held the health probes 2 to 4.6 s (outside attack rt27). Here the answer's size is known
exactly before any entry is made (:func:`size`: its structure, its labels' text, its scores formatted by
orjson a slice at a time, no Python object per entry) and refused above the limit; the answer is then
counted in the in-flight budget and written (:func:`encode`) a slice of rows at a time, each slice's
entries made, encoded by one orjson call and dropped, in a codec thread when it is large
(``offload.convert``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from onnxserve.core.text_tasks import class_names
from onnxserve.core.wire import response_too_large
from onnxserve.protocols import json_size

SLICE_ENTRIES = 1 << 16
"""Entries (input, class) made and encoded at once: the Python objects alive at a time."""

ADVICE = "fewer inputs per request, or only the top class: V2 /infer answers 'label' and 'score' per text"
"""What a refused answer's client can ask for instead."""

Row = Callable[[npt.NDArray[Any], Sequence[str]], list[Any]]


def _ranked(row: npt.NDArray[Any], names: Sequence[str]) -> list[Any]:
    """TEI: ``{"score", "label"}`` per class, highest score first (ties in class order)."""
    order = np.argsort(-row, kind="stable")
    return [{"score": s, "label": names[i]} for i, s in zip(order.tolist(), row[order].tolist(), strict=True)]


def _in_class_order(row: npt.NDArray[Any], names: Sequence[str]) -> list[Any]:
    """TF Serving: ``[label, score]`` per class, in class order."""
    return [[name, s] for name, s in zip(names, row.tolist(), strict=True)]


@dataclass(frozen=True)
class Form:
    """How one API writes the answer: ``head`` and ``tail`` around the rows (``listed``: in a JSON list,
    else the one row bare), ``entry`` the bytes of one entry besides its score and label, ``row`` its
    entries of one input."""

    head: bytes
    tail: bytes
    listed: bool
    entry: int
    row: Row
    encoding: str


TEI_ROWS = Form(b"[", b"]", True, len('{"score":,"label":}'), _ranked, "as TEI /predict JSON")
TEI_SINGLE = Form(b"", b"", False, TEI_ROWS.entry, _ranked, TEI_ROWS.encoding)
TF_CLASSIFY = Form(b'{"result":[', b"]}", True, len("[,]"), _in_class_order, "as TF Serving :classify JSON")


def names_of(labels: Mapping[int, str], scores: npt.NDArray[Any]) -> list[str]:
    """The names of the classes ``scores`` has a column for."""
    return class_names(labels, int(scores.shape[-1]))


def _step(names: Sequence[str]) -> int:
    """Rows made and encoded at once."""
    return max(1, SLICE_ENTRIES // max(1, len(names)))


def _scores_text(scores: npt.NDArray[Any], step: int) -> int:
    """The bytes of the scores' text (no brackets or commas), exactly as the answer writes them (orjson
    writes a float64 array as it writes the Python floats of its values), a slice of rows at a time."""
    total = 0
    for start in range(0, scores.shape[0], step):
        part = scores[start : start + step].astype(np.float64)
        total += len(orjson.dumps(part, option=orjson.OPT_SERIALIZE_NUMPY)) - json_size.structure(part.shape)
    return total


def answer_size(scores: npt.NDArray[Any], names: Sequence[str], form: Form) -> int:
    """The exact size of the answer ``form`` writes of ``scores`` [inputs, classes], before any entry is
    made: its structure, its labels' JSON text once per input, its scores' text."""
    rows, classes = int(scores.shape[0]), len(names)
    labels = json_size.orjson_strings_length(name.encode("utf-8") for name in names)
    per_row = 2 + max(0, classes - 1) + classes * form.entry + labels
    structure = len(form.head) + len(form.tail) + rows * per_row + (max(0, rows - 1) if form.listed else 0)
    return structure + _scores_text(scores, _step(names))


def size(model: str, scores: npt.NDArray[Any], labels: Mapping[int, str], form: Form, limit: int) -> int:
    """The size of the answer :func:`encode` writes, what the in-flight budget holds for it; refused
    (TooLargeError, 400) when it is above ``limit`` (0: no limit)."""
    size = answer_size(scores, names_of(labels, scores), form)
    if limit and size > limit:
        rows, classes = scores.shape
        raise response_too_large(
            model, size, limit, encoding=f"{form.encoding} ({rows} inputs x {classes} classes)", advice=ADVICE
        )
    return size


def encode(model: str, scores: npt.NDArray[Any], labels: Mapping[int, str], form: Form, limit: int) -> bytes:
    """The answer, written a slice of rows at a time; refused once its text passes ``limit`` (0: none)."""
    names = names_of(labels, scores)
    step = _step(names)
    body = json_size.Body(limit)
    try:
        body.write(form.head)
        if not form.listed:
            body.write(orjson.dumps(form.row(scores[0], names)))
        else:
            for start in range(0, scores.shape[0], step):
                if start:
                    body.write(b",")
                rows = [form.row(row, names) for row in scores[start : start + step]]
                text = orjson.dumps(rows)
                del rows
                body.write(memoryview(text)[1:-1])
        body.write(form.tail)
    except json_size.Full:
        body.drop()
        raise response_too_large(model, 0, limit, at_least=True, encoding=form.encoding, advice=ADVICE) from None
    return body.value()
