"""Side-by-side validation: run the original and the ONNX model on the same inputs and compare.

A report lists every case (its shapes, the largest absolute difference per output, and the lowest
cosine similarity for embedding outputs) and whether all of them are within tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

Arrays = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class CaseResult:
    name: str
    input_shapes: dict[str, list[int]]
    max_abs_diff: dict[str, float]
    min_cosine: dict[str, float]
    passed: bool


@dataclass
class ValidationReport:
    atol: float
    min_cosine: float
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "min_cosine": self.min_cosine,
            "cases": [asdict(c) for c in self.cases],
        }

    def summary(self) -> str:
        lines = [
            f"validation {'passed' if self.passed else 'FAILED'} (atol {self.atol:g}, cosine >= {self.min_cosine})"
        ]
        for c in self.cases:
            shapes = " ".join(f"{k}{v}" for k, v in c.input_shapes.items())
            diffs = ", ".join(f"{k} max|d|={v:.2e}" for k, v in c.max_abs_diff.items())
            cos = ", ".join(f"{k} cos>={v:.6f}" for k, v in c.min_cosine.items())
            lines.append(f"  {'ok ' if c.passed else 'BAD'} {c.name}: {shapes}: {diffs}{'; ' + cos if cos else ''}")
        return "\n".join(lines)


def row_cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """The lowest cosine similarity between matching rows (last axis) of ``a`` and ``b``."""
    x = a.reshape(-1, a.shape[-1]).astype(np.float64)
    y = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = np.where(norms > 0, (x * y).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return float(cos.min()) if cos.size else 1.0


def compare(
    cases: Sequence[tuple[str, Arrays]],
    reference: Callable[[Arrays], Arrays],
    candidate: Callable[[Arrays], Arrays],
    atol: float,
    min_cosine: float,
    embedding_outputs: Sequence[str] = (),
) -> ValidationReport:
    """Run ``reference`` and ``candidate`` on every case and compare every output they share."""
    report = ValidationReport(atol=atol, min_cosine=min_cosine)
    for name, inputs in cases:
        expected = reference(inputs)
        got = candidate(inputs)
        diffs: dict[str, float] = {}
        cosines: dict[str, float] = {}
        ok = True
        for out, want in expected.items():
            have = got[out]
            if have.shape != want.shape:
                diffs[out] = float("inf")
                ok = False
                continue
            diffs[out] = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
            ok = ok and diffs[out] <= atol
            if out in embedding_outputs:
                cosines[out] = row_cosine(have, want)
                ok = ok and cosines[out] >= min_cosine
        report.cases.append(CaseResult(name, {k: list(v.shape) for k, v in inputs.items()}, diffs, cosines, ok))
    return report
