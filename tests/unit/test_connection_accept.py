"""A connection whose protocol cannot be made is refused alone: the listener keeps accepting.

uvloop's accept callback that raises (a MemoryError while making the protocol: an outside attack's
flood) leaves the accepted socket unclaimed, and libuv then never polls the listening socket again:
the port is dead while the process lives. ``guarded_http_protocol``'s factory answers such a
connection with a protocol made in advance that closes it. A real uvloop server on loopback whose
protocol construction fails (uvicorn's protocol without its config), real sockets.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from onnxserve.server.connections import ConnectionLimits, guarded_http_protocol


async def _closed_by_server(port: int) -> bool:
    """Connect, then wait (bounded) for the server to close the connection."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1), timeout=5)
    except ConnectionResetError:
        data = b""
    finally:
        sock.close()
    return data == b""


@pytest.mark.parametrize("new_loop", [uvloop.new_event_loop, asyncio.new_event_loop])
def test_a_protocol_that_cannot_be_made_refuses_only_its_connection(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    accept = guarded_http_protocol(ConnectionLimits(header_timeout=1, body_timeout=1, max_connections=4))

    async def scenario() -> list[bool]:
        server = await asyncio.get_running_loop().create_server(
            lambda: accept(config=None, server_state=None), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        try:
            return [await _closed_by_server(port) for _ in range(3)]
        finally:
            server.close()

    loop = new_loop()
    try:
        assert loop.run_until_complete(scenario()) == [True, True, True]
    finally:
        loop.close()
