"""Who a request counts for in fair scheduling: the token's client when one was accepted, else the
peer's IP address (gRPC's peer strings parsed), and one shared client for peers without an address."""

from __future__ import annotations

import pytest

from onnxserve.protocols import context


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.2:50312", "127.0.0.2"),
        ("ipv6:[::1]:50312", "::1"),
        ("ipv6:%5B::1%5D:50312", "::1"),
        ("ipv6:[fe80::1%25eth0]:1", "fe80::1%eth0"),
        ("unix:/tmp/onnxserve.sock", None),
        ("unix:", None),
        ("", None),
        (None, None),
        ("ipv4:", None),
    ],
)
def test_grpc_peer_host(peer: str | None, host: str | None) -> None:
    assert context.grpc_peer_host(peer) == host


def test_the_address_is_the_client_unless_a_token_was_accepted() -> None:
    assert context.client_identity("127.0.0.1") != context.client_identity("127.0.0.2")
    assert context.client_identity(None) == context.client_identity("") == ""
    token = context.set_authenticated_client("token 2")
    try:
        assert context.client_identity("127.0.0.1") == context.client_identity("127.0.0.2") == "token 2"
    finally:
        context.reset_authenticated_client(token)
    assert context.client_identity("127.0.0.1") == "address 127.0.0.1"
