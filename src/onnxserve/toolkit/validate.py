"""Side-by-side validation: run the original and the ONNX model on the same inputs and compare.

A report lists every case (its shapes, the largest absolute difference per output, the lowest
cosine similarity for embedding outputs, and the agreement of the arg-max for label-like outputs:
class labels, token labels, answer spans, top-1 tokens; or, for outputs that already are labels, the
share of equal elements) and whether all are within tolerance. The report may say where its inputs
came from (``samples``), e.g. a calibration file or random data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

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


def row_cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """The lowest cosine similarity between matching rows (last axis) of ``a`` and ``b``."""
    x = a.reshape(-1, a.shape[-1]).astype(np.float64)
    y = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = np.where(norms > 0, (x * y).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return float(cos.min()) if cos.size else 1.0


def argmax_agreement(reference: npt.NDArray[Any], candidate: npt.NDArray[Any], margin: float) -> float:
    """The share of positions whose arg-max over the last axis agrees, among those the reference decides
    by more than ``margin`` (a near-tie in the reference is no evidence either way)."""
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cand = candidate.reshape(-1, candidate.shape[-1])
    if ref.shape[-1] < 2:
        return 1.0
    top2 = np.sort(ref, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > margin
    if not decided.any():
        return 1.0
    return float((ref.argmax(axis=1) == cand.argmax(axis=1))[decided].mean())


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
                agreements[out] = float(np.mean(have == want)) if want.size else 1.0
                ok = ok and agreements[out] >= min_agreement
                continue
            delta = np.abs(have.astype(np.float64) - want.astype(np.float64))
            diffs[out] = float(np.max(delta)) if want.size else 0.0
            ok = ok and bool(np.all(delta <= atol + rtol * np.abs(want.astype(np.float64))))
            if out in embedding_outputs:
                cosines[out] = row_cosine(have, want)
                ok = ok and cosines[out] >= min_cosine
            if out in agreement_outputs:
                agreements[out] = argmax_agreement(want, have, margin=10 * max(atol, 0.0))
                ok = ok and agreements[out] >= min_agreement
        shapes = {k: list(v.shape) for k, v in inputs.items()}
        report.cases.append(CaseResult(name, shapes, diffs, cosines, ok, agreements))
    return report
