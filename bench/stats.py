"""One measured run (a Sample) and the median of repeated runs (a Summary)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One run: throughput (requests or rows per second) and latency percentiles."""

    throughput: float
    p50_ms: float
    p99_ms: float
    count: int = 0  # requests (or batches) completed in the measured window
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. server-side statistics of this run


@dataclass(frozen=True)
class Summary:
    """The medians of repeated runs of one point, and the runs themselves."""

    throughput: float
    p50_ms: float
    p99_ms: float
    errors: int
    runs: tuple[Sample, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "throughput": round(self.throughput, 3),
            "p50_ms": round(self.p50_ms, 4),
            "p99_ms": round(self.p99_ms, 4),
            "errors": self.errors,
            "runs": [asdict(r) for r in self.runs],
        }


def summarize(samples: Sequence[Sample]) -> Summary:
    """Medians of each number over the runs (throughput, p50 and p99 independently)."""
    if not samples:
        raise ValueError("no samples to summarize")
    return Summary(
        throughput=statistics.median(s.throughput for s in samples),
        p50_ms=statistics.median(s.p50_ms for s in samples),
        p99_ms=statistics.median(s.p99_ms for s in samples),
        errors=sum(s.errors for s in samples),
        runs=tuple(samples),
    )


def from_latencies(latencies_s: Sequence[float], window_s: float, rows_per_call: int = 1, errors: int = 0) -> Sample:
    """A sample from per-call latencies (seconds) completed within a window of ``window_s`` seconds."""
    if not latencies_s:
        return Sample(0.0, float("nan"), float("nan"), 0, errors)
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    return Sample(
        throughput=len(latencies_s) * rows_per_call / window_s,
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        count=len(latencies_s),
        errors=errors,
    )
