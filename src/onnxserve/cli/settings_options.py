"""The ``serve`` command's setting flags, generated from ``ServerSettings``' fields.

Each field becomes one option: ``--`` + its name with dashes (or its ``flag``), its description as
help, its default, its environment variable; booleans as ``--x/--no-x``, tuples as a repeatable
option. Environment-only fields (``cli: False``) get no option and are read from their variable.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from onnxserve.server.settings import ServerSettings, setting_env, setting_flag

F = TypeVar("F", bound=Callable[..., Any])


def _value_type(info: FieldInfo) -> Any:
    """The type the option parses: a Literal as text (pydantic checks it), a tuple as a repeated list."""
    annotation: Any = info.annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin is tuple:
        return list[typing.get_args(annotation)[0]] | None  # type: ignore[misc,unused-ignore]
    if info.default_factory is not None:
        return annotation | None  # absent: the factory computes the default when the server starts
    return annotation


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None or info.default is PydanticUndefined or info.default == ():
        return None
    return info.default


def setting_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per setting with a flag, annotated with its ``typer.Option``."""
    parameters = []
    for name, info in ServerSettings.model_fields.items():
        flag = setting_flag(name)
        if flag is None:
            continue
        env = setting_env(name)
        if info.annotation is bool:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        option = typer.Option(flag, help=info.description, envvar=env, show_default=info.default_factory is None)
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=_default(info),
                annotation=Annotated[_value_type(info), option],
            )
        )
    return parameters


def with_setting_flags(command: F) -> F:
    """Give ``command`` (which takes ``**settings``) one flag per server setting, after its own parameters."""
    own = [
        p
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    command.__signature__ = inspect.Signature([*own, *setting_parameters()])  # type: ignore[attr-defined]
    return command


def settings_from_flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings document for ``ServerSettings.model_validate``: the flags given (a flag left at None
    keeps the field's default) and the environment-only settings from their variables."""
    document: dict[str, Any] = {}
    for name, info in ServerSettings.model_fields.items():
        value: Any
        if setting_flag(name) is None:
            env = setting_env(name)
            value = os.environ.get(env) if env is not None else None
        else:
            value = values.get(name)
        if value is None:
            continue
        if typing.get_origin(info.annotation) is tuple:
            value = tuple(value)
        document[name] = value
    return document


def flag_of(location: tuple[int | str, ...]) -> str:
    """How an error names the setting at a pydantic error location: its flag, or its variable."""
    name = str(location[0]) if location else ""
    if name not in ServerSettings.model_fields:
        return "--" + name.replace("_", "-")
    return setting_flag(name) or setting_env(name) or name
