"""Server settings: where and how the server listens, each setting defined once.

Every setting is one pydantic field of :class:`ServerSettings`: its name, type, default, constraints
and help (the field's ``description``), plus, in ``json_schema_extra``:

- ``env``: an environment variable that sets it (``onnxserve serve`` reads it when the flag is absent);
- ``flag``: the flag's name when it is not ``--`` + the field's name with dashes (``--auth-tokens`` for
  ``auth_tokens_file``, the repeatable ``--load-model`` for ``load_models``);
- ``cli: False``: no flag at all (a secret read only from its environment variable).

The ``serve`` command's flags (``onnxserve.cli.settings_options``) and the docs' reference tables
(``scripts/generate_reference.py``) are generated from these fields.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from onnxserve.core.cpu import cpu_budget
from onnxserve.log_throttle import EVERY_SECONDS
from onnxserve.server.abandoned_calls import ADDRESS_CALLS
from onnxserve.server.abandoned_calls import RATE as ABANDONED_RATE
from onnxserve.server.core_queue import QUEUE_LIMIT

TOKENS_VARIABLE = "ONNXSERVE_AUTH_TOKENS"
"""The environment variable holding bearer tokens inline: ``TOKEN SCOPES`` entries separated by ';'."""

MiB = 1024 * 1024


def _extra(env: str | None = None, flag: str | None = None, cli: bool = True) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if env is not None:
        extra["env"] = env
    if flag is not None:
        extra["flag"] = flag
    if not cli:
        extra["cli"] = False
    return extra


def _forwarded_allow_ips(value: str) -> str:
    """Comma-separated IP addresses or networks, or ``*``: each entry must parse (uvicorn would take a
    mistyped address as a literal that never matches, silently)."""
    if not value.strip():
        return value
    for entry in (e.strip() for e in value.split(",")):
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (or '*')") from None
    return value


class ServerSettings(BaseModel):
    """Where and how the server listens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="Address to bind; anything but loopback must be asked for.")
    auth_tokens_file: Path | None = Field(
        default=None,
        description="File of bearer tokens, one 'TOKEN SCOPES' a line (scopes: infer, control, metrics); "
        f"or set {TOKENS_VARIABLE} to such entries separated by ';'.",
        json_schema_extra=_extra(flag="--auth-tokens"),
    )
    auth_tokens: str | None = Field(
        default=None,
        repr=False,
        description="The same entries as --auth-tokens, inline, separated by ';' (environment only: never on "
        "a command line).",
        json_schema_extra=_extra(env=TOKENS_VARIABLE, cli=False),
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate chain: HTTPS and gRPC over TLS (needs --tls-key)."
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of --tls-cert (unencrypted).")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA bundle: require client certificates it signed (mutual TLS)."
    )
    http_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8000, description="HTTP port (KServe V2 REST).", json_schema_extra=_extra(env="ONNXSERVE_HTTP_PORT")
    )
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=8001, description="gRPC port (KServe V2 gRPC).", json_schema_extra=_extra(env="ONNXSERVE_GRPC_PORT")
    )
    inference_threads: Annotated[int, Field(ge=1)] = Field(
        default_factory=lambda: max(4, cpu_budget()),
        description="Threads that run inference off the event loop (default: max(4, CPUs this process may use)).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug, info, warning or error."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text, or json: one JSON object a line (time, level, logger, message, request_id).",
    )
    log_repeat_seconds: Annotated[float, Field(gt=0)] = Field(
        default=EVERY_SECONDS,
        description="Log lines a client can repeat at will (refusals, failed batches, cut connections): at most "
        "one of a kind every so many seconds, with how many there were since the last.",
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        default="none",
        description="none (serve what start-up loads), poll (follow the repository/config), explicit (load API).",
    )
    repository_poll_secs: Annotated[float, Field(gt=0)] = Field(
        default=15.0, description="poll mode: seconds between looks."
    )
    load_models: tuple[str, ...] = Field(
        default=(),
        description="explicit mode: a model to load at start ('*': all).",
        json_schema_extra=_extra(flag="--load-model"),
    )
    strict_readiness: bool = Field(
        default=True, description="Ready only when every model has a ready version and none is loading."
    )
    drain_timeout: Annotated[float, Field(ge=0)] = Field(
        default=30.0, description="On SIGTERM, seconds to let open requests finish before exiting."
    )
    request_timeout: Annotated[float, Field(ge=0)] = Field(
        default=60.0,
        description="Seconds an inference request may take (queued + running) before 504; 0: no limit.",
    )
    max_response_bytes: Annotated[int, Field(ge=0)] = Field(
        default=64 * MiB,
        description="Largest answer: bytes of output tensors one request may get, checked before encoding "
        "(400 / INVALID_ARGUMENT above); 0: no limit.",
    )
    max_request_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=64 * MiB,
        description="Largest HTTP request body, counted after gzip/deflate decompression (413 above).",
    )
    grpc_max_message_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=64 * MiB, description="Largest gRPC message received or sent (RESOURCE_EXHAUSTED above)."
    )
    # Connection limits and timeouts (onnxserve.server.connections; docs/limits.md).
    web_document_memory: Annotated[int, Field(ge=0)] = Field(
        default=1024 * MiB,
        description="Memory the web page's graph, weights and diff documents computed at once may take, each "
        "counted at 2.5x its model file(s); a document that alone needs more is refused (400); 0: none.",
    )
    max_inflight_bytes: Annotated[int, Field(ge=0)] = Field(
        default=256 * MiB,
        description="Request and answer bytes held at once, HTTP and gRPC together: bodies and messages, and "
        "answers until they are sent (503 / TF Serving 429 / RESOURCE_EXHAUSTED above, with Retry-After); "
        "0: no limit.",
    )
    max_connections: Annotated[int, Field(ge=1)] = Field(
        default=1000,
        description="Open HTTP connections; past it HTTP closes an idle or still-sending connection of the "
        "address holding the most (when it holds two more than the newcomer's), else the oldest idle one, and "
        "16 more are kept for health probes and metrics scrapes (gRPC: --grpc-max-connections).",
    )
    forwarded_allow_ips: Annotated[str, AfterValidator(_forwarded_allow_ips)] = Field(
        default="",
        description="Peer addresses (comma-separated IPs or networks, '*' for all) whose X-Forwarded-For and "
        "X-Forwarded-Proto headers are believed: the client is then the address the proxy names. Empty (the "
        "default): none; the client is always the connection's peer address.",
    )
    allowed_hosts: str = Field(
        default="",
        description="Host names the HTTP port answers (comma-separated; '*': any). Empty (the default): on a "
        "loopback --host, loopback names only (localhost, 127.0.0.1, ::1), so that a web page whose name was "
        "made to resolve to this machine cannot use the server (DNS rebinding); elsewhere, or with "
        "--forwarded-allow-ips (a proxy in front), any.",
    )
    header_timeout: Annotated[float, Field(gt=0)] = Field(
        default=10.0,
        description="Seconds a client has to send an HTTP request head or the gRPC handshake (408).",
    )
    body_timeout: Annotated[float, Field(gt=0)] = Field(
        default=60.0,
        description="Seconds a client has to send an HTTP body (408) or a gRPC request (DEADLINE_EXCEEDED), "
        "and to read an HTTP answer it leaves unread (the connection is cut).",
    )
    max_header_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=64 * 1024,
        description="Largest HTTP request head (request line and headers) in bytes (431 above).",
    )
    keep_alive_timeout: Annotated[float, Field(gt=0)] = Field(
        default=5.0, description="Seconds an HTTP connection may stay idle between requests."
    )
    grpc_max_connections: Annotated[int, Field(ge=1)] = Field(
        default=1_000,
        description="Open gRPC connections (lowered to fit the open-file limit); past it the connection idle "
        "longest (no call open) makes room, from the client address holding the most; a new one is refused "
        "only when every connection has a call open.",
    )
    grpc_max_concurrent_streams: Annotated[int, Field(ge=1)] = Field(
        default=100, description="Open calls per gRPC connection."
    )
    grpc_max_address_calls: Annotated[int, Field(ge=0)] = Field(
        default=ADDRESS_CALLS,
        description="gRPC calls one client address may have waiting for the server at once, over all its "
        "connections (open, not yet answered): the connection that opens one more is closed. Raise it behind a "
        "gRPC proxy, whose address all clients share, or for one client with more calls in flight. 0: no limit.",
    )
    grpc_max_queued_calls: Annotated[int, Field(ge=0)] = Field(
        default=QUEUE_LIMIT,
        description="gRPC calls, of all clients, that may wait in grpc-core's queue for the server to take them "
        "(counted by the front; grpc-core drops calls at random past 1,000). Within it the front keeps about "
        "0.2 s of calls there at the server's recent pace (at least 32): past that a new call waits in the front, "
        "first come first served, but a health probe (ServerLive, ServerReady; 32 counted at most). 0: no such "
        "bound.",
    )
    grpc_max_abandoned_calls: Annotated[int, Field(ge=0)] = Field(
        default=int(ABANDONED_RATE),
        description="gRPC calls a client address may leave unanswered a second, and at once (reset, or left open "
        "when its connection goes, before grpc-core answered them): past it, its new connections are refused "
        "and a connection of its that abandons more is closed. Raise it behind a gRPC proxy, whose address all "
        "clients share. 0: no limit.",
    )
    grpc_message_wait: Annotated[float, Field(gt=0)] = Field(
        default=5.0,
        description="Seconds a gRPC call may wait for its request message (a stream: its next one) and keep "
        "its place when the room for arriving messages (--max-inflight-bytes, each counted at "
        "--grpc-max-message-bytes) is full; past them it gives its place to a newer call (RESOURCE_EXHAUSTED). "
        "A client holding two places more than another's gives way to it at once.",
    )
    grpc_max_connection_idle: Annotated[float, Field(ge=0)] = Field(
        default=300.0, description="Seconds a gRPC connection may stay without calls before GOAWAY; 0: no limit."
    )
    grpc_max_connection_age: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="Seconds a gRPC connection may live before GOAWAY; 0: no limit."
    )
    grpc_max_connection_age_grace: Annotated[float, Field(ge=0)] = Field(
        default=30.0, description="Seconds the open calls of an aged gRPC connection get to finish."
    )


def setting_flag(name: str) -> str | None:
    """The ``serve`` flag that sets field ``name`` (None for an environment-only setting)."""
    extra = ServerSettings.model_fields[name].json_schema_extra
    extra = extra if isinstance(extra, dict) else {}
    if extra.get("cli") is False:
        return None
    flag = extra.get("flag")
    return str(flag) if flag is not None else "--" + name.replace("_", "-")


def setting_env(name: str) -> str | None:
    """The environment variable that sets field ``name``, if any."""
    extra = ServerSettings.model_fields[name].json_schema_extra
    env = extra.get("env") if isinstance(extra, dict) else None
    return str(env) if env is not None else None
