"""Answers of every class of every input (TEI /predict, TF Serving :classify): sized exactly before they are
built, and written in slices byte for byte as one document of Python objects writes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import orjson
import pytest

from onnxserve.errors import TooLargeError
from onnxserve.protocols import class_scores
from onnxserve.protocols.class_scores import TEI_ROWS, TEI_SINGLE, TF_CLASSIFY

LABELS = {0: "negative", 2: 'a "quoted" \\ label', 3: "café ✓ \x01"}  # class 1 and 4 have no name: LABEL_i


def _tei(scores: npt.NDArray[np.float32], names: Sequence[str], single: bool) -> bytes:
    """What one document of Python objects writes (the code before outside attack rt27)."""
    rows = []
    for row in scores:
        order = sorted(range(len(names)), key=lambda i: -float(row[i]))
        rows.append([{"score": float(row[i]), "label": names[i]} for i in order])
    return orjson.dumps(rows[0] if single else rows)


def _tf(scores: npt.NDArray[np.float32], names: Sequence[str]) -> bytes:
    return orjson.dumps({"result": [[[n, float(s)] for n, s in zip(names, row, strict=True)] for row in scores]})


@pytest.mark.parametrize("slice_entries", [1 << 16, 3])  # 3: rows of 5 classes are cut within a row
@pytest.mark.parametrize("rows", [1, 2, 40])
def test_answers_are_written_as_one_document_writes_them_at_their_computed_size(
    slice_entries: int, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(class_scores, "SLICE_ENTRIES", slice_entries)
    scores = np.random.default_rng(rows).random((rows, 5)).astype(np.float32)
    scores[0, 1] = scores[0, 3]  # a tie keeps class order
    scores[-1, 0] = 0.0
    names = ["negative", "LABEL_1", 'a "quoted" \\ label', "café ✓ \x01", "LABEL_4"]
    for form, expected, given in (
        (TEI_ROWS, _tei(scores, names, False), scores),
        (TEI_SINGLE, _tei(scores[:1], names, True), scores[:1]),
        (TF_CLASSIFY, _tf(scores, names), scores),
    ):
        answer = class_scores.encode("m", given, LABELS, form, 0)
        assert answer == expected
        assert class_scores.size("m", given, LABELS, form, 0) == len(answer)
        assert class_scores.size("m", given, LABELS, form, len(answer)) == len(answer)


def test_an_answer_above_the_limit_is_refused_with_its_size_and_shape() -> None:
    scores = np.full((170, 2000), 1 / 2000, dtype=np.float32)
    size = class_scores.answer_size(scores, class_scores.names_of({}, scores), TEI_ROWS)
    with pytest.raises(TooLargeError, match=rf"would be {size} bytes encoded as TEI /predict JSON \(170 inputs x 2000"):
        class_scores.size("m", scores, {}, TEI_ROWS, size - 1)
