"""Result rows, the issue's targets (met / missed, with the numbers that explain them), markdown and JSON."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.stats import Summary

ONNXSERVE_ON = "onnxserve, batching on"
ONNXSERVE_OFF = "onnxserve, batching off"
ONNXSERVE_DEFAULT = "onnxserve, default"
TORCHSERVE = "TorchServe"
INFINITY = "Infinity"
MLSERVER = "MLServer"
PEERS = (MLSERVER, TORCHSERVE, INFINITY)
"""The servers users pick instead of onnxserve, each at its best (the text workload)."""


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
    role: str = ""  # in-process rows: "baseline" (the best finalist), "finalist" or "ceiling"
    batch: int | None = None  # in-process rows: rows per call
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


def _cores_note(row: Row | None) -> str:
    """How the benchmark's CPU split during a server row's runs: its client and the server (medians)."""
    if row is None or row.summary is None or row.is_baseline:
        return ""
    client = [r.extra["bench_cpu_cores"] for r in row.summary.runs if r.extra.get("bench_cpu_cores") is not None]
    served = [r.extra["children_cpu_cores"] for r in row.summary.runs if r.extra.get("children_cpu_cores") is not None]
    if not client or not served:
        return ""
    if row.workload == "text":
        who = "the load generator (the bench's process)", "the server"
    else:
        who = "the bench's process", "the server and perf_analyzer"
    return (
        f"; {who[0]} used {statistics.median(client):.2f} cores and {who[1]} {statistics.median(served):.2f} "
        f"of {os.cpu_count()} (median)"
    )


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


def in_process(rows: Sequence[Row], workload: str, batch: int | None = None) -> Row | None:
    """The fastest measured in-process row of ``workload`` (of calls of ``batch`` rows, when given): with no
    batch, the best layout at any batch size (the baseline); with one, that batch's ceiling."""
    found = [
        r
        for r in rows
        if r.is_baseline and r.workload == workload and r.summary is not None and (batch is None or r.batch == batch)
    ]
    return max(found, key=lambda r: r.summary.throughput if r.summary is not None else 0.0, default=None)


def _throughput_ratio(ours: Row | None, theirs: Row | None) -> tuple[float, Summary, Summary] | None:
    if ours is None or theirs is None or ours.summary is None or theirs.summary is None:
        return None
    base = theirs.summary.throughput
    return (ours.summary.throughput / base if base > 0 else math.inf), ours.summary, theirs.summary


def _at_least(name: str, goal: str, minimum: float, ours: Row | None, theirs: Row | None, what: str) -> Target:
    """``ours`` serves >= ``minimum`` x the throughput of ``theirs`` (``what`` names the comparison)."""
    found = _throughput_ratio(ours, theirs)
    if found is None:
        return Target(name, goal, "-", None, _missing(ours, theirs))
    ratio, a, b = found
    assert ours is not None
    return Target(
        name,
        goal,
        f"{ratio:.2f} x ({a.throughput:.0f} vs {b.throughput:.0f} {ours.unit}/s)",
        ratio >= minimum,
        f"{what}{_server_note(ours)}{_cores_note(ours)}{_noise(ours, theirs)}",
    )


def _latency_target(ours: Row | None, reference: Row | None, limit: float) -> Target:
    name, goal = "text, concurrency 1, p50", f"default p50 <= {limit:.2f} x batching off (1 instance x all cores)"
    if ours is None or reference is None or ours.summary is None or reference.summary is None:
        return Target(name, goal, "-", None, _missing(ours, reference))
    ratio = ours.summary.p50_ms / reference.summary.p50_ms if reference.summary.p50_ms > 0 else math.inf
    return Target(
        name,
        goal,
        f"{ratio:.2f} x ({ours.summary.p50_ms:.2f} vs {reference.summary.p50_ms:.2f} ms)",
        ratio <= limit,
        f"{ours.protocol}{_server_note(ours)}{_noise(ours, reference)}",
    )


def best_peer(rows: Sequence[Row], concurrency: int) -> tuple[Row | None, list[str]]:
    """The peer with the highest text throughput at ``concurrency``, and why the others were not measured."""
    measured: list[Row] = []
    absent: list[str] = []
    for peer in PEERS:
        row = find(rows, "text", peer, concurrency)
        if row is not None and row.summary is not None:
            measured.append(row)
        else:
            reason = row.error if row is not None and row.error else "no row"
            absent.append(f"{peer} not measured ({reason.splitlines()[0][:120]})")
    best = max(measured, key=lambda r: r.summary.throughput if r.summary is not None else 0.0, default=None)
    return best, absent


def _peer_target(rows: Sequence[Row], concurrency: int, minimum: float, notes: Mapping[str, str]) -> Target:
    name = f"text, concurrency {concurrency}, against the best peer"
    goal = f"default >= {minimum:g} x the best of {', '.join(PEERS)} (each at its best)"
    ours = find(rows, "text", ONNXSERVE_DEFAULT, concurrency, TEXT_PROTOCOL)
    theirs, absent = best_peer(rows, concurrency)
    if theirs is None:
        reason = "; ".join(absent) if ours is None or ours.error is None else ours.error
        return Target(name, goal, "-", None, reason)
    missing = f"; {'; '.join(absent)}" if absent else ""
    what = f"best peer: {theirs.side} ({notes.get(theirs.side, '')}){missing}"
    return _at_least(name, goal, minimum, ours, theirs, what)


def _overhead_target(rows: Sequence[Row], protocol: str, limit_ms: float) -> Target:
    name, goal = f"overhead, {protocol}", f"added p50 <= {limit_ms:g} ms (default)"
    row = find(rows, "overhead", ONNXSERVE_DEFAULT, 1, protocol)
    added = row.added_p50_ms if row is not None else None
    if row is None or added is None or row.summary is None or row.baseline is None:
        return Target(name, goal, "-", None, _missing(row))
    assert row.baseline.summary is not None
    return Target(
        name,
        goal,
        f"{added:.3f} ms",
        added <= limit_ms,
        f"p50 {row.summary.p50_ms:.3f} ms vs session.run p50 {row.baseline.summary.p50_ms:.4f} ms{_noise(row)}",
    )


TEXT_PROTOCOL = "V2 HTTP JSON (text)"
EMBEDDINGS_PROTOCOL = "OpenAI /v1/embeddings (text)"
TENSORS_PROTOCOLS = ("V2 gRPC", "V2 HTTP binary")
OVERHEAD_LIMITS_MS = (("V2 HTTP JSON", 0.3), ("V2 HTTP binary", 0.3), ("V2 gRPC", 0.5))


def evaluate(rows: Sequence[Row], notes: Mapping[str, str]) -> list[Target]:
    """The issue's targets, judged on the default configuration (no hand tuning), each met / missed / not
    measured, with the numbers behind it; then the batching on/off and embeddings-API checks.
    ``notes``: each peer's settings (or why it did not run), by side."""
    default = ONNXSERVE_DEFAULT
    text8 = in_process(rows, "text", 8)
    targets = [
        _latency_target(find(rows, "text", default, 1, TEXT_PROTOCOL), find(rows, "text", ONNXSERVE_OFF, 1), 1.1),
        _at_least(
            "text, concurrency 8",
            "default >= 0.85 x in-process batch 8",
            0.85,
            find(rows, "text", default, 8, TEXT_PROTOCOL),
            text8,
            f"against {text8.protocol if text8 is not None else 'in-process batch 8'}",
        ),
        _at_least(
            "text, concurrency 32",
            "default >= 0.95 x in-process batch 8",
            0.95,
            find(rows, "text", default, 32, TEXT_PROTOCOL),
            text8,
            f"against {text8.protocol if text8 is not None else 'in-process batch 8'}",
        ),
    ]
    best_tensors = in_process(rows, "tensors")
    for protocol in TENSORS_PROTOCOLS:
        targets.append(
            _at_least(
                f"tensors, concurrency 32, {protocol}",
                "default >= 0.9 x the best in-process layout",
                0.9,
                find(rows, "tensors", default, 32, protocol),
                best_tensors,
                f"perf_analyzer vs {best_tensors.protocol if best_tensors is not None else 'in-process'}",
            )
        )
    targets += [_peer_target(rows, 8, 1.3, notes), _peer_target(rows, 32, 1.3, notes)]
    targets.append(
        _at_least(
            "text, concurrency 8, against TorchServe",
            "default >= 2 x TorchServe",
            2.0,
            find(rows, "text", default, 8, TEXT_PROTOCOL),
            find(rows, "text", TORCHSERVE, 8),
            f"TorchServe: {notes.get(TORCHSERVE, '')}",
        )
    )
    targets += [_overhead_target(rows, protocol, limit) for protocol, limit in OVERHEAD_LIMITS_MS]
    on, off = find(rows, "text", ONNXSERVE_ON, 32, TEXT_PROTOCOL), find(rows, "text", ONNXSERVE_OFF, 32)
    targets.append(
        _at_least("text, concurrency 32, batching on/off", "batching on >= 2 x batching off", 2.0, on, off, "on")
    )
    v2 = find(rows, "text", ONNXSERVE_ON, 32, TEXT_PROTOCOL)
    openai = find(rows, "text", ONNXSERVE_ON, 32, EMBEDDINGS_PROTOCOL)
    targets.append(
        _at_least(
            "embeddings API, concurrency 32",
            "/v1/embeddings >= 0.95 x V2 text (batching on)",
            0.95,
            openai,
            v2,
            "same server, batching and texts",
        )
    )
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
