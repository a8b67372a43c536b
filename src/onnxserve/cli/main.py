"""``onnxserve`` sub-commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from onnxserve import __version__
from onnxserve.errors import OnnxServeError

app = typer.Typer(
    name="onnxserve",
    help="Convert, optimize, inspect and serve ONNX models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
export_app = typer.Typer(help="Convert a model to ONNX, proving the ONNX model computes what the original did.")
app.add_typer(export_app, name="export")

err = Console(stderr=True)


def _fail(error: OnnxServeError) -> typer.Exit:
    err.print(f"[bold red]error:[/] {error.message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=2)


def _version(value: bool) -> None:
    if value:
        print(f"onnxserve {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """onnxserve: one tool for the whole path of an ONNX model."""


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Server config file (JSON or YAML) with model_config_list."),
    ] = None,
    model_repository: Annotated[
        Path | None, typer.Option("--model-repository", help="Serve every DIR/<name>/<version>/model.onnx.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback must be asked for.")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port (KServe V2 REST).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (KServe V2 gRPC).")] = 8001,
    inference_threads: Annotated[
        int | None, typer.Option(help="Threads that run inference off the event loop.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve models over KServe V2 REST and gRPC (and TF Serving REST on the HTTP port)."""
    from onnxserve.config import ServerSettings, load_config
    from onnxserve.core.repository import scan_repository
    from onnxserve.server.lifecycle import serve as run_server

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if (config is None) == (model_repository is None):
        err.print("[bold red]error:[/] give exactly one of --config FILE or --model-repository DIR")
        raise typer.Exit(code=2)
    try:
        server_config = load_config(config) if config is not None else scan_repository(model_repository)  # type: ignore[arg-type]
        settings = ServerSettings(
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            log_level=log_level,  # type: ignore[arg-type]
            **({"inference_threads": inference_threads} if inference_threads else {}),
        )
        run_server(server_config, settings)
    except OnnxServeError as e:
        raise _fail(e) from None


@export_app.command("hf")
def export_hf(
    src: Annotated[str, typer.Argument(help="A local Hugging Face model folder.")],
    task: Annotated[
        str,
        typer.Option(
            help="feature-extraction, text-classification, token-classification, question-answering or fill-mask."
        ),
    ],
    output: Annotated[Path, typer.Option(help="The version folder to create, e.g. models/minilm/1.")],
    pooling: Annotated[
        str | None,
        typer.Option(
            help="mean, cls or none (feature-extraction); default: the sentence-transformers config, else none."
        ),
    ] = None,
    normalize: Annotated[
        bool | None, typer.Option("--normalize/--no-normalize", help="L2-normalize the pooled embedding.")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset to export with.")] = 18,
    fp16: Annotated[
        bool, typer.Option(help="Float16 weights and compute, float32 inputs and outputs (for GPUs).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Export a Hugging Face Transformers model and validate it against PyTorch."""
    from onnxserve.toolkit.export.huggingface import HfExportOptions, export_huggingface

    options = HfExportOptions(task=task, pooling=pooling, normalize=normalize, opset=opset, fp16=fp16, force=force)
    try:
        report = export_huggingface(src, output, options, progress=err)
    except OnnxServeError as e:
        raise _fail(e) from None
    err.print(report.summary(), highlight=False)


@app.command()
def predict(
    folder: Annotated[Path, typer.Argument(help="A text model version folder (from `onnxserve export hf`).")],
    texts: Annotated[list[str], typer.Argument(help="Texts (questions, for question-answering).")],
    context: Annotated[
        list[str] | None, typer.Option(help="question-answering: the context, once per question.")
    ] = None,
) -> None:
    """Run a text model locally, without a server, and print the results as JSON."""
    import orjson

    from onnxserve.predict import Pipeline

    try:
        results = Pipeline(folder)(texts, context=context)
    except OnnxServeError as e:
        raise _fail(e) from None
    sys.stdout.write(orjson.dumps(results, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2).decode() + "\n")


def main() -> None:
    app()
