"""One huge text must not kill the server through its tokenizer. A 50 MB string to /v1/embeddings or
TEI /embed aborted the process (the Rust tokenizer failed to allocate); a 10 MB one took 25 s and left
1.4 GB resident. Now the core pipeline cuts every text to what the model can read (counted as
truncated), before tokenizing, for every protocol; TEI's ``truncate: false`` refuses such a text, and a
request's texts are bounded in total characters.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from harness import CappedServer, serve_capped
from watch import Watch

from onnxserve.core.pipeline import MAX_REQUEST_CHARACTERS

CAP = 4 * 1024**3
RSS_BOUND = 1024**3
PROBE_BOUND = 1.0
HUGE = "word " * 10_000_000  # 50 MB of text
SECONDS = 60  # generous: the unfixed server took 25 s for a fifth of it, or died


@pytest.fixture(scope="module")
def server(tiny_text_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root = tmp_path_factory.mktemp("texts")
    shutil.copytree(tiny_text_version, root / "tiny" / "1")
    with serve_capped(root, cap_bytes=CAP) as running:
        yield running


def _assert_serving(server: CappedServer, prober: Watch) -> None:
    assert server.alive(), server.log()[-3000:]
    assert not prober.failures, prober.failures
    assert prober.worst_probe < PROBE_BOUND
    assert server.rss_bytes() < RSS_BOUND
    normal = requests.post(f"{server.http_url}/v1/embeddings", json={"model": "tiny", "input": "hello"}, timeout=60)
    assert normal.status_code == 200, normal.text


def test_a_50_mb_text_is_cut_before_tokenizing_on_v2_and_openai(server: CappedServer) -> None:
    with Watch(server) as prober:
        started = time.monotonic()
        body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [HUGE]}]}
        v2 = requests.post(f"{server.http_url}/v2/models/tiny/infer", json=body, timeout=SECONDS)
        assert v2.status_code == 200, v2.text[:500]
        assert v2.json()["parameters"]["truncated"] == 1
        openai = requests.post(f"{server.http_url}/v1/embeddings", json={"model": "tiny", "input": HUGE}, timeout=60)
        assert openai.status_code == 200, openai.text[:500]
        assert len(openai.json()["data"]) == 1
        assert time.monotonic() - started < SECONDS
    _assert_serving(server, prober)


def test_tei_without_truncation_refuses_a_huge_text_and_cuts_it_with_truncation(server: CappedServer) -> None:
    with Watch(server) as prober:
        refused = requests.post(f"{server.http_url}/embed?model=tiny", json={"inputs": HUGE}, timeout=SECONDS)
        assert 400 <= refused.status_code < 500, refused.text[:500]
        assert "send 'truncate': true" in refused.text
        cut = requests.post(
            f"{server.http_url}/embed?model=tiny", json={"inputs": HUGE, "truncate": True}, timeout=SECONDS
        )
        assert cut.status_code == 200, cut.text[:500]
    _assert_serving(server, prober)


def test_a_request_whose_texts_hold_too_many_characters_in_all_is_refused(server: CappedServer) -> None:
    texts = ["word " * 3200] * (MAX_REQUEST_CHARACTERS // 16000 + 1)  # each under the per-text cut (16384)
    body = {"inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    with Watch(server) as prober:
        response = requests.post(f"{server.http_url}/v2/models/tiny/infer", json=body, timeout=SECONDS)
        assert response.status_code == 400, response.text[:500]
        assert f"more than the {MAX_REQUEST_CHARACTERS} one request may send" in response.json()["error"]
    _assert_serving(server, prober)


def test_unread_tokenize_answers_are_held_in_the_budget(tiny_text_version: Path, tmp_path: Path) -> None:
    # Outside attack: /tokenize answers (an object per token, ~30 MB of JSON for 2,048 long texts) were
    # built on the event loop and not counted in --max-inflight-bytes; 30 clients that never read them
    # held 3 GB and probes waited 4 s.
    shutil.copytree(tiny_text_version, tmp_path / "tiny" / "1")
    budget = 32 * 1024 * 1024
    with serve_capped(tmp_path, "--max-inflight-bytes", str(budget), cap_bytes=CAP) as server, Watch(server) as prober:
        base = server.rss_bytes()
        body = json.dumps({"inputs": ["a few words of text here " * 20] * 2048}).encode()
        head = b"POST /tokenize HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n".encode()
        readers: list[socket.socket] = []
        statuses: list[bytes] = []
        try:
            for _ in range(12):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(60)
                sock.connect((server.host, server.http_port))
                sock.sendall(head + body)
                statuses.append(sock.recv(64))
                readers.append(sock)
            assert any(b" 200 " in s for s in statuses), statuses
            assert any(b" 429 " in s for s in statuses), statuses  # TEI's status for a full budget
            assert server.rss_bytes() - base < 12 * budget
        finally:
            for sock in readers:
                sock.close()
        _assert_serving(server, prober)


def test_more_texts_than_the_model_batches_are_refused_before_one_is_read(server: CappedServer) -> None:
    """65,000 empty texts (260 KB, 390 bytes of gzip) were each read and bounded on the event loop before their
    count was checked: 16 connections looping them held health probes past 5 s (outside attack rt57). The
    count is checked first (at most 2,048 texts, as OpenAI's, TEI's and TF Serving's bodies; the model's
    max_batch_size when lower): the last text here is not UTF-8, and the answer is about the count."""
    count = 65_000
    raw = struct.pack("<I", 0) * (count - 1) + struct.pack("<I", 1) + b"\xff"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [count],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    with Watch(server) as prober:
        response = requests.post(
            f"{server.http_url}/v2/models/tiny/infer",
            data=header + raw,
            headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
            timeout=60,
        )
    assert response.status_code == 400, response.text
    assert (
        response.json()["error"]
        == f"{count} texts in one request; send at most 2048 (split them over several requests)"
    )
    _assert_serving(server, prober)
