"""What every protocol front end knows about the request it is handling: its id, and who sent it.

The request id comes from the client (HTTP ``X-Request-ID``, gRPC ``x-request-id`` metadata) when it is
usable, else it is generated; it is returned to the client and set in a context variable for the
length of the request, so every log line made while handling it can carry it
(``onnxserve.server.logs``).

Who sent it (``client_identity``) is what the schedulers serve in turn (``core.fairness``): the bearer
token's identity when tokens are configured (the auth middleware and interceptor set it once the token
is accepted), else the peer's IP address; a peer without one (a Unix socket) is "", shared by all such
peers.
"""

from __future__ import annotations

import itertools
import os
import re
from contextvars import ContextVar, Token
from urllib.parse import unquote

REQUEST_ID_METADATA = "x-request-id"
"""The request id's name: gRPC metadata key, and the HTTP header X-Request-ID (lower-case on the wire)."""
MAX_REQUEST_ID_LENGTH = 64

_USABLE_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LENGTH}}}")
"""A client's id is kept only when it cannot look like anything else in a log line: no spaces,
brackets or other punctuation (a spoofed "CRITICAL onnxserve.auth" record inside the id's line)."""

_request_id: ContextVar[str | None] = ContextVar("onnxserve_request_id", default=None)


class _Ids:
    """Request ids: 32 hex digits, like a uuid4's, unique per process: 16 random ones drawn when the process
    (or a child forked from it) starts, then a counter. A tenth of ``uuid.uuid4().hex``'s cost (no system
    call, no UUID object per request); ids are names for log lines, not secrets."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reseed)


def new_request_id() -> str:
    return _ids.next()


def accept_request_id(given: str | None) -> str:
    """The client's id if it is 1 to 64 characters of ``[A-Za-z0-9._:-]``, else a new one."""
    if given is not None and _USABLE_ID.fullmatch(given):
        return given
    return new_request_id()


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    return _request_id.get()


def set_request_id(request_id: str) -> Token[str | None]:
    return _request_id.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)


_authenticated_client: ContextVar[str | None] = ContextVar("onnxserve_authenticated_client", default=None)


def set_authenticated_client(identity: str) -> Token[str | None]:
    """The accepted token's client identity, for the rest of this request (set by the auth checks)."""
    return _authenticated_client.set(identity)


def reset_authenticated_client(token: Token[str | None]) -> None:
    _authenticated_client.reset(token)


def client_identity(peer_host: str | None) -> str:
    """The client a request counts for: its token's identity when it presented one, else its peer's
    address (``peer_host``: an IP address, or None/"" when unknown)."""
    authenticated = _authenticated_client.get()
    if authenticated is not None:
        return authenticated
    return f"address {peer_host}" if peer_host else ""


_peer_host: ContextVar[str | None] = ContextVar("onnxserve_peer_host", default=None)


def set_peer_host(host: str | None) -> Token[str | None]:
    """The address of the peer that sent the request handled in this context (set where the request
    arrives, before its body or message is read)."""
    return _peer_host.set(host)


def reset_peer_host(token: Token[str | None]) -> None:
    _peer_host.reset(token)


def current_client() -> str:
    """The client the request handled in this context counts for (``client_identity`` of its peer)."""
    return client_identity(_peer_host.get())


_peer_hosts: dict[str, str] = {}
"""The client address behind each connection the gRPC port's front hands on to grpc-core, by the name of
the front's socket (``server.grpc_front``)."""


def register_peer(name: str, host: str) -> None:
    """Say that the gRPC peer ``unix-abstract:<name>`` is a connection of the client at ``host``."""
    _peer_hosts[name] = host


def forget_peer(name: str) -> None:
    _peer_hosts.pop(name, None)


def grpc_peer_host(peer: str | None) -> str | None:
    """The IP address in a gRPC peer string (``ipv4:127.0.0.1:50000``, ``ipv6:[::1]:50000``; for a
    connection from the gRPC port's front, ``unix-abstract:<name>``, the client's address behind it), or
    None (``unix:...``, or a form it does not know)."""
    if not peer:
        return None
    family, _, rest = unquote(peer).partition(":")
    if family == "unix-abstract":
        return _peer_hosts.get(rest) or None
    if family == "ipv4":
        host, _, _ = rest.rpartition(":")
        return host or None
    if family == "ipv6":
        host, _, _ = rest.rpartition(":")
        return host.removeprefix("[").removesuffix("]") or None
    return None
