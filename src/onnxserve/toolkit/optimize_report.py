"""What a transform did to a model: accuracy on sample inputs, file size and latency, before and after.

Accuracy compares every output the two models share on the same sample batches: the largest absolute
difference, the lowest row cosine (embedding outputs) and the arg-max agreement (label-like outputs),
from :mod:`onnxserve.toolkit.validate`. For a text model, token-level outputs are compared at real
tokens only (padding positions carry no meaning). An :class:`AccuracyBudget` (``--max-accuracy-loss``)
turns the numbers into a verdict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import orjson
from rich.table import Table

from onnxserve.config import ExecutionProvider, SessionOptions
from onnxserve.core.runtime import available_providers, session_options
from onnxserve.errors import OptimizeError
from onnxserve.toolkit.samples import Feeds, Samples, resize_batch
from onnxserve.toolkit.validate import argmax_agreement, row_cosine

REPORT_FILENAME = "optimize_report.json"
"""The report's name in a version folder; beside a model file it is ``<file>.report.json``."""

AGREEMENT_MARGIN = 1e-4
"""A reference arg-max decided by less than this is a tie, no evidence either way."""

K = TypeVar("K")

LABEL_TASKS = ("text-classification", "token-classification", "question-answering", "fill-mask")


@dataclass(frozen=True)
class AccuracyBudget:
    """What a transformed model must keep: cosine and agreement at least, max abs difference at most."""

    cosine: float | None = None
    agreement: float | None = None
    max_abs: float | None = None

    @classmethod
    def parse(cls, text: str) -> AccuracyBudget:
        """``cosine=0.99,agreement=0.99,max_abs=0.05`` (any subset, in any order)."""
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


@dataclass(frozen=True)
class Accuracy:
    outputs: list[OutputAccuracy]
    samples: str
    rows: int

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
            "outputs": [asdict(o) for o in self.outputs],
        }


def _session(path: Path, threads: int = 0, level: str = "all", provider: str = "CPUExecutionProvider") -> Any:
    options = session_options(SessionOptions(intra_op_num_threads=threads, graph_optimization_level=level))  # type: ignore[arg-type]
    try:
        return ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=available_providers([ExecutionProvider(name=provider)], str(path)),
        )
    except Exception as e:  # ONNX Runtime raises several unrelated types for a model it refuses
        raise OptimizeError(f"{path}: ONNX Runtime cannot load the transformed model: {str(e).splitlines()[0]}") from e


def _measured(task: str | None, name: str, array: npt.NDArray[Any], names: Sequence[str]) -> tuple[bool, bool]:
    """(cosine, agreement): which task measures suit this output. A sentence-embedding model is judged
    by the embedding it serves (token states feed the pooling; their differences show in max abs)."""
    if array.dtype.kind != "f" or array.ndim < 2 or array.shape[-1] < 2:
        return False, False
    if task == "feature-extraction":
        served = "sentence_embedding" if "sentence_embedding" in names else "last_hidden_state"
        return name == served, False
    if task in LABEL_TASKS:
        return False, True
    return True, True


def _real_tokens(array: npt.NDArray[Any], mask: npt.NDArray[Any] | None) -> npt.NDArray[Any]:
    """A token-level output ``[batch, tokens, features]`` at real tokens only: ``[real tokens, features]``."""
    if mask is not None and array.ndim >= 3 and array.shape[:2] == mask.shape:
        selected: npt.NDArray[Any] = array[mask.astype(bool)]
        return selected
    return array


def compare_models(reference: Path, candidate: Path, samples: Samples, task: str | None = None) -> Accuracy:
    """Run both models on every sample batch and compare each output they share."""
    ref, cand = _session(reference), _session(candidate)
    names = [o.name for o in ref.get_outputs()]
    missing = sorted(set(names) - {o.name for o in cand.get_outputs()})
    if missing:
        raise OptimizeError(f"{candidate}: the transformed model lost outputs {', '.join(missing)}")
    worst: dict[str, dict[str, float]] = {n: {} for n in names}
    for feeds in samples.batches:
        want = dict(zip(names, ref.run(names, feeds), strict=True))
        have = dict(zip(names, cand.run(names, feeds), strict=True))
        mask = feeds.get("attention_mask") if task is not None else None
        for name in names:
            w, h = np.asarray(want[name]), np.asarray(have[name])
            if w.shape != h.shape:
                raise OptimizeError(
                    f"output {name!r}: shape {list(h.shape)} after the transform, {list(w.shape)} before"
                )
            w, h = _real_tokens(w, mask), _real_tokens(h, mask)
            _accumulate(worst[name], task, name, w, h, names)
    outputs = [OutputAccuracy(n, m.get("max_abs", 0.0), m.get("cosine"), m.get("agreement")) for n, m in worst.items()]
    return Accuracy(outputs, samples.source, samples.rows)


def _accumulate(
    worst: dict[str, float],
    task: str | None,
    name: str,
    want: npt.NDArray[Any],
    have: npt.NDArray[Any],
    names: Sequence[str],
) -> None:
    if want.dtype.kind in "fiub":
        delta = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
        worst["max_abs"] = max(worst.get("max_abs", 0.0), delta)
    if want.dtype.kind not in "f":  # labels, strings: the share of equal elements
        share = float(np.mean(want == have)) if want.size else 1.0
        worst["agreement"] = min(worst.get("agreement", 1.0), share)
        return
    cosine, agreement = _measured(task, name, want, names)
    if cosine:
        worst["cosine"] = min(worst.get("cosine", 1.0), row_cosine(have, want))
    if agreement:
        worst["agreement"] = min(worst.get("agreement", 1.0), argmax_agreement(want, have, AGREEMENT_MARGIN))


def open_session(path: Path, threads: int = 0, level: str = "all", provider: str = "CPUExecutionProvider") -> Any:
    """An ONNX Runtime session for timing ``path`` with these settings."""
    return _session(path, threads, level, provider)


def interleaved_latency_ms(sessions: Mapping[K, Any], feeds: Feeds, batch: int, repeats: int) -> dict[K, float]:
    """Median milliseconds per run of each session at ``batch`` rows, on this machine.

    The sessions take turns, one run each per round, so that a noisy neighbour on the machine slows
    every candidate alike instead of whichever one happened to run at the time.
    """
    batch_feeds = resize_batch(feeds, batch)
    for session in sessions.values():
        for _ in range(2):  # warm-up: first runs allocate and pick kernels
            session.run(None, batch_feeds)
    times: dict[K, list[float]] = {key: [] for key in sessions}
    for _ in range(repeats):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, batch_feeds)
            times[key].append(time.perf_counter() - start)
    return {key: 1000 * statistics.median(t) for key, t in times.items()}


@dataclass(frozen=True)
class Fusion:
    """A transformer fusion: how many the source's layers call for, how many the fusers achieved."""

    name: str
    expected: int
    achieved: int
    reason: str = ""


@dataclass
class OptimizeReport:
    source: str
    destination: str
    steps: list[str]
    accuracy: Accuracy
    size_before: int
    size_after: int
    latency_before_ms: dict[int, float]
    latency_after_ms: dict[int, float]
    threads: int
    budget: AccuracyBudget = field(default_factory=AccuracyBudget)
    fusions: list[Fusion] = field(default_factory=list)
    fusers: dict[str, dict[str, int]] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    hardware: dict[str, Any] = field(default_factory=dict)

    @property
    def violations(self) -> list[str]:
        return self.budget.violations(self.accuracy)

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def size_ratio(self) -> float:
        return self.size_before / self.size_after if self.size_after else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "violations": self.violations,
            "source": self.source,
            "destination": self.destination,
            "steps": self.steps,
            "budget": self.budget.to_dict(),
            "accuracy": self.accuracy.to_dict(),
            "size_bytes": {"before": self.size_before, "after": self.size_after, "ratio": self.size_ratio},
            "latency_ms": {
                "threads": self.threads,
                "before": {str(b): v for b, v in self.latency_before_ms.items()},
                "after": {str(b): v for b, v in self.latency_after_ms.items()},
            },
            "fusions": [asdict(f) for f in self.fusions],
            "fusers": self.fusers,
            "quantization": self.quantization,
            "hardware": self.hardware,
        }

    def write(self, path: Path) -> Path:
        path.write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
        return path

    def tables(self) -> list[Table]:
        """The report as rich tables: the transform's effect, and the fusions when there were any."""
        title = f"optimize: {' + '.join(self.steps) or 'no transform'}"
        table = Table(title=title, title_justify="left")
        table.add_column("measure")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        table.add_column("change", justify="right")
        mb_before, mb_after = self.size_before / 1e6, self.size_after / 1e6
        table.add_row("file size (MB)", f"{mb_before:.2f}", f"{mb_after:.2f}", f"{self.size_ratio:.2f}x smaller")
        for batch, before in self.latency_before_ms.items():
            after = self.latency_after_ms[batch]
            speedup = before / after if after else 0.0
            change = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup if speedup else 0:.2f}x slower"
            table.add_row(f"latency batch {batch} (ms)", f"{before:.2f}", f"{after:.2f}", change)
        a = self.accuracy
        table.add_row("max abs diff", "", f"{a.max_abs:.3g}", "")
        if a.cosine is not None:
            table.add_row("cosine (lowest)", "", f"{a.cosine:.6f}", _limit(self.budget.cosine, ">="))
        if a.agreement is not None:
            table.add_row("agreement (lowest)", "", f"{a.agreement:.4f}", _limit(self.budget.agreement, ">="))
        table.caption = f"{a.samples}; latency: median of runs, {self.threads or 'default'} threads" + (
            "" if self.passed else f"; BUDGET BROKEN: {'; '.join(self.violations)}"
        )
        tables = [table]
        if self.fusions:
            fused = Table(title="transformer fusions", title_justify="left")
            for column in ("fusion", "expected", "achieved", "why not"):
                fused.add_column(column)
            for f in self.fusions:
                fused.add_row(f.name, str(f.expected), str(f.achieved), f.reason)
            tables.append(fused)
        return tables


def _limit(value: float | None, op: str) -> str:
    return f"budget {op} {value}" if value is not None else ""
