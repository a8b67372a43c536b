"""Each server setting is defined once (``onnxserve.server.settings``); ``serve``'s flags come from it."""

from __future__ import annotations

from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from onnxserve.cli.main import app
from onnxserve.server.settings import ServerSettings, setting_env, setting_flag


def options() -> dict[str, Any]:
    """The serve command's options by parameter name (typer builds the click tree)."""
    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    return {p.name: p for p in serve.params if p.param_type_name == "option" and p.name}


def test_every_setting_has_a_description_and_a_flag_or_a_variable() -> None:
    for name, info in ServerSettings.model_fields.items():
        assert info.description, f"{name} has no description"
        assert setting_flag(name) or setting_env(name), f"{name} can be set neither by a flag nor a variable"


def test_every_flag_carries_its_fields_name_default_and_help() -> None:
    found = options()
    for name, info in ServerSettings.model_fields.items():
        flag = setting_flag(name)
        if flag is None:
            assert name not in found, f"{name} is environment-only but has a flag"
            continue
        option = found[name]
        assert option.opts == [flag]
        assert option.help == info.description
        if info.annotation is bool:
            assert option.secondary_opts == [f"--no-{flag.removeprefix('--')}"]
        if info.default_factory is None and info.annotation is not bool and info.default != ():
            assert option.default == info.default, name
        env = setting_env(name)
        assert option.envvar == env


def test_the_contract_flags_keep_their_names() -> None:
    found = options()
    assert found["auth_tokens_file"].opts == ["--auth-tokens"]
    assert found["load_models"].opts == ["--load-model"]
    assert found["load_models"].multiple
    assert found["http_port"].opts == ["--http-port"]
    assert "auth_tokens" not in found  # a secret: from ONNXSERVE_AUTH_TOKENS only, never on a command line
    assert setting_env("auth_tokens") == "ONNXSERVE_AUTH_TOKENS"


def test_serve_help_lists_every_setting() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=400, env={"COLUMNS": "400"})
    assert result.exit_code == 0
    for name in ServerSettings.model_fields:
        flag = setting_flag(name)
        if flag is not None:
            assert flag in result.output, flag


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--http-port", "70000"], "--http-port: Input should be less than or equal to 65535"),
        (["--log-level", "loud"], "--log-level: Input should be 'debug', 'info', 'warning' or 'error'"),
        (["--max-request-bytes", "10"], "--max-request-bytes: Input should be greater than or equal to 1024"),
        (
            ["--forwarded-allow-ips", "127.0.0.1,proxy.local"],
            "--forwarded-allow-ips: Value error, 'proxy.local' is not an IP address or network (or '*')",
        ),
    ],
)
def test_a_bad_setting_is_refused_naming_its_flag(tmp_path: Any, arguments: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--model-repository", str(tmp_path), *arguments])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_flags_become_settings_and_the_secret_comes_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxserve.cli.settings_options import settings_from_flags

    monkeypatch.setenv("ONNXSERVE_AUTH_TOKENS", "secret infer")
    document = settings_from_flags({"load_models": ["a", "b"], "strict_readiness": False, "inference_threads": None})
    settings = ServerSettings.model_validate(document)
    assert settings.load_models == ("a", "b")
    assert settings.strict_readiness is False
    assert settings.inference_threads >= 4  # absent: computed at start-up
    assert settings.auth_tokens == "secret infer"
    monkeypatch.delenv("ONNXSERVE_AUTH_TOKENS")
    assert ServerSettings.model_validate(settings_from_flags({})).auth_tokens is None


def test_forwarded_headers_are_believed_from_no_peer_by_default() -> None:
    assert ServerSettings().forwarded_allow_ips == ""
    for value in ("127.0.0.1", "10.0.0.0/8, ::1", "*"):
        assert ServerSettings(forwarded_allow_ips=value).forwarded_allow_ips == value
