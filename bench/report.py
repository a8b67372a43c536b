"""Result rows, the issue's targets (met / missed, with the numbers that explain them), markdown and JSON."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.stats import Summary

ONNXSERVE_ON = "onnxserve, batching on"
ONNXSERVE_OFF = "onnxserve, batching off"
TORCHSERVE = "TorchServe"


@dataclass
class Row:
    """One measured point (the median of its runs), or why it could not be measured."""

    workload: str  # overhead | tensors | text
    side: str  # who served it: onnxserve (batching on/off), TorchServe, or an in-process baseline
    protocol: str
    concurrency: int
    tool: str
    unit: str  # what throughput counts per second: requests, rows, texts
    summary: Summary | None = None
    baseline: Row | None = field(default=None, repr=False)
    error: str | None = None
    role: str = ""  # in-process rows: "baseline" (the best finalist) or "finalist"
    failures: list[str] = field(default_factory=list)  # runs that failed (the median is of the others)

    @property
    def is_baseline(self) -> bool:
        return bool(self.role)

    @property
    def ratio(self) -> float | None:
        """Throughput over the baseline's throughput (measured in the same run)."""
        if self.summary is None or self.baseline is None or self.baseline.summary is None:
            return None
        base = self.baseline.summary.throughput
        return self.summary.throughput / base if base > 0 else None

    @property
    def added_p50_ms(self) -> float | None:
        """p50 latency added over the baseline's p50 (the overhead workload)."""
        if self.workload != "overhead" or self.summary is None or self.baseline is None:
            return None
        if self.baseline.summary is None:
            return None
        return self.summary.p50_ms - self.baseline.summary.p50_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "side": self.side,
            "protocol": self.protocol,
            "concurrency": self.concurrency,
            "tool": self.tool,
            "unit": self.unit,
            "role": self.role or None,
            **(self.summary.to_json() if self.summary is not None else {}),
            "baseline": None if self.baseline is None else f"{self.baseline.side} ({self.baseline.protocol})",
            "ratio_vs_baseline": _round(self.ratio),
            "added_p50_ms": _round(self.added_p50_ms),
            "error": self.error,
            "failed_runs": self.failures,
        }


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: could not be measured
    detail: str

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "missed")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "goal": self.goal,
            "measured": self.measured,
            "met": self.met,
            "verdict": self.verdict,
            "detail": self.detail,
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def find(rows: Sequence[Row], workload: str, side: str, concurrency: int, protocol: str | None = None) -> Row | None:
    for row in rows:
        same_point = row.workload == workload and row.side == side and row.concurrency == concurrency
        if same_point and (protocol is None or row.protocol == protocol):
            return row
    return None


def _server_note(row: Row) -> str:
    """Mean batch rows and ONNX Runtime time per batch on the server, over the row's runs."""
    if row.summary is None:
        return ""
    batches = [r.extra["server"]["mean_batch_rows"] for r in row.summary.runs if "server" in r.extra]
    infer = [r.extra["server"]["mean_infer_ms"] for r in row.summary.runs if "server" in r.extra]
    if not batches:
        return ""
    return f"; server batches of {statistics.median(batches):.1f} rows, {statistics.median(infer):.1f} ms each"


def _noise(*rows: Row | None) -> str:
    """The CPU other processes used during these rows' runs (median, in cores)."""
    values = [other_cpu(r.summary) for r in rows if r is not None and r.summary is not None]
    known = [v for v in values if v is not None]
    return f"; other processes used {max(known):.2f} cores meanwhile (median)" if known else ""


def _missing(*rows: Row | None) -> str:
    reasons = [r.error for r in rows if r is not None and r.error]
    if reasons:
        return reasons[0]
    return "a point it needs was not measured (is its concurrency in BENCH_CONCURRENCY?)"


def evaluate(rows: Sequence[Row], torchserve_note: str) -> list[Target]:
    """The issue's four targets, each met / missed / not measured, with the numbers behind it."""
    targets: list[Target] = []

    tensors = find(rows, "tensors", ONNXSERVE_ON, 32)
    if tensors is not None and tensors.summary is not None and tensors.ratio is not None:
        assert tensors.baseline is not None
        assert tensors.baseline.summary is not None
        targets.append(
            Target(
                "tensors, concurrency 32",
                "server >= 0.9 x best in-process",
                f"{tensors.ratio:.2f} x ({tensors.summary.throughput:.0f} vs {tensors.baseline.summary.throughput:.0f}"
                " rows/s)",
                tensors.ratio >= 0.9,
                f"{tensors.protocol} via perf_analyzer vs {tensors.baseline.protocol}{_server_note(tensors)}"
                f"{_noise(tensors, tensors.baseline)}",
            )
        )
    else:
        targets.append(
            Target("tensors, concurrency 32", "server >= 0.9 x best in-process", "-", None, _missing(tensors))
        )

    on, off = find(rows, "text", ONNXSERVE_ON, 32), find(rows, "text", ONNXSERVE_OFF, 32)
    if on is not None and off is not None and on.summary is not None and off.summary is not None:
        ratio = on.summary.throughput / off.summary.throughput if off.summary.throughput > 0 else math.inf
        targets.append(
            Target(
                "text, concurrency 32",
                "batching on >= 2 x batching off",
                f"{ratio:.2f} x ({on.summary.throughput:.0f} vs {off.summary.throughput:.0f} texts/s)",
                ratio >= 2.0,
                f"on{_server_note(on)}; off{_server_note(off)}{_noise(on, off)}",
            )
        )
    else:
        targets.append(Target("text, concurrency 32", "batching on >= 2 x batching off", "-", None, _missing(on, off)))

    v2 = find(rows, "text", ONNXSERVE_ON, 32, "V2 HTTP JSON (text)")
    openai = find(rows, "text", ONNXSERVE_ON, 32, "OpenAI /v1/embeddings (text)")
    wanted = "/v1/embeddings >= 0.95 x V2 text (batching on)"
    if v2 is not None and openai is not None and v2.summary is not None and openai.summary is not None:
        ratio = openai.summary.throughput / v2.summary.throughput if v2.summary.throughput > 0 else math.inf
        targets.append(
            Target(
                "embeddings API, concurrency 32",
                wanted,
                f"{ratio:.2f} x ({openai.summary.throughput:.0f} vs {v2.summary.throughput:.0f} texts/s)",
                ratio >= 0.95,
                f"same server, batching and texts{_noise(openai, v2)}",
            )
        )
    else:
        targets.append(Target("embeddings API, concurrency 32", wanted, "-", None, _missing(v2, openai)))

    for protocol in ("V2 HTTP JSON", "V2 HTTP binary", "V2 gRPC"):
        row = find(rows, "overhead", ONNXSERVE_OFF, 1, protocol)
        added = row.added_p50_ms if row is not None else None
        if row is not None and added is not None and row.summary is not None and row.baseline is not None:
            assert row.baseline.summary is not None
            targets.append(
                Target(
                    f"overhead, {protocol}",
                    "added p50 <= 1 ms",
                    f"{added:.3f} ms",
                    added <= 1.0,
                    f"p50 {row.summary.p50_ms:.3f} ms vs session.run p50 {row.baseline.summary.p50_ms:.4f} ms"
                    f"{_noise(row)}",
                )
            )
        else:
            targets.append(Target(f"overhead, {protocol}", "added p50 <= 1 ms", "-", None, _missing(row)))

    ours, theirs = find(rows, "text", ONNXSERVE_ON, 8), find(rows, "text", TORCHSERVE, 8)
    if ours is not None and theirs is not None and ours.summary is not None and theirs.summary is not None:
        ratio = ours.summary.throughput / theirs.summary.throughput if theirs.summary.throughput > 0 else math.inf
        targets.append(
            Target(
                "text, concurrency 8",
                "onnxserve >= 2 x TorchServe",
                f"{ratio:.2f} x ({ours.summary.throughput:.0f} vs {theirs.summary.throughput:.0f} texts/s)",
                ratio >= 2.0,
                f"onnxserve batching on vs TorchServe ({torchserve_note}){_noise(ours, theirs)}",
            )
        )
    else:
        targets.append(Target("text, concurrency 8", "onnxserve >= 2 x TorchServe", "-", None, _missing(ours, theirs)))
    return targets


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def other_cpu(summary: Summary) -> float | None:
    """The median CPU (in cores) that processes outside the benchmark used during the runs."""
    values = [r.extra["other_cpu_cores"] for r in summary.runs if r.extra.get("other_cpu_cores") is not None]
    return statistics.median(values) if values else None


def results_table(rows: Sequence[Row]) -> str:
    lines = [
        "| workload | served by | protocol | conc. | throughput /s | p50 ms | p99 ms | vs baseline "
        "| others' CPU | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        s = row.summary
        if s is None:
            lines.append(
                f"| {row.workload} | {row.side} | {row.protocol} | {row.concurrency} | - | - | - | - | - | "
                f"not measured: {(row.error or '').splitlines()[0][:160] if row.error else ''} |"
            )
            continue
        note = f"{row.unit}"
        if row.added_p50_ms is not None:
            note += f"; +{row.added_p50_ms:.3f} ms p50 over session.run"
        if s.errors:
            note += f"; {s.errors} errors"
        if row.failures:
            note += f"; {len(row.failures)} failed runs: {row.failures[0].splitlines()[-1][:120]}"
        ratio = row.role if row.is_baseline else (f"{row.ratio:.2f} x" if row.ratio is not None else "-")
        digits = 3 if row.workload == "overhead" else 1
        lines.append(
            f"| {row.workload} | {row.side} | {row.protocol} | {row.concurrency} | {s.throughput:.0f} | "
            f"{_fmt(s.p50_ms, digits)} | {_fmt(s.p99_ms, digits)} | {ratio} | {_fmt(other_cpu(s))} | {note} |"
        )
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    lines = ["| target | goal | measured | result | detail |", "|---|---|---|---|---|"]
    for t in targets:
        lines.append(f"| {t.name} | {t.goal} | {t.measured} | **{t.verdict}** | {t.detail} |")
    return "\n".join(lines)
