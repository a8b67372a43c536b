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
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from onnxserve.errors import PermissionDeniedError
from onnxserve.protocols.http import ErrorRenderer, render_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods a cross-site page may use: they change and compute nothing here (the web page is read-only)."""

LOOPBACK_NAMES = frozenset({"localhost"})
"""Loopback host names besides the loopback addresses."""


def host_name(value: str) -> str:
    """The name in a ``Host`` header or an origin's authority, without its port, lowercased, without a final
    dot; an IPv6 address without its brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def is_loopback_name(name: str) -> bool:
    """``localhost`` (or a name under it) or a loopback address."""
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
        host = origin = None
        for key, value in scope["headers"]:
            if key == b"host":
                host = value.decode("latin-1")
            elif key == b"origin":
                origin = value.decode("latin-1")
        if host is not None and self.hosts is not None and not self.hosts(host_name(host)):
            return (
                "this server does not answer requests for the host name in this request's Host header: it "
                "listens on loopback and answers loopback names only (a web page whose name was made to resolve "
                "to this machine would name itself there); start it with --allowed-hosts to answer other names"
            )
        if origin is None or scope["method"] in SAFE_METHODS:
            return None
        if origin == "null" or host is None or urlsplit(origin).netloc.lower() != host.strip().lower():
            return (
                f"cross-site request refused: a web page of {origin[:100]!r} asked for {scope['method']} "
                f"{scope['path'][:100]}; this server takes requests that change or compute something only from "
                "clients that are not browsers, or from its own pages"
            )
        return None
