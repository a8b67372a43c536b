"""The harness itself: a capped server starts, answers probes, reports memory, and stops."""

from __future__ import annotations

from pathlib import Path

from harness import serve_capped


def test_capped_server_answers_probes(numeric_repository: Path) -> None:
    with serve_capped(numeric_repository) as server:
        assert server.alive()
        assert server.probe_seconds() < 5
        assert 0 < server.rss_bytes() < 6 * 1024**3
        assert server.grpc_port > 0
    assert not server.alive()
