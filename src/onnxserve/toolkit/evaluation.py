"""The toolkit's one comparer: run a reference and a candidate model on the same evaluation inputs and
measure how far the candidate strays, input by input.

Every command that asks "is this transformed model still the same model?" -- ``optimize``'s report,
selective int8, ``tune`` and ``diff`` -- measures here, so that they agree on the same model and
inputs. Per evaluated input (one sentence of a text model, one row of a tensor model) and per output:

- the largest absolute difference;
- the cosine of the served vectors (rows of the last axis; the sentence embedding of a
  feature-extraction model; token-level outputs at real tokens only), the input's lowest;
- the arg-max agreement of label-like outputs (positions the reference decides by more than
  :data:`AGREEMENT_MARGIN`), or the share of equal elements for outputs that are labels already.

The result gives the worst case, percentiles of the per-input cosine, the overall agreement, and names
the worst inputs. An :class:`AccuracyBudget` turns the numbers into a verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from onnxserve.config import ExecutionProvider, SessionOptions
from onnxserve.core.runtime import create_session
from onnxserve.errors import ModelLoadError, OptimizeError
from onnxserve.toolkit.samples import Feeds, Samples, batch_rows

AGREEMENT_MARGIN = 1e-4
"""A reference arg-max decided by less than this is a tie, no evidence either way."""

LABEL_TASKS = ("text-classification", "token-classification", "question-answering", "fill-mask")

PERCENTILES = (1, 5, 25, 50)
"""Percentiles of the per-input cosine that reports give (besides the worst)."""

WORST_NAMED = 5
"""How many of the worst inputs a report names."""

EMBEDDING_COSINE = 0.99
LABEL_AGREEMENT = 0.995
"""Default budgets of a quantized model: worst-case cosine of the served embedding, and label agreement."""

Runner = Callable[[Feeds], Mapping[str, npt.NDArray[Any]]]


@dataclass(frozen=True)
class AccuracyBudget:
    """What a transformed model must keep: cosine and agreement at least, max abs difference at most."""

    cosine: float | None = None
    agreement: float | None = None
    max_abs: float | None = None

    @classmethod
    def default_for(cls, task: str | None) -> AccuracyBudget:
        """The budget a quantized model keeps unless the user gives one: worst-case cosine >= 0.99 for
        embeddings, label agreement >= 99.5 % for classifiers; both (where they apply) for tensor models."""
        if task == "feature-extraction":
            return cls(cosine=EMBEDDING_COSINE)
        if task in LABEL_TASKS:
            return cls(agreement=LABEL_AGREEMENT)
        return cls(cosine=EMBEDDING_COSINE, agreement=LABEL_AGREEMENT)

    @classmethod
    def parse(cls, text: str) -> AccuracyBudget:
        """``cosine=0.99,agreement=0.99,max_abs=0.05`` (any subset, in any order); ``none``: no budget."""
        if text.strip().lower() == "none":
            return cls()
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, raw = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in ("cosine", "agreement", "max_abs"):
                raise OptimizeError(
                    f"--max-accuracy-loss {text!r}: expected KEY=VALUE pairs with KEY one of cosine, agreement, "
                    "max_abs, e.g. cosine=0.99,agreement=0.99"
                )
            try:
                value = float(raw)
            except ValueError:
                raise OptimizeError(f"--max-accuracy-loss: {key}={raw!r} is not a number") from None
            if key != "max_abs" and not -1.0 <= value <= 1.0:
                raise OptimizeError(f"--max-accuracy-loss: {key} must be between -1 and 1, got {value}")
            if key == "max_abs" and value < 0:
                raise OptimizeError(f"--max-accuracy-loss: max_abs must be >= 0, got {value}")
            values[key] = value
        if not values:
            raise OptimizeError("--max-accuracy-loss is empty; e.g. cosine=0.99,agreement=0.99")
        return cls(**values)

    @property
    def empty(self) -> bool:
        return self.cosine is None and self.agreement is None and self.max_abs is None

    def violations(self, accuracy: Accuracy) -> list[str]:
        problems: list[str] = []
        if self.cosine is not None and accuracy.cosine is not None and accuracy.cosine < self.cosine:
            problems.append(f"cosine {accuracy.cosine:.6f} < {self.cosine}")
        if self.agreement is not None and accuracy.agreement is not None and accuracy.agreement < self.agreement:
            problems.append(f"agreement {accuracy.agreement:.4f} < {self.agreement}")
        if self.max_abs is not None and accuracy.max_abs > self.max_abs:
            problems.append(f"max abs diff {accuracy.max_abs:.3g} > {self.max_abs}")
        return problems

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class OutputAccuracy:
    name: str
    max_abs: float
    cosine: float | None = None
    agreement: float | None = None
    mean_abs: float = 0.0


@dataclass(frozen=True)
class WorstInput:
    """One of the inputs the candidate did worst on: its label (the sentence, or ``row N``)."""

    input: str
    cosine: float | None
    agrees: bool | None
    max_abs: float


@dataclass(frozen=True)
class Accuracy:
    outputs: list[OutputAccuracy]
    samples: str
    rows: int
    percentiles: dict[str, float] = field(default_factory=dict)  # "p5" -> per-input cosine
    worst: list[WorstInput] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float | None:
        found = [o.cosine for o in self.outputs if o.cosine is not None]
        return min(found) if found else None

    @property
    def agreement(self) -> float | None:
        found = [o.agreement for o in self.outputs if o.agreement is not None]
        return min(found) if found else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "rows": self.rows,
            "max_abs_diff": self.max_abs,
            "cosine": self.cosine,
            "agreement": self.agreement,
            "cosine_percentiles": self.percentiles,
            "worst_inputs": [asdict(w) for w in self.worst],
            "outputs": [asdict(o) for o in self.outputs],
        }


def open_session(
    model: Path | onnx.ModelProto,
    threads: int = 0,
    level: str = "all",
    provider: str = "CPUExecutionProvider",
    where: str = "",
) -> Any:
    """An ONNX Runtime session for ``model`` (a file or a model in memory) with these settings, made
    by ``core.runtime.create_session``."""
    where = where or str(model if isinstance(model, Path) else "the transformed model")
    options = SessionOptions(intra_op_num_threads=threads, graph_optimization_level=level)  # type: ignore[arg-type]
    try:
        return create_session(model, providers=[ExecutionProvider(name=provider)], options=options, where=where)
    except ModelLoadError as e:
        cause = str(e.__cause__ or e.message).splitlines()[0]
        raise OptimizeError(f"{where}: ONNX Runtime cannot load the transformed model: {cause}") from e


def session_runner(session: Any) -> Runner:
    """``feeds -> outputs by name`` over an ONNX Runtime session (only the inputs it declares)."""
    names = [o.name for o in session.get_outputs()]
    wanted = [i.name for i in session.get_inputs()]

    def run(feeds: Feeds) -> dict[str, npt.NDArray[Any]]:
        values = session.run(names, {n: feeds[n] for n in wanted if n in feeds})
        return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}

    return run


def compare_models(
    reference: Path | onnx.ModelProto, candidate: Path | onnx.ModelProto, samples: Samples, task: str | None = None
) -> Accuracy:
    """Run both models (files or models in memory) on every sample and compare each output they share."""
    ref = open_session(reference, where="" if isinstance(reference, Path) else "the source model")
    cand = open_session(candidate)
    missing = sorted({o.name for o in ref.get_outputs()} - {o.name for o in cand.get_outputs()})
    if missing:
        where = f"{candidate}: t" if isinstance(candidate, Path) else "T"
        raise OptimizeError(f"{where}he transformed model lost outputs {', '.join(missing)}")
    return compare_runs(session_runner(ref), session_runner(cand), samples, task)


def measures(task: str | None, name: str, array: npt.NDArray[Any], names: Sequence[str]) -> tuple[bool, bool]:
    """(cosine, agreement): which measures suit this float output. A sentence-embedding model is judged
    by the embedding it serves (token states feed the pooling; their differences show in max abs)."""
    if array.dtype.kind != "f" or array.ndim < 2 or array.shape[-1] < 2:
        return False, False
    if task == "feature-extraction":
        served = "sentence_embedding" if "sentence_embedding" in names else "last_hidden_state"
        return name == served, False
    if task in LABEL_TASKS:
        return False, True
    return True, True


@dataclass
class _OutputTally:
    max_abs: float = 0.0
    abs_sum: float = 0.0
    compared: int = 0
    cosine: float | None = None
    agreed: int = 0
    decided: int = 0
    measured_agreement: bool = False


def compare_runs(
    reference: Runner, candidate: Runner, samples: Samples, task: str | None = None, margin: float = AGREEMENT_MARGIN
) -> Accuracy:
    """The one comparison: both runners on every sample batch, measured input by input (an arg-max the
    reference decides by ``margin`` or less is a tie)."""
    labels = samples.labels
    tallies: dict[str, _OutputTally] = {}
    input_cosine: list[float | None] = []
    row_agrees: list[bool | None] = []
    row_max: list[float] = []
    for feeds in samples.batches:
        want, have = reference(feeds), candidate(feeds)
        rows = batch_rows(feeds)
        mask = feeds.get("attention_mask") if task is not None else None
        names = list(want)
        cos: list[float | None] = [None] * rows
        agrees: list[bool | None] = [None] * rows
        worst_abs = [0.0] * rows
        for name in names:
            if name not in have:
                continue
            w, h = np.asarray(want[name]), np.asarray(have[name])
            if w.shape != h.shape:
                raise OptimizeError(
                    f"output {name!r}: shape {list(h.shape)} after the transform, {list(w.shape)} before"
                )
            tally = tallies.setdefault(name, _OutputTally())
            per_row = w.ndim >= 1 and len(w) == rows
            cosine_on, agreement_on = measures(task, name, w, names) if w.dtype.kind == "f" else (False, False)
            for r in range(rows if per_row else 1):
                wr, hr = (w[r], h[r]) if per_row else (w, h)
                if mask is not None and per_row and w.ndim >= 3 and w.shape[:2] == mask.shape:
                    real = mask[r].astype(bool)
                    wr, hr = wr[real], hr[real]
                delta = max_abs_diff(wr, hr)
                tally.max_abs = max(tally.max_abs, delta)
                if wr.dtype.kind in "fiub" and wr.size:
                    tally.abs_sum += float(np.sum(np.abs(hr.astype(np.float64) - wr.astype(np.float64))))
                    tally.compared += int(wr.size)
                worst_abs[r] = max(worst_abs[r], delta)
                if w.dtype.kind != "f":  # labels, strings: the share of equal elements
                    same = wr == hr
                    tally.agreed += int(np.sum(same))
                    tally.decided += int(np.size(same))
                    tally.measured_agreement = True
                    agrees[r] = bool(np.all(same)) and agrees[r] is not False
                    continue
                if cosine_on:
                    c = row_cosine(wr.reshape(1, -1) if wr.ndim == 1 else wr, hr.reshape(1, -1) if hr.ndim == 1 else hr)
                    tally.cosine = c if tally.cosine is None else min(tally.cosine, c)
                    cos[r] = c if cos[r] is None else min(c, cos[r] or c)
                if agreement_on:
                    agreed, decided = argmax_counts(wr, hr, margin)
                    tally.agreed += agreed
                    tally.decided += decided
                    tally.measured_agreement = True
                    agrees[r] = (agreed == decided) and agrees[r] is not False
        input_cosine += cos
        row_agrees += agrees
        row_max += worst_abs
    outputs = [
        OutputAccuracy(
            name,
            t.max_abs,
            t.cosine,
            (t.agreed / t.decided if t.decided else 1.0) if t.measured_agreement else None,
            t.abs_sum / t.compared if t.compared else 0.0,
        )
        for name, t in tallies.items()
    ]
    found = [c for c in input_cosine if c is not None]
    percentiles = {f"p{p}": float(np.percentile(found, p, method="lower")) for p in PERCENTILES} if found else {}
    order = sorted(
        range(len(row_max)),
        key=lambda i: (
            row_agrees[i] is not False,
            input_cosine[i] if input_cosine[i] is not None else 2.0,
            -row_max[i],
        ),
    )
    worst = [
        WorstInput(labels[i] if i < len(labels) else f"row {i}", input_cosine[i], row_agrees[i], row_max[i])
        for i in order[:WORST_NAMED]
    ]
    return Accuracy(outputs, samples.source, len(row_max), percentiles, worst)


# -- the measures, each written once (export's validation uses them too) ------------------------------------


def max_abs_diff(want: npt.NDArray[Any], have: npt.NDArray[Any]) -> float:
    """The largest absolute difference (0 for outputs that are not numbers)."""
    if want.dtype.kind not in "fiub" or not want.size:
        return 0.0
    return float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))


def row_cosine(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """The lowest cosine similarity between matching rows (last axis) of ``a`` and ``b``; a vector is one
    row; rows that are zero on either side count as 1."""
    if a.ndim == 0:
        a, b = a.reshape(1, 1), b.reshape(1, 1)
    x = a.reshape(-1, a.shape[-1]).astype(np.float64)
    y = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = np.where(norms > 0, (x * y).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return float(cos.min()) if cos.size else 1.0


def argmax_counts(want: npt.NDArray[Any], have: npt.NDArray[Any], margin: float = AGREEMENT_MARGIN) -> tuple[int, int]:
    """(agreeing, decided) positions of the arg-max over the last axis: a position is decided when the
    reference's top two differ by more than ``margin`` (a near-tie is no evidence either way)."""
    if want.ndim == 0 or want.shape[-1] < 2 or not want.size:
        return 0, 0
    ref = want.reshape(-1, want.shape[-1]).astype(np.float64)
    cand = have.reshape(-1, have.shape[-1])
    top2 = np.sort(ref, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > margin
    agreed = (ref.argmax(axis=1) == cand.argmax(axis=1)) & decided
    return int(agreed.sum()), int(decided.sum())


def argmax_agreement(want: npt.NDArray[Any], have: npt.NDArray[Any], margin: float = AGREEMENT_MARGIN) -> float:
    """The share of decided positions whose arg-max agrees (1 when none is decided)."""
    agreed, decided = argmax_counts(want, have, margin)
    return agreed / decided if decided else 1.0


def equal_share(want: npt.NDArray[Any], have: npt.NDArray[Any]) -> float:
    """The share of equal elements: the agreement of outputs that are labels already."""
    return float(np.mean(have == want)) if want.size else 1.0
