"""Both ports queue a burst of new connections while the server is busy (``server.listen.BACKLOG``).

The gRPC port's front listened again with asyncio's default backlog of 100, under the 2,048 the socket was
made with: 940 clients connecting at once had 121 to 697 of their connections reset by the kernel, with no
line in the log (outside attack rt54 C). Here the server is stopped (SIGSTOP: busy, accepting nothing) while
500 connections are made to each port: the kernel completes each of them into the port's queue, and once
the server goes on it serves a probe on each port.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import time
from pathlib import Path

from harness import serve_capped

CONNECTIONS = 500


def completed(sockets: list[socket.socket], seconds: float) -> int:
    """How many of the non-blocking connects in ``sockets`` complete within ``seconds``."""
    pending = {sock.fileno(): sock for sock in sockets}
    done = 0
    deadline = time.monotonic() + seconds
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            poller.unregister(fd)
            sock = pending.pop(fd)
            done += sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return done


def test_a_burst_of_connections_waits_in_each_ports_queue(numeric_repository: Path) -> None:
    with serve_capped(numeric_repository) as server:
        sockets: list[socket.socket] = []
        server.process.send_signal(signal.SIGSTOP)
        try:
            counts = {}
            for name, port in (("http", server.http_port), ("grpc", server.grpc_port)):
                burst = []
                for _ in range(CONNECTIONS):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        sock.connect((server.host, port))
                    burst.append(sock)
                sockets += burst
                counts[name] = completed(burst, 3)
        finally:
            server.process.send_signal(signal.SIGCONT)
            for sock in sockets:
                sock.close()
        assert counts == {"http": CONNECTIONS, "grpc": CONNECTIONS}
        assert server.probe_seconds(timeout=30) < 30
        assert server.grpc_probe_seconds(timeout=30) < 30
        assert server.alive()
