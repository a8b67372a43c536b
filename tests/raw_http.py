"""HTTP/1.1 over a bare socket, for requests no client library would send (lying lengths, broken chunks)."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class RawResponse:
    status: int  # 0: the server closed the connection without answering
    headers: dict[str, str]
    body: bytes


def _read_until(sock: socket.socket, buffer: bytearray, marker: bytes) -> bool:
    while marker not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buffer += chunk
    return True


def read_response(sock: socket.socket) -> RawResponse:
    """One response from ``sock`` (its body by Content-Length); status 0 when the server just closed."""
    buffer = bytearray()
    try:
        if not _read_until(sock, buffer, b"\r\n\r\n"):
            return RawResponse(0, {}, bytes(buffer))
    except ConnectionResetError:
        return RawResponse(0, {}, bytes(buffer))
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = bytearray(rest)
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(status, headers, bytes(body[:length]))


def exchange(host: str, port: int, data: bytes, timeout: float = 10.0) -> RawResponse:
    """Send ``data`` as-is on a new connection and read one response; status 0 for silence or a close.

    The write side stays open (a half-close would read as a disconnect): a request that never completes
    is answered by nothing, and ``timeout`` ends the wait.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # the server may answer and close before all of a bad request is sent
        try:
            return read_response(sock)
        except TimeoutError:
            return RawResponse(0, {}, b"")  # still waiting for the rest of the request


def request_bytes(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: [::1]", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
