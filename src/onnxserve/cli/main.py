"""``onnxserve`` sub-commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from onnxserve.cli import diff_commands, inspect_commands, optimize_commands
from onnxserve.cli.console import err
from onnxserve.cli.console import fail as _fail
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
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback must be asked for.")] = "127.0.0.1",
    auth_tokens: Annotated[
        Path | None,
        typer.Option(
            "--auth-tokens",
            help="File of bearer tokens, one 'TOKEN SCOPES' a line (scopes: infer, control, metrics); "
            "or set ONNXSERVE_AUTH_TOKENS to such entries separated by ';'.",
        ),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: HTTPS and gRPC over TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert (unencrypted).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="PEM CA bundle: require client certificates it signed (mutual TLS).")
    ] = None,
    http_port: Annotated[int, typer.Option(help="HTTP port (KServe V2 REST).", envvar="ONNXSERVE_HTTP_PORT")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port (KServe V2 gRPC).", envvar="ONNXSERVE_GRPC_PORT")] = 8001,
    inference_threads: Annotated[
        int | None, typer.Option(help="Threads that run inference off the event loop.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        str, typer.Option(help="text, or json: one JSON object a line (time, level, logger, message, request_id).")
    ] = "text",
    model_control_mode: Annotated[
        str,
        typer.Option(
            help="none (serve what start-up loads), poll (follow the repository/config), explicit (load API)."
        ),
    ] = "none",
    repository_poll_secs: Annotated[float, typer.Option(help="poll mode: seconds between looks.")] = 15.0,
    load_model: Annotated[
        list[str] | None, typer.Option("--load-model", help="explicit mode: a model to load at start ('*': all).")
    ] = None,
    strict_readiness: Annotated[
        bool, typer.Option(help="Ready only when every model has a ready version and none is loading.")
    ] = True,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM, seconds to let open requests finish before exiting.")
    ] = 30.0,
    request_timeout: Annotated[
        float,
        typer.Option(help="Seconds an inference request may take (queued + running) before 504; 0: no limit."),
    ] = 60.0,
    max_response_bytes: Annotated[
        int,
        typer.Option(
            help="Largest answer: bytes of output tensors one request may get, checked before encoding "
            "(400 / INVALID_ARGUMENT above); 0: no limit."
        ),
    ] = 64 * 1024 * 1024,
    max_request_bytes: Annotated[
        int, typer.Option(help="Largest HTTP request body, counted after gzip/deflate decompression (413 above).")
    ] = 64 * 1024 * 1024,
    grpc_max_message_bytes: Annotated[
        int, typer.Option(help="Largest gRPC message received or sent (RESOURCE_EXHAUSTED above).")
    ] = 64 * 1024 * 1024,
    max_inflight_bytes: Annotated[
        int,
        typer.Option(
            help="Request bytes held at once, HTTP bodies and gRPC messages together (503 / TF Serving 429 / "
            "RESOURCE_EXHAUSTED above, with Retry-After); 0: no limit."
        ),
    ] = 256 * 1024 * 1024,
    max_connections: Annotated[
        int,
        typer.Option(
            help="Open connections per port; past it HTTP closes the oldest idle connection (probes always get in)."
        ),
    ] = 1000,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a client has to send an HTTP request head or the gRPC handshake (408).")
    ] = 10.0,
    body_timeout: Annotated[
        float,
        typer.Option(help="Seconds a client has to send an HTTP body (408) or a gRPC request (DEADLINE_EXCEEDED)."),
    ] = 60.0,
    keep_alive_timeout: Annotated[
        float, typer.Option(help="Seconds an HTTP connection may stay idle between requests.")
    ] = 5.0,
    grpc_max_concurrent_streams: Annotated[int, typer.Option(help="Open calls per gRPC connection.")] = 100,
    grpc_max_connection_idle: Annotated[
        float, typer.Option(help="Seconds a gRPC connection may stay without calls before GOAWAY; 0: no limit.")
    ] = 300.0,
    grpc_max_connection_age: Annotated[
        float, typer.Option(help="Seconds a gRPC connection may live before GOAWAY; 0: no limit.")
    ] = 0.0,
    grpc_max_connection_age_grace: Annotated[
        float, typer.Option(help="Seconds the open calls of an aged gRPC connection get to finish.")
    ] = 30.0,
) -> None:
    """Serve models over KServe V2 REST and gRPC (and TF Serving REST on the HTTP port)."""
    import os

    from onnxserve.config import ServerSettings
    from onnxserve.core.manager import Catalog
    from onnxserve.server.exposure import TOKENS_VARIABLE
    from onnxserve.server.lifecycle import serve as run_server
    from onnxserve.server.logs import configure_logging

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
        settings = ServerSettings.model_validate(
            {
                "host": host,
                "auth_tokens_file": auth_tokens,
                "auth_tokens": os.environ.get(TOKENS_VARIABLE),
                "tls_cert": tls_cert,
                "tls_key": tls_key,
                "tls_client_ca": tls_client_ca,
                "http_port": http_port,
                "grpc_port": grpc_port,
                "log_level": log_level,
                "log_format": log_format,
                "model_control_mode": model_control_mode,
                "repository_poll_secs": repository_poll_secs,
                "load_models": tuple(load_model or ()),
                "strict_readiness": strict_readiness,
                "drain_timeout": drain_timeout,
                "request_timeout": request_timeout,
                "max_response_bytes": max_response_bytes,
                "max_request_bytes": max_request_bytes,
                "grpc_max_message_bytes": grpc_max_message_bytes,
                "max_inflight_bytes": max_inflight_bytes,
                "max_connections": max_connections,
                "header_timeout": header_timeout,
                "body_timeout": body_timeout,
                "keep_alive_timeout": keep_alive_timeout,
                "grpc_max_concurrent_streams": grpc_max_concurrent_streams,
                "grpc_max_connection_idle": grpc_max_connection_idle,
                "grpc_max_connection_age": grpc_max_connection_age,
                "grpc_max_connection_age_grace": grpc_max_connection_age_grace,
                **({"inference_threads": inference_threads} if inference_threads else {}),
            }
        )
        configure_logging(settings.log_format, settings.log_level)
        run_server(catalog.read(), settings, catalog)
    except ValidationError as e:
        problem = e.errors()[0]
        raise _fail(ConfigError(f"--{str(problem['loc'][0]).replace('_', '-')}: {problem['msg']}")) from None
    except OnnxServeError as e:
        raise _fail(e) from None


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
