"""TEI-compatible routes (/embed, /rerank, /predict, /tokenize, /info) and cross-encoder rerankers.

A tiny cross-encoder trained for a few seconds on a toy retrieval set (tests/tiny_cross_encoder.py) is
exported with ``--task text-ranking`` and must rank exactly as sentence-transformers' ``CrossEncoder``
through /rerank, V2 (``query`` and ``text`` BYTES inputs), ``onnxserve.Pipeline`` and ``onnxserve
predict``. Beside it: the tiny embedding BERT and a tiny classifier, on one real server. Every bad
input of every route is refused in TEI's error shape, and the server keeps serving.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

import tiny_cross_encoder
from onnxserve import Pipeline
from onnxserve.config import parse_config
from onnxserve.server.lifecycle import RunningServer, start_in_background
from onnxserve.server.settings import ServerSettings
from onnxserve.toolkit.export.huggingface import HfExportOptions, export_huggingface

QUERY = "lazy dog"
CANDIDATES = [t for texts in tiny_cross_encoder.TOPICS.values() for t in texts]
LABELS = {0: "NEG", 1: "POS"}


@pytest.fixture(scope="module")
def ranker_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_cross_encoder.tiny_cross_encoder(tmp_path_factory.mktemp("cross-encoder") / "hf")


@pytest.fixture(scope="module")
def repository(ranker_source: Path, tiny_text_version: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    repo = tmp_path_factory.mktemp("tei-repo")
    export_huggingface(ranker_source, repo / "ranker" / "1", HfExportOptions(task="text-ranking"))
    shutil.copytree(tiny_text_version, repo / "tiny" / "1")
    classifier = tmp_path_factory.mktemp("classifier") / "hf"
    shutil.copytree(ranker_source, classifier)
    config = BertConfig.from_pretrained(
        str(ranker_source), num_labels=2, id2label=LABELS, label2id={"NEG": 0, "POS": 1}
    )
    BertForSequenceClassification(config).eval().save_pretrained(str(classifier))
    export_huggingface(classifier, repo / "clf" / "1", HfExportOptions(task="text-classification"))
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    config = parse_config(
        {
            "model_config_list": [
                {"name": name, "base_path": name, "max_batch_size": size}
                for name, size in (("ranker", 16), ("tiny", 4), ("clf", 4))
            ]
        },
        "test config",
        repository,
    )
    running = start_in_background(config, ServerSettings(http_port=0, grpc_port=0, log_level="warning"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def cross_encoder(ranker_source: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(ranker_source), device="cpu")


def call(server: RunningServer, path: str, body: Any, model: str | None = None) -> httpx.Response:
    headers = {"x-model": model} if model else {}
    return httpx.post(f"{server.http_url}{path}", json=body, headers=headers, timeout=60)


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_ranking(order: Sequence[int], reference: npt.NDArray[Any]) -> None:
    """``order`` ranks by ``reference`` (the scores only swap where the reference ties within 1e-5)."""
    assert sorted(order) == list(range(len(reference)))
    for a, b in itertools.pairwise(order):
        assert reference[a] >= reference[b] - 1e-5, (order, reference)


# --- rerankers ---------------------------------------------------------------------------------------


def test_cross_encoder_learned_the_toy_set(cross_encoder: Any) -> None:
    scores = cross_encoder.predict([(QUERY, t) for t in CANDIDATES])
    assert scores[:3].min() > scores[3:].max()  # the animal texts first: its ranking means something


def test_rerank_ranks_like_cross_encoder(server: RunningServer, cross_encoder: Any) -> None:
    reference = np.asarray(cross_encoder.predict([(QUERY, t) for t in CANDIDATES]))
    ranked = ok(call(server, "/rerank", {"query": QUERY, "texts": CANDIDATES}))  # the only reranker: no X-Model
    assert_same_ranking([r["index"] for r in ranked], reference)
    assert np.allclose([r["score"] for r in ranked], reference[[r["index"] for r in ranked]], atol=1e-4)
    assert all("text" not in r for r in ranked)
    with_text = ok(call(server, "/rerank", {"query": QUERY, "texts": CANDIDATES, "return_text": True}, "ranker"))
    assert all(r["text"] == CANDIDATES[r["index"]] for r in with_text)
    raw = ok(call(server, "/rerank", {"query": QUERY, "texts": CANDIDATES, "raw_scores": True}))
    logits = np.asarray(cross_encoder.predict([(QUERY, t) for t in CANDIDATES], activation_fn=_identity()))
    assert np.allclose([r["score"] for r in raw], logits[[r["index"] for r in raw]], atol=1e-4)


def _identity() -> Any:
    import torch

    return torch.nn.Identity()


def test_v2_pair_input_scores_like_cross_encoder(server: RunningServer, cross_encoder: Any) -> None:
    body = {
        "inputs": [
            {"name": "query", "shape": [len(CANDIDATES)], "datatype": "BYTES", "data": [QUERY] * len(CANDIDATES)},
            {"name": "text", "shape": [len(CANDIDATES)], "datatype": "BYTES", "data": CANDIDATES},
        ]
    }
    answer = ok(httpx.post(f"{server.http_url}/v2/models/ranker/infer", json=body, timeout=60))
    (score,) = answer["outputs"]
    assert score["name"] == "score"
    reference = np.asarray(cross_encoder.predict([(QUERY, t) for t in CANDIDATES]))
    assert np.allclose(score["data"], reference, atol=1e-4)
    assert_same_ranking(list(np.argsort(-np.asarray(score["data"]), kind="stable")), reference)
    lonely = httpx.post(f"{server.http_url}/v2/models/ranker/infer", json={"inputs": body["inputs"][1:]})
    assert lonely.status_code == 400
    assert "needs both 'query' and 'text'" in lonely.json()["error"]


def test_pipeline_and_predict_cli_score_like_cross_encoder(repository: Path, cross_encoder: Any) -> None:
    pairs = [(QUERY, t) for t in CANDIDATES]
    reference = np.asarray(cross_encoder.predict(pairs))
    pipe = Pipeline(repository / "ranker" / "1")
    assert np.allclose(pipe(pairs), reference, atol=1e-4)
    assert abs(pipe(pairs[0]) - reference[0]) < 1e-4
    ranked = pipe.rank(QUERY, CANDIDATES)
    assert_same_ranking([r["corpus_id"] for r in ranked], reference)
    assert [r["corpus_id"] for r in ranked][:3] == [r["corpus_id"] for r in cross_encoder.rank(QUERY, CANDIDATES)][:3]
    command = [sys.executable, "-m", "onnxserve.cli", "predict", str(repository / "ranker" / "1"), QUERY]
    command += [arg for text in CANDIDATES[:4] for arg in ("--context", text)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert np.allclose(json.loads(done.stdout), reference[:4], atol=1e-4)


def test_export_refuses_a_classifier_with_three_labels(ranker_source: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from onnxserve.errors import ExportError

    three = tmp_path / "three"
    shutil.copytree(ranker_source, three)
    BertForSequenceClassification(BertConfig.from_pretrained(str(ranker_source), num_labels=3)).save_pretrained(
        str(three)
    )
    with pytest.raises(ExportError, match="one relevance logit or two classes"):
        export_huggingface(three, tmp_path / "out" / "1", HfExportOptions(task="text-ranking"))
    assert not (tmp_path / "out" / "1").exists()


# --- embeddings, classification, tokenization, info ----------------------------------------------------


def test_embed_matches_v2_and_normalizes(server: RunningServer) -> None:
    texts = ["the quick brown fox", "onnx runtime serves this model ."]
    v2 = ok(
        httpx.post(
            f"{server.http_url}/v2/models/tiny/infer",
            json={"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]},
        )
    )
    served = np.array(v2["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
    raw = np.array(ok(call(server, "/embed", {"inputs": texts, "normalize": False})), dtype=np.float32)
    assert np.allclose(raw, served, atol=1e-5)
    unit = np.array(ok(call(server, "/embed", {"inputs": texts})), dtype=np.float32)  # TEI normalizes by default
    assert np.allclose(unit, served / np.linalg.norm(served, axis=1, keepdims=True), atol=1e-5)
    single = ok(call(server, "/embed", {"inputs": texts[0], "dimensions": 8}, "tiny:1"))
    assert np.array(single).shape == (1, 8)
    assert abs(np.linalg.norm(single[0]) - 1) < 1e-5


def test_embed_truncates_only_when_asked(server: RunningServer) -> None:
    long = " ".join(["fox"] * 200)
    refused = call(server, "/embed", {"inputs": long})
    assert refused.status_code == 422
    assert "truncate" in refused.json()["error"]
    assert len(ok(call(server, "/embed", {"inputs": long, "truncate": True}))) == 1
    too_long = call(server, "/rerank", {"query": QUERY, "texts": [long]})
    assert too_long.status_code == 422
    assert len(ok(call(server, "/rerank", {"query": QUERY, "texts": [long], "truncate": True}))) == 1


def test_predict_single_and_batch(server: RunningServer) -> None:
    one = ok(call(server, "/predict", {"inputs": "the lazy dog"}))
    assert sorted(r["label"] for r in one) == ["NEG", "POS"]
    assert one[0]["score"] >= one[1]["score"]
    assert abs(sum(r["score"] for r in one) - 1) < 1e-5
    batch = ok(call(server, "/predict", {"inputs": ["the lazy dog", "onnx models run well ."]}, "clf"))
    assert len(batch) == 2
    assert batch[0] == one
    v2 = ok(
        httpx.post(
            f"{server.http_url}/v2/models/clf/infer",
            json={
                "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["the lazy dog"]}],
                "outputs": [{"name": "logits"}],
            },
        )
    )
    raw = ok(call(server, "/predict", {"inputs": "the lazy dog", "raw_scores": True}))
    assert sorted(r["score"] for r in raw) == pytest.approx(sorted(v2["outputs"][0]["data"]), abs=1e-5)


def test_tokenize_gives_ids_offsets_and_special_flags(server: RunningServer, repository: Path) -> None:
    text = "The lazy dog sleeps."
    tokenizer = Tokenizer.from_file(str(repository / "tiny" / "1" / "tokenizer.json"))
    tokenizer.no_padding()
    expected = tokenizer.encode(text)
    (tokens,) = ok(httpx.post(f"{server.http_url}/tokenize?model=tiny", json={"inputs": text}))
    assert [t["id"] for t in tokens] == expected.ids
    assert [t["special"] for t in tokens] == [True] + [False] * (len(expected.ids) - 2) + [True]
    assert tokens[0]["start"] is None
    assert tokens[1] == {"id": expected.ids[1], "text": "The", "special": False, "start": 0, "stop": 3}
    plain = ok(call(server, "/tokenize", {"inputs": [text, "dog"], "add_special_tokens": False}, "tiny"))
    assert len(plain) == 2
    assert not any(t["special"] for t in plain[0])
    assert [t["id"] for t in plain[0]] == expected.ids[1:-1]


def test_info_describes_each_model(server: RunningServer) -> None:
    def info(model: str) -> Any:
        return ok(httpx.get(f"{server.http_url}/info", headers={"x-model": model}))

    assert info("tiny")["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info("clf")["model_type"]["classifier"]["id2label"] == {"0": "NEG", "1": "POS"}
    assert "reranker" in info("ranker")["model_type"]
    assert info("tiny")["max_input_length"] > 0


def test_openai_embeddings_refuse_a_reranker_and_a_classifier(server: RunningServer) -> None:
    for model, task in (("ranker", "text-ranking"), ("clf", "text-classification")):
        refused = httpx.post(f"{server.http_url}/v1/embeddings", json={"model": model, "input": "x"})
        assert refused.status_code == 400
        assert f"does not embed sentences: it answers {task} results" in refused.json()["error"]["message"]


# --- every bad input of every route ---------------------------------------------------------------------

BAD: list[tuple[str, str | None, Any, int, str]] = [
    ("/embed", None, {}, 422, "missing field 'inputs'"),
    ("/embed", None, {"inputs": []}, 422, "not empty"),
    ("/embed", None, {"inputs": [1, "a"]}, 422, "do not mix"),
    ("/embed", None, {"inputs": "x", "normalize": "yes"}, 422, "true or false"),
    ("/embed", None, {"inputs": "x", "truncation_direction": "Left"}, 422, "not supported"),
    ("/embed", None, {"inputs": "x", "truncation_direction": "Up"}, 422, "'Right' or 'Left'"),
    ("/embed", None, {"inputs": "x", "dimensions": 0}, 422, "positive integer"),
    ("/embed", None, {"inputs": "x", "dimensions": 33}, 422, "between 1 and"),
    ("/embed", None, {"inputs": "x", "prompt_name": "query"}, 422, "prompt_name"),
    ("/embed", None, {"inputs": "x", "colour": 1}, 422, "unknown field 'colour'"),
    ("/embed", None, {"inputs": [[10**7]]}, 422, "outside"),
    ("/embed", "nope", {"inputs": "x"}, 404, "nope"),
    ("/embed", "clf", {"inputs": "x"}, 422, "does not embed sentences"),
    ("/embed", "tiny:x", {"inputs": "x"}, 422, "label goes after '@'"),
    ("/rerank", None, {"texts": ["a"]}, 422, "missing field 'query'"),
    ("/rerank", None, {"query": 1, "texts": ["a"]}, 422, "'query' must be a string"),
    ("/rerank", None, {"query": "q", "texts": []}, 422, "non-empty list"),
    ("/rerank", None, {"query": "q", "texts": ["a", 2]}, 422, "non-empty list"),
    ("/rerank", None, {"query": "q", "texts": ["a"] * 2049}, 422, "at most 2048"),
    ("/rerank", None, {"query": "q", "texts": ["a"], "raw_scores": 1}, 422, "true or false"),
    ("/rerank", "tiny", {"query": "q", "texts": ["a"]}, 422, "needs a text-ranking model"),
    ("/rerank", None, {"query": "q" * 16384, "texts": ["a"] * 64}, 422, "one request may send"),  # query per text
    ("/predict", None, {"inputs": ["x" * 16384] * 65}, 422, "one request may send"),
    ("/predict", None, {"inputs": 5}, 422, "string or a non-empty list"),
    ("/predict", None, {"inputs": [["a", "b"]]}, 422, "pairs"),
    ("/predict", "ranker", {"inputs": "x"}, 422, "needs a text-classification model"),
    ("/tokenize", None, {"inputs": "x"}, 422, "several models could answer /tokenize"),
    ("/tokenize", "tiny", {"inputs": []}, 422, "non-empty list"),
    ("/tokenize", "tiny", {"inputs": "x", "add_special_tokens": "no"}, 422, "true or false"),
    ("/embed", None, [1], 422, "JSON object"),
]


@pytest.mark.parametrize(("path", "model", "body", "status", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_refused_in_tei_shape(
    server: RunningServer, path: str, model: str | None, body: Any, status: int, message: str
) -> None:
    refused = call(server, path, body, model)
    assert refused.status_code == status, refused.text
    error = refused.json()
    assert set(error) == {"error", "error_type"}
    assert message in error["error"]
    assert len(ok(call(server, "/embed", {"inputs": ["still serving"]}))[0]) == 32


def test_malformed_json_and_unknown_model_info(server: RunningServer) -> None:
    broken = httpx.post(
        f"{server.http_url}/embed", content=b'{"inputs": [', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    assert broken.json()["error_type"] == "validation"
    missing = httpx.get(f"{server.http_url}/info?model=nope")
    assert missing.status_code == 404
    assert missing.json()["error_type"] == "not_found"
    assert len(ok(call(server, "/embed", {"inputs": "still serving"}))) == 1
