"""Text memory on the embeddings routes (``/v1/embeddings``, TEI ``/embed``) stays within the bound a V2
text request has.

An outside attack sent requests of a million punctuation characters (one token each) to these routes.
They are split into pieces of ``max_batch_size`` texts, and each piece was checked on its own: a request
of 2,048 texts of 16,384 characters (32 Mi characters, 32 times what one V2 request may send) was
accepted, encoded all at once and run; four of them held +1.6 GB in the demo model's server. Now the
whole request is bounded as one V2 request is, and its pieces are submitted a few at a time.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import requests
from harness import CappedServer
from watch import Watch

from onnxserve.core.pipeline import MAX_REQUEST_CHARACTERS, MIN_TEXT_CHARACTERS
from onnxserve.protocols.embeddings import IN_FLIGHT_CHARACTERS

CAP = 4 * 1024**3
TEXT_BUDGET_BYTES = 350 * 1024**2
"""What docs/limits.md says the text budget holds at the worst (one token per character)."""
RSS_BOUND = 2 * TEXT_BUDGET_BYTES
"""Above rest while the attack runs: the text budget, the bodies and a tiny model's runs."""
PROBE_BOUND = 1.0
SECONDS = 120


@pytest.fixture(scope="module")
def server(tiny_text_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root = tmp_path_factory.mktemp("embedding-texts")
    shutil.copytree(tiny_text_version, root / "tiny" / "1")
    config = root / "config.json"
    config.write_text(
        json.dumps({"model_config_list": [{"name": "tiny", "base_path": str(root / "tiny"), "max_batch_size": 32}]})
    )
    with CappedServer(["--config", str(config)], cap_bytes=CAP) as running:
        yield running


ROUTES = {
    "openai": ("/v1/embeddings", lambda texts: {"model": "tiny", "input": texts}),
    "tei": ("/embed?model=tiny", lambda texts: {"inputs": texts, "truncate": True}),
}


def _post(server: CappedServer, route: str, texts: list[str]) -> requests.Response:
    path, body = ROUTES[route]
    return requests.post(server.http_url + path, json=body(texts), timeout=SECONDS)


def _vectors(route: str, response: requests.Response) -> npt.NDArray[np.float32]:
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    rows = [d["embedding"] for d in answer["data"]] if route == "openai" else answer
    return np.array(rows, dtype=np.float32)


def _assert_serving(server: CappedServer, prober: Watch) -> None:
    assert server.alive(), server.log()[-3000:]
    assert not prober.failures, prober.failures
    assert prober.worst_probe < PROBE_BOUND
    normal = _post(server, "openai", ["hello"])
    assert normal.status_code == 200, normal.text


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_texts_over_one_requests_characters_are_refused_as_on_v2(server: CappedServer, route: str) -> None:
    # Each text is under the cut, each piece of 32 is under the limit; together they are twice it.
    count = 2 * MAX_REQUEST_CHARACTERS // MIN_TEXT_CHARACTERS
    with Watch(server) as prober:
        response = _post(server, route, ["!" * MIN_TEXT_CHARACTERS] * count)
        assert 400 <= response.status_code < 500, response.text[:500]
        assert f"more than the {MAX_REQUEST_CHARACTERS} one request may send" in response.text
        at_limit = _post(server, route, ["!" * MIN_TEXT_CHARACTERS] * (MAX_REQUEST_CHARACTERS // MIN_TEXT_CHARACTERS))
        assert at_limit.status_code == 200, at_limit.text[:500]
    _assert_serving(server, prober)


@pytest.mark.parametrize(("route", "size"), [("openai", 2000), pytest.param("tei", 500, marks=pytest.mark.long)])
def test_a_million_punctuation_characters_at_once_stay_within_the_text_bound(
    server: CappedServer, route: str, size: int
) -> None:
    texts = ["!" * size] * (1_000_000 // size)  # one token per character
    base = server.rss_bytes()
    with Watch(server) as prober, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _post(server, route, texts), range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text[:300] for a in answers]
    vectors = answers[0].json()
    assert len(vectors["data"] if route == "openai" else vectors) == len(texts)
    assert prober.peak_rss - base < RSS_BOUND, f"+{(prober.peak_rss - base) / 2**20:.0f} MB"
    _assert_serving(server, prober)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_pieces_run_a_few_at_a_time_come_back_in_order(server: CappedServer, route: str) -> None:
    # 70 long texts: three pieces of up to 32, each above IN_FLIGHT_CHARACTERS, so one runs at a time.
    texts = [f"text {i} says " + f"word{i} " * (IN_FLIGHT_CHARACTERS // 32 // 7) for i in range(70)]
    together = _vectors(route, _post(server, route, texts))
    assert together.shape[0] == len(texts)
    for i in (0, 31, 32, 69):
        alone = _vectors(route, _post(server, route, [texts[i]]))
        assert np.allclose(together[i], alone[0], atol=1e-5), i
