"""Requests a browser sends on a web page's behalf: refused where they could reach the server unasked.

A server on loopback without tokens is reachable by every program of its machine, a browser included, and a
browser runs any web site's scripts. Two ways let such a page use the server (outside attack rt27, the
pattern of several local-AI-server CVEs):

- **DNS rebinding**: the page's own host name is made to resolve to 127.0.0.1; the browser then takes the
  server for that site and lets the page read every answer. Its requests carry the site's name in ``Host``.
  When the HTTP port listens on loopback, only loopback names (``localhost``, ``127.x.x.x``, ``[::1]``) are
  answered, unless ``--allowed-hosts`` names others (``*``: any); elsewhere any, unless it names some.
- **Cross-site requests**: a page may send a POST without a body, or with a form's, to any address without
  asking first (a CORS "simple request"); it cannot read the answer, but a model load or unload would happen.
  Browsers name the page's origin in ``Origin``: a request that may change or compute something (any method
  but GET, HEAD and OPTIONS) whose ``Origin`` is not the server's own is refused. The server sends no CORS
  headers, so no cross-site page could read an answer anyway; a client that is not a browser sends no
  ``Origin``.

Both are refused with 403 and a message that says why, in the error shape of the path's protocol.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from onnxserve.errors import PermissionDeniedError
from onnxserve.protocols.http import ErrorRenderer, render_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods a cross-site page may use: they change and compute nothing here (the web page is read-only)."""

LOOPBACK_NAMES = frozenset({"localhost"})
"""Loopback host names besides the loopback addresses."""


_HOST = re.compile(r"(?:\[(?P<ipv6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::[0-9]{1,5})?")
"""A ``Host`` value: a name or an IPv4 address, or an IPv6 address in brackets, and an optional port."""


def host_name(value: str) -> str:
    """The name in a ``Host`` header or an origin's authority, without its port, lowercased, without a final
    dot; an IPv6 address without its brackets; "" for anything that is no such value (``[::1]evil.com``,
    ``localhost:1@evil.com``), which no loopback check accepts."""
    found = _HOST.fullmatch(value.strip().lower())
    if found is None:
        return ""
    return found["ipv6"] or found["name"].rstrip(".")


def is_loopback_name(name: str) -> bool:
    """``localhost`` (or a name under it), a loopback address (an IPv4-mapped one too), or ``0.0.0.0``, which
    clients such as curl take for this machine."""
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (mapped or address).is_loopback or (mapped or address).is_unspecified


class BrowserGuard:
    """ASGI middleware: refuse requests whose ``Host`` is not one the server answers (``hosts``; None: any)
    and unsafe-method requests from another origin (see the module)."""

    def __init__(
        self,
        app: ASGIApp,
        hosts: Callable[[str], bool] | None,
        render: Callable[[str], ErrorRenderer] = lambda path: render_error,
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                response = self.render(scope["path"])(PermissionDeniedError(refusal), refusal, 403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> str | None:
        hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
        origins = [v.decode("latin-1") for k, v in scope["headers"] if k == b"origin"]
        if len(hosts) > 1 or len(origins) > 1:
            return "a request may name one Host and one Origin, not several"
        host = hosts[0] if hosts else None
        origin = origins[0] if origins else None
        if host is not None and self.hosts is not None and not self.hosts(host_name(host)):
            return (
                "this server does not answer requests for the host name in this request's Host header: it "
                "listens on loopback and answers loopback names only (a web page whose name was made to resolve "
                "to this machine would name itself there); start it with --allowed-hosts to answer other names"
            )
        if origin is None or scope["method"] in SAFE_METHODS:
            return None
        own = f"{scope.get('scheme', 'http')}://{host.strip().lower()}" if host is not None else None
        if origin.strip().lower().rstrip("/") != own:
            return (
                f"cross-site request refused: a web page of {origin[:100]!r} asked for {scope['method']} "
                f"{scope['path'][:100]}; this server takes requests that change or compute something only from "
                "clients that are not browsers, or from its own pages"
            )
        return None
