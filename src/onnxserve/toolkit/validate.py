"""Side-by-side validation: run the original and the ONNX model on the same inputs and compare.

A report lists every case (its shapes, the largest absolute difference per output, the lowest
cosine similarity for embedding outputs, and the agreement of the arg-max for label-like outputs:
class labels, token labels, answer spans, top-1 tokens; or, for outputs that already are labels, the
share of equal elements) and whether all are within tolerance. The measures are the toolkit's one
comparer's (:mod:`onnxserve.toolkit.evaluation`), so an export's validation, ``optimize``'s report and
``diff`` give the same numbers for the same outputs; what validation adds is the verdict (``atol``,
``rtol``, minimum cosine and agreement). The report may say where its inputs came from (``samples``),
e.g. a calibration file or random data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from onnxserve.toolkit.evaluation import (
    AGREEMENT_MARGIN,
    argmax_agreement,
    equal_share,
    max_abs_diff,
    row_cosine,
)

Arrays = Mapping[str, npt.NDArray[Any]]

REPORT_FILENAME = "validation.json"
"""The report's name in a version folder, beside ``model.onnx``."""


@dataclass(frozen=True)
class CaseResult:
    name: str
    input_shapes: dict[str, list[int]]
    max_abs_diff: dict[str, float]
    min_cosine: dict[str, float]
    passed: bool
    agreement: dict[str, float] = field(default_factory=dict)


@dataclass
class ValidationReport:
    atol: float
    min_cosine: float
    cases: list[CaseResult] = field(default_factory=list)
    min_agreement: float = 1.0
    rtol: float = 0.0  # a difference passes when |candidate - reference| <= atol + rtol * |reference|
    samples: str | None = None  # where the inputs came from, when that is worth saying

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "min_cosine": self.min_cosine,
            "min_agreement": self.min_agreement,
            **({"rtol": self.rtol} if self.rtol else {}),
            **({"samples": self.samples} if self.samples is not None else {}),
            "cases": [asdict(c) for c in self.cases],
        }

    def write(self, folder: Path) -> Path:
        """Save the report as ``folder/validation.json``."""
        path = folder / REPORT_FILENAME
        path.write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2))
        return path

    def summary(self) -> str:
        lines = [
            f"validation {'passed' if self.passed else 'FAILED'} (atol {self.atol:g}"
            + (f", rtol {self.rtol:g}" if self.rtol else "")
            + (f", cosine >= {self.min_cosine}" if any(c.min_cosine for c in self.cases) else "")
            + (f", agreement >= {self.min_agreement}" if any(c.agreement for c in self.cases) else "")
            + ")"
        ]
        if self.samples is not None:
            lines.append(f"  inputs: {self.samples}")
        for c in self.cases:
            shapes = " ".join(f"{k}{v}" for k, v in c.input_shapes.items())
            diffs = ", ".join(f"{k} max|d|={v:.2e}" for k, v in c.max_abs_diff.items())
            measures = [f"{k} cos>={v:.6f}" for k, v in c.min_cosine.items()]
            measures += [f"{k} agreement={v:.4f}" for k, v in c.agreement.items()]
            extra = "; " + ", ".join(measures) if measures else ""
            lines.append(f"  {'ok ' if c.passed else 'BAD'} {c.name}: {shapes}: {diffs}{extra}")
        return "\n".join(lines)


def compare(
    cases: Sequence[tuple[str, Arrays]],
    reference: Callable[[Arrays], Arrays],
    candidate: Callable[[Arrays], Arrays],
    atol: float,
    min_cosine: float,
    embedding_outputs: Sequence[str] = (),
    agreement_outputs: Sequence[str] = (),
    min_agreement: float = 1.0,
    exact_outputs: Sequence[str] = (),
    rtol: float = 0.0,
    samples: str | None = None,
) -> ValidationReport:
    """Run ``reference`` and ``candidate`` on every case and compare every output they share.

    ``exact_outputs`` (labels, integer or string) are not compared by difference: their agreement is
    the share of elements that are equal, and it must reach ``min_agreement``.
    """
    report = ValidationReport(atol=atol, min_cosine=min_cosine, min_agreement=min_agreement, rtol=rtol, samples=samples)
    for name, inputs in cases:
        expected = reference(inputs)
        got = candidate(inputs)
        diffs: dict[str, float] = {}
        cosines: dict[str, float] = {}
        agreements: dict[str, float] = {}
        ok = True
        for out, want in expected.items():
            have = got[out]
            if have.shape != want.shape:
                diffs[out] = float("inf")
                ok = False
                continue
            if out in exact_outputs:
                agreements[out] = equal_share(want, have)
                ok = ok and agreements[out] >= min_agreement
                continue
            diffs[out] = max_abs_diff(want, have)
            ok = ok and within_tolerance(want, have, atol, rtol)
            if out in embedding_outputs:
                cosines[out] = row_cosine(want, have)
                ok = ok and cosines[out] >= min_cosine
            if out in agreement_outputs:
                agreements[out] = argmax_agreement(want, have, margin=agreement_margin(atol))
                ok = ok and agreements[out] >= min_agreement
        shapes = {k: list(v.shape) for k, v in inputs.items()}
        report.cases.append(CaseResult(name, shapes, diffs, cosines, ok, agreements))
    return report


def agreement_margin(atol: float) -> float:
    """The arg-max margin of a validation at tolerance ``atol``: a difference the tolerance allows must not
    count as a changed decision (never below the comparer's own margin)."""
    return max(10 * max(atol, 0.0), AGREEMENT_MARGIN)


def within_tolerance(want: npt.NDArray[Any], have: npt.NDArray[Any], atol: float, rtol: float) -> bool:
    """Whether every ``|have - want| <= atol + rtol * |want|``."""
    reference = want.astype(np.float64)
    return bool(np.all(np.abs(have.astype(np.float64) - reference) <= atol + rtol * np.abs(reference)))
