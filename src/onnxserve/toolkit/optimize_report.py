"""What a transform did to a model: accuracy on sample inputs, file size and latency, before and after.

Accuracy is measured by the toolkit's one comparer, :mod:`onnxserve.toolkit.evaluation` (worst case,
percentiles and the worst inputs, on the evaluation set of :mod:`onnxserve.toolkit.samples`); an
:class:`AccuracyBudget` (``--max-accuracy-loss``, or the default budget of a quantized model) turns
the numbers into a verdict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from rich.table import Table

from onnxserve.toolkit.evaluation import Accuracy as Accuracy
from onnxserve.toolkit.evaluation import AccuracyBudget as AccuracyBudget
from onnxserve.toolkit.evaluation import compare_models as compare_models
from onnxserve.toolkit.evaluation import open_session as open_session
from onnxserve.toolkit.samples import Feeds, resize_batch

REPORT_FILENAME = "optimize_report.json"
"""The report's name in a version folder; beside a model file it is ``<file>.report.json``."""

K = TypeVar("K")


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
    evaluated_on: dict[str, Any] = field(default_factory=dict)  # how to make the accuracy's inputs again
    selection: dict[str, Any] | None = None  # selective int8: the float nodes, the search's trials
    search_passed: bool | None = None  # selective int8: did some choice keep the budget on the search split

    @property
    def violations(self) -> list[str]:
        problems = self.budget.violations(self.accuracy)
        schemes = (self.selection or {}).get("int8_schemes") or []
        if self.search_passed is False and schemes and "per-tensor" not in schemes:  # no float search was made
            problems.append(f"no int8 choice with --int8-schemes {','.join(schemes)} keeps the budget")
        elif self.search_passed is False:
            problems.append("no int8 choice short of keeping every quantizable node in float keeps the budget")
        return problems

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
            "selective_int8": self.selection,
            "evaluated_on": self.evaluated_on,
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
            table.add_row("agreement", "", f"{a.agreement:.4f}", _limit(self.budget.agreement, ">="))
        if a.percentiles:
            spread = ", ".join(f"{k} {v:.4f}" for k, v in a.percentiles.items())
            table.add_row("cosine percentiles", "", spread, "")
        if a.worst:
            table.add_row("worst input", "", _short(a.worst[0].input), "")
        if self.selection is not None:
            kept = len(self.selection["float_nodes"])
            table.add_row("nodes kept in float", "", f"{kept} of {self.selection['quantizable_nodes']}", "")
            blockwise = len(self.selection.get("blockwise_int8_nodes", []))
            if blockwise:
                table.add_row(
                    "nodes in block-wise int8", "", f"{blockwise} of {self.selection['quantizable_nodes']}", ""
                )
            split = len(self.selection.get("outlier_channel_nodes", {}))
            if split:
                table.add_row(
                    "MatMuls with outlier channels in float",
                    "",
                    f"{split} of {self.selection['quantizable_nodes']}",
                    "",
                )
        for entry in (self.quantization or {}).get("embedding_tables", []):
            form = f"int8 per row, {entry['bytes'] / 1e6:.1f} MB" if entry["quantized"] else "float"
            table.add_row(
                f"embedding table {_short(entry['table'], 30)}", f"{entry['float_bytes'] / 1e6:.1f} MB", form, ""
            )
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


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _limit(value: float | None, op: str) -> str:
    return f"budget {op} {value}" if value is not None else ""
