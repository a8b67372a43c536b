"""Bearer tokens (file format, constant-time lookup), the scope of every endpoint, and TLS settings checks."""

from __future__ import annotations

import hmac
import logging
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from onnxserve.config import ServerConfig
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import InferenceService
from onnxserve.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from onnxserve.server.app import create_app
from onnxserve.server.auth import authorize, grpc_scope, http_scope
from onnxserve.server.exposure import Exposure
from onnxserve.server.metrics import Metrics
from onnxserve.server.settings import ServerSettings
from onnxserve.server.tls import ServerTls
from onnxserve.server.tokens import MIN_TOKEN_LENGTH, Scope, TokenTable

ALICE = "alice-0123456789abcdefXYZ"
BOB = "bob-0123456789abcdef+/=="
CAROL = "carol_0123456789.abcdef~"

# --- the token file -------------------------------------------------------------------------------


def test_parse_reads_tokens_scopes_and_comments() -> None:
    table = TokenTable.parse(
        f"""
        # comment line
        {ALICE}   infer                 # trailing comment
        {BOB}\tinfer,control
        {CAROL} metrics,metrics
        """,
        "tokens.txt",
    )
    assert len(table) == 3
    assert table.scopes_of(ALICE) == {Scope.INFER}
    assert table.scopes_of(BOB) == {Scope.INFER, Scope.CONTROL}
    assert table.scopes_of(CAROL) == {Scope.METRICS}


def test_each_token_is_its_own_client() -> None:
    """``authorize`` names the client a token belongs to (its entry), never the token itself."""
    table = TokenTable.parse(f"{ALICE} infer\n{BOB} infer,control", "t")
    assert table.lookup(BOB) == (1, {Scope.INFER, Scope.CONTROL})
    assert authorize(table, [f"Bearer {ALICE}"], Scope.INFER) == "token 1"
    assert authorize(table, [f"bearer  {BOB} "], Scope.INFER) == "token 2"
    assert ALICE not in authorize(table, [f"Bearer {ALICE}"], Scope.INFER)


@pytest.mark.parametrize("presented", ["", ALICE[:-1], ALICE + "x", ALICE.upper(), f" {ALICE}", "x" * 64])
def test_only_the_exact_token_is_accepted(presented: str) -> None:
    table = TokenTable.parse(f"{ALICE} infer", "t")
    assert table.scopes_of(presented) is None


def test_every_token_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first token, the last, and an unknown one each cost one comparison per token."""
    tokens = [f"token-{i:02d}-0123456789abcdef" for i in range(7)]
    table = TokenTable.parse("\n".join(f"{t} infer" for t in tokens), "t")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in (tokens[0], tokens[-1], "unknown-token-0123456789ab"):
        calls.clear()
        table.scopes_of(presented)
        assert len(calls) == len(tokens)
        assert {len(a) for a, _ in calls} == {32}  # digests: the compared length never depends on the token


def test_environment_form_separates_entries_with_semicolons() -> None:
    table = TokenTable.from_environment(f"{ALICE} infer; {BOB} control;\n{CAROL} metrics")
    assert table.scopes_of(BOB) == {Scope.CONTROL}
    assert len(table) == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no tokens"),
        ("# only a comment\n\n", "no tokens"),
        (f"{ALICE}\n", "line 1: expected 'TOKEN SCOPES'"),
        (f"\n{ALICE} infer control\n", "line 2: expected 'TOKEN SCOPES'"),
        (f"{ALICE} admin", "unknown scope 'admin'; scopes are infer, control, metrics"),
        (f"{ALICE} infer,", "unknown scope ''"),
        (f"{ALICE} infer\n{ALICE} control", "line 2: the same token as line 1"),
        ("short infer", f"the token is 5 characters; use at least {MIN_TOKEN_LENGTH}"),
        ("tøken-0123456789abcdef infer", "a token may hold only"),
        ('"quoted-0123456789abcdef" infer', "a token may hold only"),
        ("abc=def-0123456789abcdef infer", "a token may hold only"),
    ],
)
def test_bad_token_text_is_refused_with_its_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^tokens\.txt") as raised:
        TokenTable.parse(text, "tokens.txt")
    assert expected in raised.value.message
    assert ALICE not in raised.value.message


def test_read_names_the_option_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=r"--auth-tokens .*nope.txt: cannot read the token file: No such file"):
        TokenTable.read(missing)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        TokenTable.read(binary)


def test_read_warns_about_a_token_file_others_can_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = tmp_path / "tokens.txt"
    file.write_text(f"{ALICE} infer\n")
    file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="onnxserve.server.tokens"):
        TokenTable.read(file)
    assert "can be read by other users (mode 644)" in caplog.text
    caplog.clear()
    file.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="onnxserve.server.tokens"):
        TokenTable.read(file)
    assert caplog.text == ""


# --- who may call what ----------------------------------------------------------------------------


def test_authorize() -> None:
    table = TokenTable.parse(f"{ALICE} infer\n{BOB} infer,control", "t")
    authorize(table, [f"Bearer {ALICE}"], Scope.INFER)
    authorize(table, [f"bearer   {BOB} "], Scope.CONTROL)
    with pytest.raises(UnauthenticatedError, match="needs a bearer token"):
        authorize(table, [], Scope.INFER)
    with pytest.raises(UnauthenticatedError, match="not accepted"):
        authorize(table, ["Bearer " + CAROL], Scope.INFER)
    with pytest.raises(UnauthenticatedError, match="only bearer tokens"):
        authorize(table, [f"Basic {ALICE}"], Scope.INFER)
    with pytest.raises(UnauthenticatedError, match="one authorization header"):
        authorize(table, [f"Bearer {ALICE}", f"Bearer {ALICE}"], Scope.INFER)
    with pytest.raises(PermissionDeniedError, match="needs the scope 'control'"):
        authorize(table, [f"Bearer {ALICE}"], Scope.CONTROL)


def example_path(template: str) -> str:
    """A concrete path for a route template (``{name}`` and friends filled in)."""
    for parameter, value in (
        ("{name}", "m"),
        ("{name:tfs_segment}", "m"),
        ("{version}", "1"),
        ("{version:tfs_version}", "1"),
        ("{label:tfs_segment}", "stable"),
        ("{label}", "stable"),
        ("{asset}", "app.js"),
    ):
        template = template.replace(parameter, value)
    assert "{" not in template, template
    return template


def test_every_http_route_has_the_documented_scope() -> None:
    service = InferenceService(ModelRegistry.load(ServerConfig(model_config_list=[])), threads=1)
    try:
        app = create_app(service, Metrics())
        paths = {example_path(route.path) for route in app.routes if hasattr(route, "path")}
    finally:
        service.close()
    assert {p for p in paths if http_scope(p) is None} == {"/v2/health/live", "/v2/health/ready"}
    assert {p for p in paths if http_scope(p) is Scope.CONTROL} == {
        "/v2/repository/index",
        "/v2/repository/models/m/load",
        "/v2/repository/models/m/unload",
    }
    assert {p for p in paths if http_scope(p) is Scope.METRICS} == {"/metrics"}
    for path in ("/v2/models/m/infer", "/v1/models/m:predict", "/v2", "/", "/web/api/models/m/versions/1/weights"):
        assert path in paths
        assert http_scope(path) is Scope.INFER
    # paths no route serves still need a token, so a probe for endpoints learns nothing
    for path in ("/nope", "/v2/health/live/", "/V2/health/live", "//v2/health/live", "/v2/health"):
        assert http_scope(path) is Scope.INFER
    assert http_scope("/v2/repository") is Scope.CONTROL


def test_grpc_scopes() -> None:
    service = "/inference.GRPCInferenceService"
    assert grpc_scope(f"{service}/ServerLive") is None
    assert grpc_scope(f"{service}/ServerReady") is None
    for method in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):
        assert grpc_scope(f"{service}/{method}") is Scope.CONTROL
    for method in ("ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelReady", "ModelConfig", "Nope"):
        assert grpc_scope(f"{service}/{method}") is Scope.INFER
    assert grpc_scope("/other.Service/ServerLive") is Scope.INFER


# --- TLS and exposure settings --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pem")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    other = trustme.CA().issue_cert("127.0.0.1")
    files = {name: folder / f"{name}.pem" for name in ("cert", "key", "ca", "other_key", "encrypted_key", "text")}
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.private_key_pem.write_to_path(str(files["other_key"]))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    files["encrypted_key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    files["text"].write_text("not a certificate\n")
    return files


def test_tls_material_is_checked_at_start(pem: dict[str, Path]) -> None:
    tls = ServerTls.from_settings(ServerSettings(tls_cert=pem["cert"], tls_key=pem["key"], tls_client_ca=pem["ca"]))
    assert tls is not None
    assert tls.mutual
    assert tls.context.verify_mode == tls.grpc_context.verify_mode == ssl.CERT_REQUIRED
    assert ServerTls.from_settings(ServerSettings()) is None
    plain = Exposure.from_settings(ServerSettings(tls_cert=pem["cert"], tls_key=pem["key"]))
    assert plain.tls is not None
    assert not plain.tls.mutual
    assert plain.scheme == "https"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"tls_cert": "cert"}, "--tls-cert needs --tls-key"),
        ({"tls_key": "key"}, "--tls-key needs --tls-cert"),
        ({"tls_client_ca": "ca"}, "--tls-client-ca needs --tls-cert and --tls-key"),
        ({"tls_cert": "missing", "tls_key": "key"}, "--tls-cert .*missing.pem: cannot read the file"),
        ({"tls_cert": "text", "tls_key": "key"}, "--tls-cert .*text.pem: not a PEM file"),
        ({"tls_cert": "cert", "tls_key": "other_key"}, "--tls-cert .* and --tls-key .* are not a PEM certificate"),
        ({"tls_cert": "cert", "tls_key": "encrypted_key"}, "unencrypted private key"),
        ({"tls_cert": "cert", "tls_key": "key", "tls_client_ca": "key"}, "--tls-client-ca .*: not a PEM CA"),
    ],
)
def test_bad_tls_settings_name_the_option(
    pem: dict[str, Path], tmp_path: Path, given: dict[str, str], expected: str
) -> None:
    files = {**pem, "missing": tmp_path / "missing.pem"}
    settings = ServerSettings(**{option: files[name] for option, name in given.items()})
    with pytest.raises(ConfigError, match=expected):
        Exposure.from_settings(settings)


def test_tokens_come_from_one_place(tmp_path: Path) -> None:
    file = tmp_path / "tokens.txt"
    file.write_text(f"{ALICE} infer\n")
    file.chmod(0o600)
    with pytest.raises(ConfigError, match="not both"):
        Exposure.from_settings(ServerSettings(auth_tokens_file=file, auth_tokens=f"{BOB} infer"))
    from_file = Exposure.from_settings(ServerSettings(auth_tokens_file=file)).tokens
    assert from_file is not None
    assert from_file.scopes_of(ALICE) == {Scope.INFER}
    inline = Exposure.from_settings(ServerSettings(auth_tokens=f"{BOB} control")).tokens
    assert inline is not None
    assert inline.scopes_of(BOB) == {Scope.CONTROL}
    assert Exposure.from_settings(ServerSettings()).tokens is None
    with pytest.raises(ConfigError, match="ONNXSERVE_AUTH_TOKENS: no tokens"):
        Exposure.from_settings(ServerSettings(auth_tokens=""))  # set but empty: refused, never "open"


def test_settings_never_show_inline_tokens() -> None:
    settings = ServerSettings(auth_tokens=f"{ALICE} infer")
    assert ALICE not in repr(settings)
    assert ALICE not in str(settings)


@pytest.mark.parametrize(
    ("address", "exposed"),
    [
        ("127.0.0.1", False),
        ("127.1.2.3", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("0.0.0.0", True),
        ("::", True),
        ("10.1.2.3", True),
        ("fe80::1%eth0", True),
    ],
)
def test_warning_only_beyond_loopback(address: str, exposed: bool, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxserve.server.exposure"):
        Exposure().warn_if_exposed(address)
    assert ("without authentication" in caplog.text) is exposed
