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

from onnxserve.core.pipeline import LOGITS_OUTPUT
from onnxserve.core.text_tasks import class_names
from onnxserve.core.types import ModelMetadata
from onnxserve.core.wire import response_too_large
from onnxserve.protocols import json_size

SLICE_ENTRIES = 1 << 16
"""Entries (input, class) made and encoded at once: the Python objects alive at a time."""

ADVICE = "fewer inputs per request, or only the top class: V2 /infer answers 'label' and 'score' per text"
"""What a refused answer's client can ask for instead."""

Entries = Callable[[npt.NDArray[Any], Sequence[str], npt.NDArray[np.intp]], list[Any]]


def _scored(row: npt.NDArray[Any], names: Sequence[str], classes: npt.NDArray[np.intp]) -> list[Any]:
    """TEI: ``{"score", "label"}`` of each of ``classes``."""
    return [{"score": s, "label": names[i]} for i, s in zip(classes.tolist(), row[classes].tolist(), strict=True)]


def _pairs(row: npt.NDArray[Any], names: Sequence[str], classes: npt.NDArray[np.intp]) -> list[Any]:
    """TF Serving: ``[label, score]`` of each of ``classes``."""
    return [[names[i], s] for i, s in zip(classes.tolist(), row[classes].tolist(), strict=True)]


@dataclass(frozen=True)
class Form:
    """How one API writes the answer: ``head`` and ``tail`` around the rows (``listed``: in a JSON list,
    else the one row bare), ``entry`` the bytes of one entry besides its score and label, ``entries``
    those of some classes of one input, ``ranked``: highest score first (ties in class order), else in
    class order."""

    head: bytes
    tail: bytes
    listed: bool
    entry: int
    entries: Entries
    ranked: bool
    encoding: str

    def order(self, row: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
        """The classes of one input in the order they are written."""
        return np.argsort(-row, kind="stable") if self.ranked else np.arange(row.shape[0])


TEI_ROWS = Form(b"[", b"]", True, len('{"score":,"label":}'), _scored, True, "as TEI /predict JSON")
TEI_SINGLE = Form(b"", b"", False, TEI_ROWS.entry, _scored, True, TEI_ROWS.encoding)
TF_CLASSIFY = Form(b'{"result":[', b"]}", True, len("[,]"), _pairs, False, "as TF Serving :classify JSON")


def names_of(labels: Mapping[int, str], scores: npt.NDArray[Any]) -> list[str]:
    """The names of the classes ``scores`` has a column for."""
    return class_names(labels, int(scores.shape[-1]))


def _step(names: Sequence[str]) -> int:
    """Rows made and encoded at once."""
    return max(1, SLICE_ENTRIES // max(1, len(names)))


def _scores_text(scores: npt.NDArray[Any]) -> int:
    """The bytes of the scores' text (no brackets or commas), exactly as the answer writes them (orjson
    writes a float64 array as it writes the Python floats of its values), a slice at a time."""
    flat = scores.reshape(-1)
    total = 0
    for start in range(0, flat.shape[0], SLICE_ENTRIES):
        part = flat[start : start + SLICE_ENTRIES].astype(np.float64)
        total += len(orjson.dumps(part, option=orjson.OPT_SERIALIZE_NUMPY)) - json_size.structure(part.shape)
    return total


def _structure(rows: int, names: Sequence[str], form: Form) -> int:
    """The bytes of an answer of ``rows`` inputs besides its scores' text: its structure and its labels'
    JSON text once per input."""
    classes = len(names)
    labels = json_size.orjson_strings_length(name.encode("utf-8") for name in names)
    per_row = 2 + max(0, classes - 1) + classes * form.entry + labels
    return len(form.head) + len(form.tail) + rows * per_row + (max(0, rows - 1) if form.listed else 0)


def answer_size(scores: npt.NDArray[Any], names: Sequence[str], form: Form) -> int:
    """The exact size of the answer ``form`` writes of ``scores`` [inputs, classes], before any entry is
    made: its structure, its labels' JSON text once per input, its scores' text."""
    return _structure(int(scores.shape[0]), names, form) + _scores_text(scores)


SCORE_BYTES = 3
"""The fewest bytes a score takes in an answer: orjson writes no float shorter than ``0.0``."""


def class_count(meta: ModelMetadata) -> int:
    """The classes of a text classifier known before a run: the last dimension of its graph's ``logits``
    output when static, else 0."""
    for spec in meta.outputs:
        if spec.name == LOGITS_OUTPUT and spec.shape and spec.shape[-1] > 0:
            return int(spec.shape[-1])
    return 0


def refuse_before_run(meta: ModelMetadata, rows: int, form: Form, limit: int) -> None:
    """Refuse (TooLargeError, 400) an answer of ``rows`` inputs that is above ``limit`` (0: none) whatever
    the scores, before the model runs: its structure and labels are known from the model's class count,
    and each score takes at least :data:`SCORE_BYTES`. (Before: 800 one-character texts to a 20,000-class
    model ran 1.9 s, and 8 at once took 1.1 GB, to be refused after: outside attack rt28.) Answers that
    may fit are sized exactly after the run (:func:`size`)."""
    classes = class_count(meta)
    if not limit or not classes or meta.pipeline is None:
        return
    rows = rows if form.listed else 1
    least = _structure(rows, class_names(meta.pipeline.labels, classes), form) + rows * classes * SCORE_BYTES
    if least > limit:
        raise response_too_large(
            meta.name,
            least,
            limit,
            at_least=True,
            encoding=f"{form.encoding} ({rows} inputs x {classes} classes)",
            advice=ADVICE,
        )


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


def _rows(scores: npt.NDArray[Any], names: Sequence[str], form: Form) -> list[Any]:
    """The entries of a few rows, each row a list."""
    return [form.entries(row, names, form.order(row)) for row in scores]


def _write_row(body: json_size.Body, row: npt.NDArray[Any], names: Sequence[str], form: Form) -> None:
    """One input of more classes than a slice: its entries a slice at a time."""
    order = form.order(row)
    body.write(b"[")
    for start in range(0, order.shape[0], SLICE_ENTRIES):
        if start:
            body.write(b",")
        body.write(memoryview(orjson.dumps(form.entries(row, names, order[start : start + SLICE_ENTRIES])))[1:-1])
    body.write(b"]")


def encode(model: str, scores: npt.NDArray[Any], labels: Mapping[int, str], form: Form, limit: int) -> bytes:
    """The answer, written a slice of rows (or of one row's classes) at a time; refused once its text passes
    ``limit`` (0: none)."""
    names = names_of(labels, scores)
    step = _step(names)
    body = json_size.Body(limit)
    try:
        body.write(form.head)
        rows = scores if form.listed else scores[:1]
        for start in range(0, rows.shape[0], step):
            if start:
                body.write(b",")
            if len(names) > SLICE_ENTRIES:
                _write_row(body, rows[start], names, form)
            else:
                body.write(memoryview(orjson.dumps(_rows(rows[start : start + step], names, form)))[1:-1])
        body.write(form.tail)
    except json_size.Full:
        body.drop()
        raise response_too_large(model, 0, limit, at_least=True, encoding=form.encoding, advice=ADVICE) from None
    return body.value()
