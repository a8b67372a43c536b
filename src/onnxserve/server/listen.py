"""Listening sockets for both ports, bound before the event loop runs so a port in use fails fast."""

from __future__ import annotations

import socket

from onnxserve.errors import ConfigError

BACKLOG = 2048
"""Connections the kernel may hold for a port before the server accepts them."""


def bind(host: str, port: int, what: str = "HTTP") -> socket.socket:
    """A listening TCP socket for ``what`` (named in the error); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        raise ConfigError(f"cannot listen for {what} on {shown}:{port}: {e.strerror}") from None
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock
