"""``onnxserve`` sub-commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from onnxserve.cli import diff_commands, inspect_commands, optimize_commands
from onnxserve.cli.console import err
from onnxserve.cli.console import fail as _fail
from onnxserve.cli.settings_options import flag_of, settings_from_flags, with_setting_flags
from onnxserve.errors import ConfigError, OnnxServeError
from onnxserve.version import __version__

app = typer.Typer(
    name="onnxserve",
    help="Convert, optimize, inspect and serve ONNX models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
export_app = typer.Typer(help="Convert a model to ONNX, proving the ONNX model computes what the original did.")
app.add_typer(export_app, name="export")


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


CONFIG_VARIABLES = ("ONNXSERVE_CONFIG", "ONNX_SERVER_CONFIG")
"""Environment variables naming the config file when ``serve`` gets neither --config nor
--model-repository, first found wins (``ONNX_SERVER_CONFIG`` is the old tutorial's name)."""

REPOSITORY_VARIABLE = "ONNXSERVE_MODEL_REPOSITORY"
"""Environment variable naming the model repository, read when no config variable is set."""


def _catalog_from_environment() -> tuple[Path | None, Path | None]:
    """(config file, repository) from the environment, for ``serve`` without either flag."""
    import os

    for name in CONFIG_VARIABLES:
        value = os.environ.get(name, "")
        if value:
            return Path(value), None
    repository = os.environ.get(REPOSITORY_VARIABLE, "")
    return None, (Path(repository) if repository else None)


@app.command()
@with_setting_flags
def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Server config file (JSON or YAML) with model_config_list "
            "(default: $ONNXSERVE_CONFIG or $ONNX_SERVER_CONFIG).",
        ),
    ] = None,
    model_repository: Annotated[
        Path | None,
        typer.Option(
            "--model-repository",
            help="Serve every DIR/<name>/<version>/model.onnx (default: $ONNXSERVE_MODEL_REPOSITORY).",
        ),
    ] = None,
    **settings_flags: Any,
) -> None:
    """Serve models over KServe V2 REST and gRPC (and TF Serving REST on the HTTP port)."""
    from onnxserve.core.manager import Catalog
    from onnxserve.server.lifecycle import end_process
    from onnxserve.server.lifecycle import serve as run_server
    from onnxserve.server.logs import configure_logging
    from onnxserve.server.settings import ServerSettings

    if config is None and model_repository is None:
        config, model_repository = _catalog_from_environment()
    if (config is None) == (model_repository is None):
        err.print(
            "[bold red]error:[/] give exactly one of --config FILE or --model-repository DIR "
            f"(or set {' or '.join(CONFIG_VARIABLES)} to a config file, or {REPOSITORY_VARIABLE} to a folder)"
        )
        raise typer.Exit(code=2)
    try:
        catalog = Catalog(config_file=config, repository=model_repository)
        settings = ServerSettings.model_validate(settings_from_flags(settings_flags))
        configure_logging(settings.log_format, settings.log_level, repeat_seconds=settings.log_repeat_seconds)
        run_server(catalog.read(), settings, catalog)
    except ValidationError as e:
        problem = e.errors()[0]
        raise _fail(ConfigError(f"{flag_of(problem['loc'])}: {problem['msg']}")) from None
    except OnnxServeError as e:
        raise _fail(e) from None
    end_process()  # drained, every answer out: no interpreter finalization to wait for


@export_app.command("hf")
def export_hf(
    src: Annotated[str, typer.Argument(help="A local Hugging Face model folder.")],
    task: Annotated[
        str,
        typer.Option(
            help="feature-extraction, text-classification, token-classification, question-answering, fill-mask "
            "or text-ranking (cross-encoders)."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            help="The version folder to create, e.g. models/minilm/1; or a .onnx file name: one "
            "self-contained file that carries its tokenizer and pipeline spec (models under 2 GB)."
        ),
    ],
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


_INPUT_HELP = "NAME:SHAPE:DTYPE, e.g. image:batch,3,32,32:float32; a named dim is dynamic (repeat for more inputs)."
_TOLERANCE = "Largest allowed difference: |onnx - original| <= atol + rtol * |original|."


@export_app.command("torch")
def export_torch(
    src: Annotated[
        str, typer.Argument(help="FILE.py:FACTORY (a function that returns the module) or a TorchScript file.")
    ],
    output: Annotated[Path, typer.Option(help="The version folder to create, e.g. models/cnn/1.")],
    inputs: Annotated[list[str], typer.Option("--input", help=_INPUT_HELP)],
    weights: Annotated[
        Path | None, typer.Option(help="A state dict (or a checkpoint holding one) for the factory's module.")
    ] = None,
    trust_pickle: Annotated[
        bool, typer.Option(help="Let --weights unpickle arbitrary Python objects (runs code from the file).")
    ] = False,
    output_name: Annotated[
        list[str] | None, typer.Option("--output-name", help="Name of each output, in order (repeat).")
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset to export with.")] = 18,
    atol: Annotated[float, typer.Option(help=_TOLERANCE)] = 1e-4,
    rtol: Annotated[float, typer.Option(help=_TOLERANCE)] = 1e-5,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Export a PyTorch module and validate it against PyTorch on several shapes."""
    from onnxserve.toolkit.export.inputs import parse_input_spec
    from onnxserve.toolkit.export.pytorch import TorchExportOptions
    from onnxserve.toolkit.export.pytorch import export_torch as run_export

    try:
        options = TorchExportOptions(
            inputs=tuple(parse_input_spec(text) for text in inputs),
            weights=weights,
            trust_pickle=trust_pickle,
            output_names=tuple(output_name or ()),
            opset=opset,
            force=force,
            atol=atol,
            rtol=rtol,
        )
        report = run_export(src, output, options, progress=err)
    except OnnxServeError as e:
        raise _fail(e) from None
    err.print(report.summary(), highlight=False)


@export_app.command("sklearn")
def export_sklearn(
    src: Annotated[Path, typer.Argument(help="A fitted estimator or pipeline saved with joblib.")],
    output: Annotated[Path, typer.Option(help="The version folder to create, e.g. models/iris/1.")],
    trust_pickle: Annotated[
        bool, typer.Option(help="Required: joblib files are pickles, and loading one runs code from the file.")
    ] = False,
    input_features: Annotated[
        int | None, typer.Option(help="Number of features; default: the model's n_features_in_.")
    ] = None,
    input_spec: Annotated[
        str | None, typer.Option("--input", help="NAME:ROWS,FEATURES:DTYPE, e.g. input:batch,4:float32.")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="A .npy array (rows, features) to validate on; default: random rows.")
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset; default: the newest skl2onnx supports.")] = None,
    atol: Annotated[float, typer.Option(help=_TOLERANCE)] = 1e-4,
    rtol: Annotated[float, typer.Option(help=_TOLERANCE)] = 1e-5,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Export a scikit-learn model with skl2onnx and validate it against scikit-learn."""
    from onnxserve.toolkit.export.inputs import parse_input_spec
    from onnxserve.toolkit.export.sklearn import SklearnExportOptions
    from onnxserve.toolkit.export.sklearn import export_sklearn as run_export

    try:
        options = SklearnExportOptions(
            trust_pickle=trust_pickle,
            input_features=input_features,
            input=parse_input_spec(input_spec) if input_spec is not None else None,
            calibration=calibration,
            opset=opset,
            force=force,
            atol=atol,
            rtol=rtol,
        )
        report = run_export(src, output, options, progress=err)
    except OnnxServeError as e:
        raise _fail(e) from None
    err.print(report.summary(), highlight=False)


@app.command()
def predict(
    folder: Annotated[Path, typer.Argument(help="A text model version folder (from `onnxserve export hf`).")],
    texts: Annotated[
        list[str], typer.Argument(help="Texts (questions for question-answering, the query for text-ranking).")
    ],
    context: Annotated[
        list[str] | None,
        typer.Option(
            help="question-answering: the context, once per question; text-ranking: the texts to score "
            "against the query (repeat the option)."
        ),
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


optimize_commands.register(app)
inspect_commands.register(app)
diff_commands.register(app)


def main() -> None:
    app()
