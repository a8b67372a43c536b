"""``onnxserve inspect`` (issue #8): a model's summary, its graph as JSON / SVG / HTML, outputs for an input."""

from __future__ import annotations

import enum
import io
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from onnxserve.cli.console import err, fail
from onnxserve.errors import InvalidInputError, OnnxServeError
from onnxserve.toolkit.atomic_file import write_atomically


class Format(enum.StrEnum):
    text = "text"
    json = "json"
    svg = "svg"
    html = "html"


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("inspect")(inspect)


def inspect(
    model: Annotated[Path, typer.Argument(help="An ONNX file or a version folder (model.onnx + onnxserve.json).")],
    output_format: Annotated[
        Format,
        typer.Option("--format", help="text (tables), json (the graph document), svg or html (a graph view)."),
    ] = Format.text,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to FILE instead of standard output.")
    ] = None,
    shape: Annotated[
        list[str] | None,
        typer.Option(
            "--shape",
            help="Input shape for FLOPs: NAME=D0,D1,... or a symbolic dim DIM=N (repeat); other dims default to 1.",
        ),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run", help="Run on INPUT: text for a text model folder; a .npy, .npz or .json file or inline JSON."
        ),
    ] = None,
    intermediates: Annotated[
        str | None,
        typer.Option(
            "--intermediates",
            help="With --run: tensors to show, comma-separated tensor or node names or patterns ('*Softmax*').",
        ),
    ] = None,
) -> None:
    """Show what a model is: signature, operators, parameters, FLOPs; draw its graph; run it on an input."""
    from onnxserve.toolkit.inspect import inspect_model
    from onnxserve.toolkit.model_file import load_model, locate_model

    try:
        if intermediates is not None and run is None:
            raise InvalidInputError("--intermediates needs --run INPUT: the tensors are computed for an input")
        report = inspect_model(model, shapes=shape or ())
        result = None
        if run is not None:
            from onnxserve.toolkit.probe import run_model

            result = run_model(model, run, intermediates=intermediates)
        if output_format is Format.text:
            _write(output, _text(report, result))
            return
        from onnxserve.toolkit.graph import build_graph

        location = locate_model(model)
        doc = build_graph(load_model(location.file), base_dir=location.file.parent)
        if output_format is Format.json:
            document: dict[str, Any] = {**doc.to_json(), "summary": report.to_json()}
            if result is not None:
                document["run"] = result.to_json()
            _write(output, orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        elif output_format is Format.svg:
            from onnxserve.toolkit.visualize.svg import render_svg

            _write(output, render_svg(doc))
        else:
            from onnxserve.toolkit.visualize.html import render_html

            title = f"{location.folder or location.file.name} — onnxserve"
            _write(output, render_html(doc, title=title, intermediates=result.summaries() if result else None))
        if output is not None:
            err.print(f"wrote {output} ({output_format.value}, {len(doc.nodes)} nodes)", highlight=False)
    except OnnxServeError as e:
        raise fail(e) from None


def _write(output: Path | None, text: str) -> None:
    """Standard output, or FILE written whole (a temporary file beside it, then renamed)."""
    if output is None:
        sys.stdout.write(text)
        return
    folder = output.parent
    if not folder.is_dir():
        raise InvalidInputError(f"--output {output}: folder {folder} does not exist")
    write_atomically(output, text)


def _text(report: Any, result: Any) -> str:
    console = Console(width=120, file=io.StringIO(), force_terminal=False, color_system=None, markup=False)
    _print_report(console, report)
    if result is not None:
        _print_run(console, result)
    text: str = console.file.getvalue()  # type: ignore[attr-defined]
    return text


def _dims(shape: list[Any] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def _print_report(console: Console, report: Any) -> None:
    from onnxserve.toolkit.inspect import InspectReport

    assert isinstance(report, InspectReport)
    head = Table(show_header=False, title=report.file, title_justify="left", box=None, padding=(0, 2))
    head.add_row("IR version", str(report.ir_version))
    head.add_row("opsets", ", ".join(f"{d} {v}" for d, v in report.opsets.items()))
    head.add_row("producer", report.producer or "-")
    head.add_row("nodes", f"{report.nodes} ({len(report.op_histogram)} operators)")
    head.add_row(
        "parameters",
        f"{report.parameters:,} ({_count(report.parameters)}) in {report.initializers} initializers, "
        f"{report.parameter_bytes:,} bytes",
    )
    flops = report.flops
    shapes = ", ".join(f"{n}={_dims(s)}" for n, s in flops.input_shapes.items())
    head.add_row("FLOPs", f"{flops.total:,} ({_count(flops.total)}) at {shapes}")
    if flops.defaults:
        head.add_row(
            "", "defaulted: " + ", ".join(f"{k}={v}" for k, v in flops.defaults.items()) + " (set with --shape)"
        )
    if flops.unestimated:
        head.add_row("", f"{len(flops.unestimated)} heavy nodes without concrete shapes are not counted")
    for ext in report.external_data:
        head.add_row(
            "external data",
            f"{ext.location}: {ext.tensors} tensors, {ext.bytes:,} bytes" + ("" if ext.present else " (MISSING)"),
        )
    console.print(head)

    signature = Table(title="Inputs and outputs", title_justify="left")
    for column in ("", "name", "type", "shape"):
        signature.add_column(column)
    for kind, values in (("input", report.inputs), ("output", report.outputs)):
        for v in values:
            signature.add_row(kind, v.name, v.dtype, _dims(v.shape))
    console.print(signature)

    ops = Table(title="Operators", title_justify="left")
    ops.add_column("operator")
    ops.add_column("nodes", justify="right")
    ops.add_column("FLOPs", justify="right")
    for op, count in report.op_histogram.items():
        ops.add_row(op, str(count), _count(flops.by_op[op]) if op in flops.by_op else "")
    console.print(ops)

    if report.metadata:
        meta = Table(title="Metadata", title_justify="left")
        meta.add_column("key")
        meta.add_column("value")
        for key, value in report.metadata.items():
            meta.add_row(key, value)
        console.print(meta)
    if report.pipeline is not None:
        spec = Table(title="Pipeline (onnxserve.json)", title_justify="left", show_header=False)
        for key, value in report.pipeline.items():
            spec.add_row(key, orjson.dumps(value).decode() if not isinstance(value, str) else value)
        console.print(spec)


def _print_run(console: Console, result: Any) -> None:
    from onnxserve.toolkit.probe import RunResult, TensorResult

    assert isinstance(result, RunResult)
    if result.task_result is not None:
        text = orjson.dumps(result.task_result, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        console.print("Result: " + (text if len(text) <= 400 else text[:400] + " ..."), highlight=False)
    for title, group in (
        ("Inputs", result.inputs),
        ("Outputs", result.outputs),
        ("Intermediates", result.intermediates),
    ):
        if not group:
            continue
        table = Table(title=title, title_justify="left")
        for column in ("tensor", "type", "shape", "min", "max", "mean", "std", "zeros", "first values"):
            table.add_column(column)
        for name, tensor in group.items():
            assert isinstance(tensor, TensorResult)
            s = tensor.summary
            table.add_row(
                name,
                s.dtype,
                _dims(list(s.shape)),
                *(f"{v:.4g}" if v is not None else "-" for v in (s.min, s.max, s.mean, s.std)),
                f"{100 * s.sparsity:.1f}%" if s.sparsity is not None else "-",
                ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in tensor.preview),
            )
        console.print(table)
