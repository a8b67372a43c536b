"""Answers of one entry per (input, class) are bounded before they are built (outside attack rt27 F1).

TEI ``/predict`` and TF Serving ``:classify`` answer every class of every input with its score, and
``class_labels`` (V2) is one name per (input, class). One 1.5 KB request of 170 texts to a 20,000-class
classifier made a 183 MB ``/predict`` answer (``--max-response-bytes`` is 64 MiB) on the event loop,
+1 GB, probes held 2 to 4.6 s; ``:classify`` 128 MB; V2 ``class_labels`` 3.4 M BYTES elements (the cap is
1,048,576), +771 MB. TF Serving took any number of examples: 300,000 held a probe 1.4 s.

The classifiers here are real ONNX graphs whose logits depend on the text only through its length
(``sum(attention_mask) x w``) behind a word-level tokenizer, so a thousand classes cost nothing to run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import requests
from harness import CappedServer, serve_capped
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from watch import Watch

CAP = 4 * 1024**3
MANY = 20_000  # classes of the model an attacker picks
TEXTS = 170  # 1.5 KB of texts: 3.4 M entries
GROWTH_BOUND = 300 * 1024**2  # before: +1 GB for one /predict of 170 texts
FEW_LABELS = ["negative", 'a "quoted" \\ label', "café ✓"]


def _classifier(folder: Path, classes: int, labels: list[str] | None) -> None:
    """``logits = sum(attention_mask) x w`` (w from -1 to 1), a tokenizer and a text-classification spec."""
    folder.mkdir(parents=True)
    w = numpy_helper.from_array(np.linspace(-1, 1, classes, dtype=np.float32).reshape(1, classes), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["mask", "axes"], ["length"], keepdims=1),
            helper.make_node("MatMul", ["length", "w"], ["logits"]),
        ],
        "classifier",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [w, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    spec = {
        "task": "text-classification",
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["logits"],
        "max_length": 64,
        "labels": {str(i): name for i, name in enumerate(labels or [])},
        "score_function": "softmax",
    }
    (folder / "onnxserve.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    repository = tmp_path_factory.mktemp("classifiers")
    _classifier(repository / "many" / "1", MANY, None)
    _classifier(repository / "few" / "1", len(FEW_LABELS), FEW_LABELS)
    with serve_capped(repository, cap_bytes=CAP) as running:
        yield running


def _post(server: CappedServer, path: str, body: Any, model: str | None = None) -> requests.Response:
    headers = {"X-Model": model} if model else {}
    return requests.post(f"{server.http_url}{path}", json=body, headers=headers, timeout=300)


def _v2_labels(server: CappedServer, model: str, texts: list[str]) -> requests.Response:
    body = {
        "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}],
        "outputs": [{"name": "class_labels"}],
    }
    return _post(server, f"/v2/models/{model}/infer", body)


def _expected(texts: list[str], classes: int) -> np.ndarray:
    """The model's softmax probabilities, as float32, per text (its length in tokens decides them)."""
    w = np.linspace(-1, 1, classes, dtype=np.float32).reshape(1, classes)
    lengths = np.array([[len(t.split())] for t in texts], dtype=np.float32)
    logits = (lengths @ w).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_answers_of_one_entry_per_input_and_class_are_refused_before_they_are_built(server: CappedServer) -> None:
    texts = ["a"] * TEXTS
    rest = server.rss_bytes()
    with Watch(server) as prober:
        tei = _post(server, "/predict", {"inputs": texts}, "many")
        tfs = _post(server, "/v1/models/many:classify", {"examples": [{"text": t} for t in texts]})
        v2 = _v2_labels(server, "many", texts)
    assert tei.status_code == 400, tei.text[:300]
    assert f"({TEXTS} inputs x {MANY} classes)" in tei.json()["error"]
    assert "as TEI /predict JSON" in tei.json()["error"]
    assert "--max-response-bytes" in tei.json()["error"]
    assert tfs.status_code == 400, tfs.text[:300]
    assert f"({TEXTS} inputs x {MANY} classes)" in tfs.json()["error"]
    assert "as TF Serving :classify JSON" in tfs.json()["error"]
    assert v2.status_code == 400, v2.text[:300]
    error = v2.json()["error"]
    assert f"output 'class_labels' ({TEXTS} texts x {MANY} classes) would have {TEXTS * MANY} BYTES elements" in error
    assert "more than the 1048576 one answer may hold" in error
    assert server.alive(), server.log()[-3000:]
    assert not prober.failures, prober.failures
    assert prober.peak_rss - rest < GROWTH_BOUND, f"{(prober.peak_rss - rest) / 2**20:.0f} MB over rest"

    # Within the limits, the same model still answers every class.
    one = _post(server, "/predict", {"inputs": "a b"}, "many")
    assert one.status_code == 200, one.text[:300]
    entries = one.json()
    assert len(entries) == MANY
    assert entries[0]["label"] == f"LABEL_{MANY - 1}"  # w grows with the class: the last class is the best
    assert [e["score"] for e in entries] == sorted((e["score"] for e in entries), reverse=True)
    two = _v2_labels(server, "many", ["a", "b"])
    assert two.status_code == 200, two.text[:300]
    (labels,) = two.json()["outputs"]
    assert labels["shape"] == [2, MANY]
    assert labels["data"][:2] == ["LABEL_0", "LABEL_1"]
    assert labels["data"][MANY] == "LABEL_0"


def test_tf_serving_takes_as_many_texts_as_the_other_text_routes(server: CappedServer) -> None:
    examples = [{"text": "a"}] * 2049
    classify = _post(server, "/v1/models/few:classify", {"examples": examples})
    assert classify.status_code == 400, classify.text[:300]
    assert "2049 examples in one request to text model 'few'; send at most 2048" in classify.json()["error"]
    predict = _post(server, "/v1/models/few:predict", {"instances": ["a"] * 2049})
    assert predict.status_code == 400, predict.text[:300]
    assert "2049 instances in one request" in predict.json()["error"]
    columns = _post(server, "/v1/models/few:predict", {"inputs": {"text": ["a"] * 2049}})
    assert columns.status_code == 400, columns.text[:300]
    assert "2049 rows in input 'text'" in columns.json()["error"]
    assert _post(server, "/v1/models/few:classify", {"examples": examples[:2048]}).status_code == 200


def test_honest_answers_keep_their_format(server: CappedServer) -> None:
    texts = ["a", "a b b", "b a"]
    expected = _expected(texts, len(FEW_LABELS))

    tei = _post(server, "/predict", {"inputs": texts}, "few")
    assert tei.status_code == 200, tei.text[:300]
    for row, answer in zip(expected, tei.json(), strict=True):
        order = sorted(range(len(FEW_LABELS)), key=lambda i: -float(row[i]))
        assert answer == [{"score": float(row[i]), "label": FEW_LABELS[i]} for i in order]
    single = _post(server, "/predict", {"inputs": "a"}, "few")
    assert single.json() == tei.json()[0]

    tfs = _post(server, "/v1/models/few:classify", {"examples": [{"text": t} for t in texts]})
    assert tfs.status_code == 200, tfs.text[:300]
    assert tfs.json() == {
        "result": [[[name, float(score)] for name, score in zip(FEW_LABELS, row, strict=True)] for row in expected]
    }


def _runs(server: CappedServer, model: str) -> int:
    """The model's executions so far (Triton statistics)."""
    doc = requests.get(f"{server.http_url}/v2/models/{model}/stats", timeout=30).json()["model_stats"][0]
    return int(doc["execution_count"])


def test_answers_that_cannot_fit_whatever_the_scores_are_refused_before_the_model_runs(server: CappedServer) -> None:
    """800 one-character texts to a 20,000-class model ran 1.9 s, and 8 such requests at once took 1.1 GB,
    before each was refused (outside attack rt28 F3): rows x classes entries of at least their label and a
    three-byte score cannot fit 64 MiB, which is known before the run."""
    texts = ["a"] * 400  # at least 152 MB as TF Serving writes it, 186 MB as TEI does
    before = _runs(server, "many")
    tei = _post(server, "/predict", {"inputs": texts}, "many")
    tfs = _post(server, "/v1/models/many:classify", {"examples": [{"text": t} for t in texts]})
    for refused in (tei, tfs):
        assert refused.status_code == 400, refused.text[:300]
        error = refused.json()["error"]
        assert "the response would be more than 67108864 bytes encoded as" in error, error
        assert f"(400 inputs x {MANY} classes)" in error
    assert _runs(server, "many") == before  # before: two runs, then the refusals
    fits = _post(server, "/predict", {"inputs": ["a"] * 40}, "many")  # 800,000 entries: about 30 MB
    assert fits.status_code == 200, fits.text[:300]
    assert len(fits.json()) == 40
    assert _runs(server, "many") > before
