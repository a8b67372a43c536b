"""``onnxserve diff`` (issue #8)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console

from onnxserve.cli.console import fail
from onnxserve.errors import InvalidInputError, OnnxServeError


class DiffFormat(StrEnum):
    text = "text"
    json = "json"
    html = "html"


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("diff")(diff)


def diff(
    a: Annotated[Path, typer.Argument(metavar="A", help="Model A (the reference): a .onnx file or a version folder.")],
    b: Annotated[
        Path,
        typer.Argument(metavar="B", help="Model B (e.g. optimized or quantized): a .onnx file or a version folder."),
    ],
    output_format: Annotated[
        DiffFormat, typer.Option("--format", help="text (tables), json, or html (both graphs side by side).")
    ] = DiffFormat.text,
    output: Annotated[
        Path | None, typer.Option("--output", help="Write the report to FILE (default: standard output).")
    ] = None,
    samples: Annotated[
        Path | None,
        typer.Option(help="Inputs for the numeric comparison: .npz, or .json {input: nested list} (default: random)."),
    ] = None,
    numeric: Annotated[
        bool, typer.Option(help="Run both models with ONNX Runtime on the same inputs and compare the outputs.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the generated sample inputs.")] = 0,
) -> None:
    """Compare two models: signature, opsets, nodes (matched by name and structure), weights, and outputs.

    Where B is an optimized (fused) or quantized form of A, B's new nodes are mapped to the A nodes they replaced.
    """
    from onnxserve.toolkit import diff_report, sample_inputs
    from onnxserve.toolkit.diff import diff_models, remeasure
    from onnxserve.toolkit.model_file import load_model, locate_model

    try:
        if output_format is DiffFormat.html and output is None:
            raise InvalidInputError("--format html needs --output FILE")
        model_a, model_b = load_model(a), load_model(b)
        given = sample_inputs.load_samples(samples, sample_inputs.signature(model_a.graph)) if samples else None
        files = (locate_model(a).file, locate_model(b).file)
        result = diff_models(model_a, model_b, samples=given, run=numeric, seed=seed, files=files)
        if numeric and given is None:
            result.accuracy = remeasure(a, b)
        if output_format is DiffFormat.json:
            text = orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n"
        elif output_format is DiffFormat.html:
            text = diff_report.render_html(result, model_a, model_b, str(a), str(b))
        else:
            console = Console(record=output is not None, width=160 if output is not None else None)
            if output is None:
                diff_report.print_text(result, console, str(a), str(b))
                return
            with console.capture():
                diff_report.print_text(result, console, str(a), str(b))
            text = console.export_text()
        if output is None:
            typer.echo(text, nl=False)
        else:
            diff_report.write_report(text, output)
    except OnnxServeError as e:
        raise fail(e) from None
