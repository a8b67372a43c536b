"""Generate the CLI and config references of the documentation site from the code.

    python scripts/generate_reference.py            # write docs/reference/cli.md and docs/reference/config.md
    python scripts/generate_reference.py --check    # exit 1 if the committed pages are stale

docs/reference/cli.md comes from the typer app (``onnxserve.cli.main.app``): every command of the click
tree that ``typer.main.get_command`` builds, with each parameter's name, type, default, environment
variable and help. docs/reference/config.md comes from the pydantic models of ``onnxserve.config``:
the config file's models (found by walking ``ServerConfig``'s fields), with each field's name, type,
constraints, default and description (the field's ``description``, else the comments written beside
the field in the source); and ``onnxserve.server.settings.ServerSettings``, whose fields are the one
definition of each server setting (flag, type, default, environment variable, description). The
output depends only on the code, never on this machine (a default computed at start-up is shown as
such), so a test can compare it byte for byte.
"""

from __future__ import annotations

import enum
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
import typer
import typer.main
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from onnxserve import config as config_module  # noqa: E402
from onnxserve.cli.main import app  # noqa: E402
from onnxserve.server.settings import ServerSettings, setting_env, setting_flag  # noqa: E402

CLI_PAGE = Path("docs/reference/cli.md")
CONFIG_PAGE = Path("docs/reference/config.md")
COMMAND = "python scripts/generate_reference.py"


def cell(text: str) -> str:
    """Text for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def code(text: str) -> str:
    return f"`{text}`" if text else ""


# --- the CLI ---------------------------------------------------------------------------------------


def _commands(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    children = getattr(command, "commands", None) or {}
    for name in sorted(children):
        child = children[name]
        if not getattr(child, "hidden", False):
            yield from _commands(child, [*path, name])


def _param_name(param: Any) -> str:
    if param.param_type_name == "argument":
        name = str(param.name).upper()
        return f"{name}..." if param.nargs == -1 else name
    names = "/".join([*param.opts, *param.secondary_opts]) if param.secondary_opts else ", ".join(param.opts)
    return names


def _param_type(param: Any, context: Any) -> str:
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return "flag"
    if getattr(param, "is_flag", False):
        return "bool"
    label = str(param.display_type(context)).removeprefix("<").removesuffix(">")
    return label


def _param_default(param: Any) -> str:
    if param.required:
        return "required"
    default = param.default
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return "on" if default else "off"
    if default is None or default == () or default == []:
        return ""
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, bool) and getattr(param, "secondary_opts", None):
        return code(str(param.opts[0] if default else param.secondary_opts[0]))
    return code(str(default))


def _param_help(param: Any) -> str:
    text = getattr(param, "help", None) or ""
    if param.param_type_name == "argument" and not text:
        text = ""
    if getattr(param, "multiple", False):
        text = f"{text} Repeatable." if text else "Repeatable."
    return text


def _first_paragraph(text: str) -> str:
    return inspect.cleandoc(text).split("\n\n")[0].replace("\n", " ") if text else ""


def cli_reference() -> str:
    root = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        f"Generated from the code by `{COMMAND}`; do not edit by hand.",
        "Every command also takes `--help`. A parameter written `--x/--no-x` is a switch with both forms.",
        "",
    ]
    for path, command in _commands(root, ["onnxserve"]):
        context = command.context_class(command, info_name=path[-1])
        title = " ".join(path)
        lines += [f"## {title}", ""]
        if command.help:
            lines += [inspect.cleandoc(command.help), ""]
        children = getattr(command, "commands", None)
        if children:
            visible = [name for name in sorted(children) if not getattr(children[name], "hidden", False)]
            lines += [
                "| command | what it does |",
                "|---|---|",
                *[
                    f"| [{' '.join([*path, name])}](#{'-'.join([*path, name])}) | "
                    f"{cell(_first_paragraph(children[name].help or ''))} |"
                    for name in visible
                ],
                "",
            ]
        params = [p for p in command.params if not getattr(p, "hidden", False)]
        if not params:
            continue
        with_env = any(getattr(p, "envvar", None) for p in params)
        header = "| parameter | type | default |" + (" environment |" if with_env else "") + " description |"
        lines += [header, "|---|---|---|" + ("---|" if with_env else "") + "---|"]
        for param in params:
            env = getattr(param, "envvar", None)
            env_text = ", ".join(env) if isinstance(env, list | tuple) else (env or "")
            row = [
                code(_param_name(param)),
                cell(_param_type(param, context)),
                cell(_param_default(param)),
                *([code(env_text)] if with_env else []),
                cell(_param_help(param)),
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# --- the config ------------------------------------------------------------------------------------


def _field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comments written beside each field in the class body: lines above it, and the end of its line."""
    try:
        source = inspect.cleandoc("\n" + inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    found: dict[str, str] = {}
    source_lines = source.splitlines()
    for number, line in enumerate(source_lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if not (line.startswith("    ") and not line.startswith("     ") and name in model.model_fields):
            continue
        if name in found or not stripped.startswith(f"{name}:"):
            continue
        above: list[str] = []
        previous = number - 1
        while previous in comments and source_lines[previous - 1].strip().startswith("#"):
            above.insert(0, comments[previous])
            previous -= 1
        parts = [*above, *([comments[number]] if number in comments else [])]
        found[name] = " ".join(parts)
    return found


def _strip_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *more = typing.get_args(annotation)
        metadata += more
    return annotation, metadata


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    annotation, _ = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for argument in typing.get_args(annotation):
        yield from _models_in(argument)


def _anchor(model: type[BaseModel]) -> str:
    return model.__name__.lower()


def _type_text(annotation: Any) -> str:
    annotation, _ = _strip_annotated(annotation)
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in arguments)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in arguments if a is not type(None))
    if origin in (list, tuple):
        inner = [a for a in arguments if a is not Ellipsis]
        return f"list of {_type_text(inner[0])}" if inner else "list"
    if origin is dict:
        return f"object of {_type_text(arguments[0])} → {_type_text(arguments[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{_anchor(annotation)})"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _constraints(annotation: Any, info: FieldInfo) -> str:
    _, metadata = _strip_annotated(annotation)
    found: list[str] = []
    for item in [*metadata, *info.metadata]:
        for kind, attribute, symbol in (
            (annotated_types.Ge, "ge", "≥"),
            (annotated_types.Gt, "gt", ">"),
            (annotated_types.Le, "le", "≤"),
            (annotated_types.Lt, "lt", "<"),
        ):
            if isinstance(item, kind):
                found.append(f"{symbol} {getattr(item, attribute)}")
        if isinstance(item, annotated_types.MinLen):
            found.append(f"at least {item.min_length} item(s)")
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            found.append(f"matches `{pattern}`")
    for argument in typing.get_args(_strip_annotated(annotation)[0]):
        nested = _constraints(argument, FieldInfo())
        if nested:
            found.append(f"each {nested}")
    return ", ".join(found)


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return code(json.dumps(value.model_dump(mode="json", exclude_none=True)))
        if isinstance(value, list | dict | tuple):
            return code(json.dumps(value, default=str))
        return "computed when the server starts"
    value = info.default
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, tuple) and not value:
        return "none"
    return code(json.dumps(value, default=str))


def _model_table(model: type[BaseModel]) -> list[str]:
    comments = _field_comments(model)
    lines = [f"### {model.__name__}", ""]
    if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
        lines += [inspect.cleandoc(model.__doc__), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        annotation = model.__annotations__.get(name, info.annotation)
        if isinstance(annotation, str):
            annotation = typing.get_type_hints(model, include_extras=True).get(name, info.annotation)
        limits = _constraints(annotation, info)
        description = info.description or comments.get(name, "")
        type_text = _type_text(annotation) + (f" ({limits})" if limits else "")
        lines.append(f"| `{name}` | {cell(type_text)} | {cell(_default_text(info))} | {cell(description)} |")
    lines.append("")
    return lines


def _settings_table() -> list[str]:
    hints = typing.get_type_hints(ServerSettings, include_extras=True)
    lines = ["| key | flag | type | default | environment | description |", "|---|---|---|---|---|---|"]
    for name, info in ServerSettings.model_fields.items():
        annotation = hints.get(name, info.annotation)
        limits = _constraints(annotation, info)
        type_text = _type_text(annotation) + (f" ({limits})" if limits else "")
        flag = setting_flag(name)
        if flag is not None and info.annotation is bool:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        row = [
            f"`{name}`",
            code(flag or ""),
            cell(type_text),
            cell(_default_text(info)),
            code(setting_env(name) or ""),
            cell(info.description or ""),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _config_models() -> list[type[BaseModel]]:
    ordered: list[type[BaseModel]] = []
    pending: list[type[BaseModel]] = [config_module.ServerConfig]
    while pending:
        model = pending.pop(0)
        if model in ordered:
            continue
        ordered.append(model)
        hints = typing.get_type_hints(model, include_extras=True)
        for name in model.model_fields:
            pending += [m for m in _models_in(hints.get(name)) if m not in ordered]
    return ordered


def config_reference() -> str:
    lines = [
        "# Config reference",
        "",
        f"Generated from `src/onnxserve/config.py` by `{COMMAND}`; do not edit by hand.",
        "How the keys work together, with examples, is explained in",
        "[Serving models](../serving.md#the-config-file).",
        "",
        "## The config file",
        "",
        "`onnxserve serve --config FILE` reads a JSON or YAML document: `ServerConfig` at the top, one",
        "`ModelConfig` per entry of `model_config_list`. Unknown keys are refused, naming the key and the file.",
        "",
    ]
    for model in _config_models():
        lines += _model_table(model)
    lines += [
        "## Server settings",
        "",
        "Where and how the server listens: `ServerSettings` in `src/onnxserve/server/settings.py`, one field",
        "per setting. The flags of [`onnxserve serve`](cli.md#onnxserve-serve) are generated from these",
        "fields, so the flag, its default and its help are the ones below.",
        "",
        *_settings_table(),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


# --- main ------------------------------------------------------------------------------------------


def pages() -> dict[Path, str]:
    return {CLI_PAGE: cli_reference(), CONFIG_PAGE: config_reference()}


def main(argv: list[str]) -> int:
    generated = pages()
    if "--check" in argv:
        stale = [str(p) for p, text in generated.items() if not (ROOT / p).is_file() or (ROOT / p).read_text() != text]
        if stale:
            print(f"stale generated reference: {', '.join(stale)}; run {COMMAND}")
            return 1
        print("generated reference is up to date")
        return 0
    for path, text in generated.items():
        (ROOT / path).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / path).write_text(text)
    print(f"wrote {', '.join(str(p) for p in generated)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
