"""Many concurrent requests of long texts must not add up the attention memory of every model slot.

A text model's executions were bounded in tokens (rows x tokens, ``max_batch_tokens``) while their
attention takes rows x heads x tokens²: at the token budget, 16 rows of 512 tokens of the 8-head tiny
BERT below took about 0.6 GB, and a model runs as many executions at once as it has slots. Now each
execution's estimated memory stays within ``max_execution_bytes`` (long rows make smaller chunks) and
all text model executions together within the server's room (``core.attention_memory``).

The model: a tiny BERT whose attention is wide (8 heads, 512 positions), so that its attention, not its
weights, takes the memory, as in a real encoder; four instances, so four executions may run at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from harness import CappedServer, serve_config
from watch import Watch

import tiny_text_models
from onnxserve.core.attention_memory import EXECUTION_BYTES_AT_ONCE

CAP = 6 * 1024**3
PROBE_BOUND = 2.0  # generous: the box running the suite is loaded
TOKENS = 512  # the positions of the wide tiny BERT (conftest.wide_version)
REQUESTS, TEXTS = 8, 32
SECONDS = 240
# Generous: the room's estimate (512 MiB, conservative) plus what the requests' texts and answers hold.
# Measured before the bound: 2.3 GB above the resting size (four executions of 16 x 512 at once).
PEAK_BOUND = EXECUTION_BYTES_AT_ONCE + 512 * 1024**2


@pytest.fixture(scope="module")
def server(wide_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    """``direct``: four instances, requests not merged; ``batched``: four instances, requests merged."""
    base = str(wide_version.parent)
    models = [
        {"name": "direct", "base_path": base, "instance_count": 4},
        {"name": "batched", "base_path": base, "instance_count": 4, "max_batch_size": 32},
    ]
    with serve_config(tmp_path_factory.mktemp("config"), models, cap_bytes=CAP) as running:
        yield running


def _long_texts(count: int, seed: int) -> list[str]:
    words = tiny_text_models.vocabulary()[5:]
    return [" ".join(words[(seed + row + i) % len(words)] for i in range(600)) for row in range(count)]


@pytest.mark.parametrize("model", ["direct", "batched"])
def test_concurrent_requests_of_long_texts_stay_within_the_execution_room(server: CappedServer, model: str) -> None:
    statuses: list[int] = []
    errors: list[str] = []

    def send(seed: int) -> None:
        body = {"inputs": [{"name": "text", "shape": [TEXTS], "datatype": "BYTES", "data": _long_texts(TEXTS, seed)}]}
        try:
            response = requests.post(f"{server.http_url}/v2/models/{model}/infer", json=body, timeout=SECONDS)
        except requests.RequestException as e:
            errors.append(repr(e))
            return
        statuses.append(response.status_code)
        if response.status_code != 200:
            errors.append(response.text[:300])

    with Watch(server) as watch:
        rest = watch.peak_rss
        threads = [threading.Thread(target=send, args=(seed,)) for seed in range(REQUESTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SECONDS)
    assert statuses == [200] * REQUESTS, errors
    assert server.alive()
    assert not watch.failures, watch.failures
    assert watch.worst_probe < PROBE_BOUND
    assert watch.peak_rss - rest < PEAK_BOUND, (rest, watch.peak_rss)
    small = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a short one"]}]}
    assert requests.post(f"{server.http_url}/v2/models/{model}/infer", json=small, timeout=60).status_code == 200
