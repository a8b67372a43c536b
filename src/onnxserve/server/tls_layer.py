"""The loop's own TLS layer, put between an accepted TCP connection and a protocol at once.

Both listeners accept plain TCP and start TLS themselves, so a connection still in its handshake is
seen (counted against the connection cap, timed by the listener's deadline) from its accept: uvloop's
TLS listener handshakes before any protocol exists, and silent connections lived 60 s counted nowhere.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from collections.abc import Callable
from typing import Any


def tls_layer_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's TLS protocol class, as its ``start_tls`` uses: uvloop's own, else asyncio's."""
    try:
        import uvloop.loop

        if isinstance(loop, uvloop.Loop):
            return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    except ImportError:
        pass
    return asyncio.sslproto.SSLProtocol


def wrap_tls(
    loop: asyncio.AbstractEventLoop,
    raw: asyncio.Transport,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    handshake_seconds: float,
    done: Callable[[bool], None],
    shutdown_seconds: float,
) -> None:
    """Put the TLS layer between ``raw`` and ``protocol`` now (the client's first bytes are the layer's).

    What ``loop.start_tls`` does, but synchronously: the coroutine switches the connection's protocol only
    once its task runs, and uvloop may read the ClientHello into the old protocol before that. The layer
    calls ``protocol.connection_made`` with its transport once the handshake is done; ``done(failed)`` is
    called when the handshake ends (``failed``: it failed, timed out or lost its client; the layer tells
    the protocol nothing of those). Raises what making the layer raises (MemoryError)."""
    waiter = loop.create_future()
    layer = tls_layer_class(loop)(
        loop,
        protocol,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=max(0.1, handshake_seconds),
        ssl_shutdown_timeout=shutdown_seconds,
    )
    raw.set_protocol(layer)
    layer.connection_made(raw)

    def ended(future: asyncio.Future[None]) -> None:
        done(future.cancelled() or future.exception() is not None)

    waiter.add_done_callback(ended)
