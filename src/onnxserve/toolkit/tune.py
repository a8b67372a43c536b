"""``onnxserve tune``: try a matrix of model variants and session settings on this machine, keep the
ones within the accuracy budget, and write the fastest for the stated target.

The matrix: model variants (plain, fused, int8, fused + int8 -- fusion only for transformer graphs)
x the session's graph optimization level x intra-op thread counts x the execution providers this
machine has. Each variant's accuracy is checked once against the source, as ``optimize`` checks it:
the same evaluation set (its held-out split, plus ``--eval``) and the same budget (the default budget
of a quantized model unless ``--max-accuracy-loss``); int8 variants are selective int8, searched on the
search split. A variant that breaks the budget is timed but never proposed. Each cell is timed at the
target's batch size (1 for latency). The winner is written like ``onnxserve optimize`` writes, with a
report that holds the whole matrix, and its settings map onto the server config's
``session_options`` / ``execution_providers``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxserve.core.cpu import cpu_budget
from onnxserve.errors import OptimizeError
from onnxserve.toolkit.fusion import expected_fusions
from onnxserve.toolkit.hardware import detect
from onnxserve.toolkit.optimize import (
    LEVELS,
    OptimizeOptions,
    build,
    check_destination,
    resolve_source,
    write_result,
)
from onnxserve.toolkit.optimize_report import (
    Accuracy,
    AccuracyBudget,
    compare_models,
    interleaved_latency_ms,
    open_session,
)
from onnxserve.toolkit.samples import evaluation_sets, load_samples

TARGETS = ("latency", "throughput")
SESSION_LEVELS = ("disable", *LEVELS)


@dataclass(frozen=True)
class TuneOptions:
    target: str = "latency"
    batch_size: int = 8  # throughput only; latency is batch 1
    levels: tuple[str, ...] = ("basic", "all")
    threads: tuple[int, ...] = ()  # (): 1 and every CPU this process may use
    fuse: tuple[bool, ...] = (False, True)
    int8: tuple[bool, ...] = (False, True)
    providers: tuple[str, ...] = ()  # (): every local provider
    budget: AccuracyBudget | None = None  # None: optimize's default budget of a quantized model
    calibration: Path | None = None
    evaluation: Path | None = None  # held-out inputs of the user's (--eval)
    repeats: int = 10
    force: bool = False

    @property
    def batch(self) -> int:
        return 1 if self.target == "latency" else self.batch_size

    def check(self) -> None:
        if self.target not in TARGETS:
            raise OptimizeError(f"--target {self.target!r}: choose latency or throughput")
        if self.batch_size < 1 or self.repeats < 1:
            raise OptimizeError("--batch-size and --repeats must be at least 1")
        bad = [level for level in self.levels if level not in SESSION_LEVELS]
        if bad or not self.levels:
            raise OptimizeError(f"--levels: choose from {', '.join(SESSION_LEVELS)} (got {', '.join(bad) or 'none'})")
        if any(t < 1 for t in self.threads):
            raise OptimizeError("--threads: every thread count must be at least 1")
        have = detect().local_providers
        unknown = [p for p in self.providers if p not in have]
        if unknown:
            raise OptimizeError(
                f"--providers: {', '.join(unknown)} not available here; this machine has {', '.join(have)}"
            )


@dataclass(frozen=True)
class Variant:
    fuse: bool
    int8: bool

    @property
    def name(self) -> str:
        return " + ".join(n for n, on in (("fuse", self.fuse), ("int8", self.int8)) if on) or "plain"


@dataclass(frozen=True)
class Cell:
    variant: str
    level: str
    threads: int
    provider: str
    latency_ms: float
    within_budget: bool


@dataclass
class TuneReport:
    source: str
    destination: str
    target: str
    batch: int
    budget: AccuracyBudget
    cells: list[Cell]
    variants: dict[str, dict[str, Any]]  # name -> accuracy, size, violations
    best: Cell
    hardware: dict[str, Any] = field(default_factory=dict)

    def config_snippet(self) -> dict[str, Any]:
        """The server config keys that serve the chosen variant with the chosen settings."""
        return {
            "execution_providers": [self.best.provider],
            "session_options": {"intra_op_num_threads": self.best.threads, "graph_optimization_level": self.best.level},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "target": self.target,
            "batch": self.batch,
            "budget": self.budget.to_dict(),
            "best": asdict(self.best),
            "config": self.config_snippet(),
            "variants": self.variants,
            "cells": [asdict(c) for c in self.cells],
            "hardware": self.hardware,
        }

    def write(self, path: Path) -> Path:
        path.write_bytes(orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2))
        return path

    def tables(self) -> list[Table]:
        table = Table(title=f"tune: {self.target} at batch {self.batch}", title_justify="left")
        for column in ("variant", "level", "threads", "provider", "ms / batch", "rows / s", "within budget"):
            table.add_column(column, justify="right" if column in ("ms / batch", "rows / s", "threads") else "left")
        for c in sorted(self.cells, key=lambda c: c.latency_ms):
            mark = "[bold green]<- chosen[/]" if c == self.best else ("yes" if c.within_budget else "[red]no[/]")
            table.add_row(
                c.variant,
                c.level,
                str(c.threads),
                c.provider.removesuffix("ExecutionProvider"),
                f"{c.latency_ms:.2f}",
                f"{1000 * self.batch / c.latency_ms:.0f}",
                mark,
            )
        accuracy = Table(title="variants", title_justify="left")
        for column in ("variant", "size (MB)", "cosine", "agreement", "max abs diff", "budget"):
            accuracy.add_column(column)
        for name, v in self.variants.items():
            accuracy.add_row(
                name,
                f"{v['size_bytes'] / 1e6:.2f}",
                "" if v["accuracy"]["cosine"] is None else f"{v['accuracy']['cosine']:.6f}",
                "" if v["accuracy"]["agreement"] is None else f"{v['accuracy']['agreement']:.4f}",
                f"{v['accuracy']['max_abs_diff']:.3g}",
                "; ".join(v["violations"]) or "ok",
            )
        return [accuracy, table]


def tune(src: Path, dst: Path, options: TuneOptions, console: Console | None = None) -> TuneReport:
    options.check()
    source = resolve_source(src)
    check_destination(source, dst, options.force)
    proto = source.model
    samples = load_samples(proto, source.text, options.calibration)
    sets = evaluation_sets(proto, source.text, options.calibration, options.evaluation)
    budget = options.budget if options.budget is not None else AccuracyBudget.default_for(source.task)
    transformer = bool(expected_fusions(proto))
    variants = [Variant(f, q) for f in sorted(set(options.fuse)) for q in sorted(set(options.int8))]
    variants = [v for v in variants if transformer or not v.fuse]
    threads = sorted(set(options.threads or (1, cpu_budget())))
    providers = options.providers or detect().local_providers
    cells_total = len(variants) * len(options.levels) * len(threads) * len(providers)
    parent = dst.parent if str(dst.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    quiet = Console(quiet=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or quiet,
        transient=True,
    ) as bar:
        task = bar.add_task("building variants", total=len(variants) + cells_total)
        built: dict[str, onnx.ModelProto] = {}
        summary: dict[str, dict[str, Any]] = {}
        within: dict[str, bool] = {}
        for v in variants:
            bar.update(task, description=f"building and checking {v.name}")
            result = build(
                source,
                OptimizeOptions(fuse=v.fuse, quantize="int8" if v.int8 else None, budget=budget),
                samples,
                lambda _text: None,
                sets.search,
            )
            accuracy: Accuracy = compare_models(source.model, result.model, sets.held_out, source.task)
            violations = budget.violations(accuracy)
            if result.selection is not None and not result.selection.passed:
                violations.append("no int8 choice short of keeping every quantizable node in float keeps the budget")
            built[v.name] = result.model
            within[v.name] = not violations
            summary[v.name] = {
                "accuracy": accuracy.to_dict(),
                "size_bytes": result.model.ByteSize(),
                "violations": violations,
                "float_nodes": result.selection.float_nodes if result.selection else [],
            }
            bar.advance(task)
        keys = [
            (v.name, level, t, provider)
            for v in variants
            for level in options.levels
            for t in threads
            for provider in providers
        ]
        bar.update(task, description=f"timing {len(keys)} cells in turn at batch {options.batch}")
        sessions = {key: open_session(built[key[0]], key[2], key[1], key[3]) for key in keys}
        timed = interleaved_latency_ms(sessions, samples.batches[0], options.batch, options.repeats)
        del sessions
        bar.advance(task, len(keys))
        cells = [Cell(v, level, t, p, timed[(v, level, t, p)], within[v]) for v, level, t, p in keys]
        candidates = [c for c in cells if c.within_budget]
        if not candidates:
            limits = ", ".join(f"{k}={v}" for k, v in budget.to_dict().items())
            raise OptimizeError(f"no variant keeps the accuracy budget ({limits}); {dst} was not written")
        best = min(candidates, key=lambda c: c.latency_ms)
        report = TuneReport(
            source=str(src),
            destination=str(dst),
            target=options.target,
            batch=options.batch,
            budget=budget,
            cells=cells,
            variants=summary,
            best=best,
            hardware=detect().to_dict(),
        )
        bar.update(task, description=f"writing {dst}")
        write_result(source, built[best.variant], dst, report, options.force)
    return report


def parse_list(text: str, what: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise OptimizeError(f"{what}: give a comma-separated list")
    return items


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in parse_list(text, what))
    except ValueError:
        raise OptimizeError(f"{what} {text!r}: expected comma-separated whole numbers, e.g. 1,2") from None


def parse_bools(text: str, what: str) -> tuple[bool, ...]:
    words = {"yes": True, "no": False, "on": True, "off": False, "true": True, "false": False}
    items = parse_list(text, what)
    bad = [i for i in items if i.lower() not in words]
    if bad:
        raise OptimizeError(f"{what} {text!r}: use yes, no or yes,no")
    return tuple(words[i.lower()] for i in items)
