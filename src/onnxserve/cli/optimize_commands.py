"""``onnxserve optimize``, ``onnxserve tune`` and ``onnxserve env`` (issue #7)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from onnxserve.cli.console import err, fail
from onnxserve.errors import OnnxServeError

_BUDGET_HELP = (
    "Fail, writing nothing, unless the result keeps these on the held-out evaluation inputs: cosine=MIN "
    "(worst-case embedding cosine), agreement=MIN (label / arg-max agreement), max_abs=MAX (largest absolute "
    "difference), e.g. cosine=0.99,agreement=0.99; 'none' for no budget. Default with --quantize: cosine=0.99 "
    "for embeddings, agreement=0.995 for classifiers."
)
_SCHEMES_HELP = (
    "The int8 schemes selective int8 may give a MatMul, comma-separated: per-tensor (ONNX Runtime's dynamic "
    "int8), outlier-channels (per-tensor with a few outlier input channels in float; needs per-tensor), "
    "block-wise (one scale per block of values). Fewer schemes, a shorter search: block-wise alone is one "
    "or two tries, every MatMul block-wise."
)
_EVAL_HELP = (
    "Held-out inputs to measure accuracy on, besides the built-in evaluation sentences of a text model: "
    "text lines (text model folder), .npy or .npz."
)


def _print_tables(tables: list[Table]) -> None:
    out = Console()
    for table in tables:
        out.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command()
    def optimize(
        src: Annotated[Path, typer.Argument(help="A model file (.onnx) or a version folder.")],
        output: Annotated[Path, typer.Option(help="The .onnx file or version folder to write.")],
        level: Annotated[
            str | None, typer.Option(help="ONNX Runtime offline graph optimization: basic, extended or all.")
        ] = None,
        fuse: Annotated[bool, typer.Option(help="Transformer fusions (BERT-like encoders).")] = False,
        quantize: Annotated[
            str | None, typer.Option(help="int8 (dynamic) or int8-static (needs --calibration).")
        ] = None,
        selective: Annotated[
            bool,
            typer.Option(help="int8 keeps the most sensitive nodes in float until the accuracy budget holds."),
        ] = True,
        int8_schemes: Annotated[str, typer.Option(help=_SCHEMES_HELP)] = "per-tensor,outlier-channels,block-wise",
        eval_file: Annotated[Path | None, typer.Option("--eval", help=_EVAL_HELP)] = None,
        calibration: Annotated[
            Path | None,
            typer.Option(help="Sample inputs: text lines (text model folder), .npy (one input) or .npz (by name)."),
        ] = None,
        fp16: Annotated[
            bool, typer.Option(help="Float16 weights and compute, float32 inputs and outputs (GPU).")
        ] = False,
        simplify: Annotated[bool, typer.Option(help="Constant folding and dead-node removal.")] = False,
        max_accuracy_loss: Annotated[str | None, typer.Option(help=_BUDGET_HELP)] = None,
        batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time, comma-separated.")] = "1,8",
        repeats: Annotated[int, typer.Option(help="Timed runs per batch size (the median is reported).")] = 10,
        threads: Annotated[
            int, typer.Option(help="Intra-op threads for timing; 0: every CPU this process may use.")
        ] = 0,
        force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
        allow_slower: Annotated[
            bool,
            typer.Option(help="Write the result even when it is slower than the source at every batch size timed."),
        ] = False,
        json_output: Annotated[
            bool, typer.Option("--json", help="Print the report as JSON instead of tables.")
        ] = False,
    ) -> None:
        """Optimize a model for this machine; every transform is checked against the original."""
        from onnxserve.toolkit.optimize import BudgetError, OptimizeOptions
        from onnxserve.toolkit.optimize import optimize as run_optimize
        from onnxserve.toolkit.optimize_report import AccuracyBudget
        from onnxserve.toolkit.selective import parse_schemes
        from onnxserve.toolkit.tune import parse_ints

        try:
            options = OptimizeOptions(
                level=level,
                fuse=fuse,
                quantize=quantize,
                calibration=calibration,
                fp16=fp16,
                simplify=simplify,
                budget=AccuracyBudget.parse(max_accuracy_loss) if max_accuracy_loss else None,
                evaluation=eval_file,
                selective=selective,
                int8_schemes=parse_schemes(int8_schemes),
                latency_batches=parse_ints(batch_sizes, "--batch-sizes"),
                repeats=repeats,
                threads=threads,
                force=force,
                allow_slower=allow_slower,
            )
            report = run_optimize(src, output, options, err)
        except BudgetError as e:
            for table in e.report.tables():
                err.print(table)
            raise fail(e) from None
        except OnnxServeError as e:
            raise fail(e) from None
        if json_output:
            sys.stdout.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            _print_tables(report.tables())
        err.print(f"wrote {output}", highlight=False)

    @app.command()
    def tune(
        src: Annotated[Path, typer.Argument(help="A model file (.onnx) or a version folder.")],
        output: Annotated[Path, typer.Option(help="The .onnx file or version folder to write the winner to.")],
        target: Annotated[str, typer.Option(help="latency (batch 1) or throughput (at --batch-size).")] = "latency",
        batch_size: Annotated[int, typer.Option(help="The batch size for --target throughput.")] = 8,
        levels: Annotated[
            str, typer.Option(help="Session graph optimization levels to try: disable, basic, extended, all.")
        ] = "basic,all",
        threads: Annotated[
            str | None, typer.Option(help="Intra-op thread counts to try; default: 1 and every CPU available.")
        ] = None,
        fuse: Annotated[str, typer.Option(help="Fusion variants to try: yes, no or yes,no.")] = "no,yes",
        int8: Annotated[str, typer.Option(help="int8 (dynamic) variants to try: yes, no or yes,no.")] = "no,yes",
        providers: Annotated[
            str | None, typer.Option(help="Execution providers to try; default: every one available here.")
        ] = None,
        max_accuracy_loss: Annotated[str | None, typer.Option(help=_BUDGET_HELP)] = None,
        calibration: Annotated[
            Path | None, typer.Option(help="Sample inputs to search and calibrate on (text lines, .npy or .npz).")
        ] = None,
        eval_file: Annotated[Path | None, typer.Option("--eval", help=_EVAL_HELP)] = None,
        repeats: Annotated[int, typer.Option(help="Timed runs per cell (the median is kept).")] = 10,
        emit_config: Annotated[
            bool, typer.Option(help="Print the server config's session_options / execution_providers as JSON.")
        ] = False,
        force: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    ) -> None:
        """Try variants x settings on this machine and write the fastest within the accuracy budget."""
        from onnxserve.toolkit.optimize_report import AccuracyBudget
        from onnxserve.toolkit.tune import TuneOptions, parse_bools, parse_ints, parse_list
        from onnxserve.toolkit.tune import tune as run_tune

        try:
            options = TuneOptions(
                target=target,
                batch_size=batch_size,
                levels=parse_list(levels, "--levels"),
                threads=parse_ints(threads, "--threads") if threads else (),
                fuse=parse_bools(fuse, "--fuse"),
                int8=parse_bools(int8, "--int8"),
                providers=parse_list(providers, "--providers") if providers else (),
                budget=AccuracyBudget.parse(max_accuracy_loss) if max_accuracy_loss else None,
                calibration=calibration,
                evaluation=eval_file,
                repeats=repeats,
                force=force,
            )
            report = run_tune(src, output, options, err)
        except OnnxServeError as e:
            raise fail(e) from None
        if emit_config:
            sys.stdout.write(orjson.dumps(report.config_snippet(), option=orjson.OPT_INDENT_2).decode() + "\n")
            for table in report.tables():
                err.print(table)
        else:
            _print_tables(report.tables())
        best = report.best
        err.print(
            f"wrote {output}: {best.variant}, level {best.level}, {best.threads} threads on {best.provider}",
            highlight=False,
        )

    @app.command()
    def env(
        json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """Show the execution providers and CPU features this machine offers."""
        from onnxserve.toolkit.hardware import SKIPPED_PROVIDERS, UNTESTED_PROVIDERS, detect

        hw = detect()
        if json_output:
            sys.stdout.write(orjson.dumps(hw.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
            return
        table = Table(title="this machine", title_justify="left", show_header=False)
        table.add_column("what")
        table.add_column("value")
        table.add_row("CPU", f"{hw.cpu} ({hw.architecture}), {hw.cpus} usable")
        f = hw.features
        for name, present in (("AVX2", f.avx2), ("AVX-512", f.avx512), ("VNNI", f.vnni), ("AMX", f.amx)):
            table.add_row(name, "yes" if present else "no")
        table.add_row("int8 reduce_range", "no (VNNI present)" if f.vnni else "yes (no VNNI: avoids saturation)")
        table.add_row("onnxruntime", hw.onnxruntime)
        for provider in hw.providers:
            note = UNTESTED_PROVIDERS.get(provider, "")
            if provider in SKIPPED_PROVIDERS:
                note = "remote endpoints only; not tuned for"
            table.add_row("provider", f"{provider}" + (f"  ({note})" if note else ""))
        Console().print(table)
