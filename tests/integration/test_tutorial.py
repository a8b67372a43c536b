"""The old "ONNX Runtime Inference Server" tutorial, end to end, as its users run it.

A BERT model exported with plain ``torch.onnx.export`` (the line that works on current torch: a
tuple around the dict of inputs, which gives fixed ``[1, N]`` inputs and ``model.onnx`` +
``model.onnx.data``), copied to ``models/huggingface_model.onnx`` with its ``tokenizer.json`` beside,
the tutorial's ``model_config_list`` JSON (``base_path`` at the file and at the folder),
``ONNX_SERVER_CONFIG``, ``onnxserve serve`` with no flags, and the tutorial's client code verbatim:
its answer must be the model's own output, run directly in ONNX Runtime on the tokenized sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import requests

import tiny_text_models
from served_process import ServedProcess

SENTENCE = "This is a test sentence."


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tutorial's export, done in a separate folder as a user would (the file + its .data)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("tutorial-export")
    source = tiny_text_models.tiny_bert_folder(work / "bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    model = transformers.BertModel.from_pretrained(str(source)).eval()
    inputs = tokenizer(SENTENCE, return_tensors="pt")
    out = work / "out"
    out.mkdir()
    # The tutorial passes the dict itself (``torch.onnx.export(model, inputs, ...)``), which fails
    # on torch 2.13 with KeyError: -1; a tuple around it passes the dict as keyword arguments.
    with warnings.catch_warnings():  # torch's exporter warns about its own internals
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dict(inputs),), str(out / "huggingface_model.onnx"))
    tokenizer.save_pretrained(str(out))
    assert (out / "tokenizer.json").is_file()
    return out


def install(exported: Path, root: Path) -> Path:
    """Copy the model (and its external data) and tokenizer.json into ``root/models``."""
    models = root / "models"
    models.mkdir(parents=True)
    for item in exported.iterdir():
        if item.name.startswith("huggingface_model.onnx") or item.name == "tokenizer.json":
            shutil.copy(item, models / item.name)
    return models


def tutorial_config(path: Path, base_path: str) -> None:
    document = {
        "model_config_list": [
            {
                "name": "huggingface_model",
                "base_path": base_path,
                "model_platform": "onnxruntime",
                "max_batch_size": 32,
            }
        ]
    }
    path.write_text(json.dumps(document))


def start_like_the_tutorial(config: Path) -> ServedProcess:
    """``onnxserve serve`` with no flags: the config comes from ONNX_SERVER_CONFIG. The ports come from
    ONNXSERVE_HTTP_PORT / ONNXSERVE_GRPC_PORT (0: any free one), as tests must not take 8000."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONNXSERVE_")}
    env.update({"ONNX_SERVER_CONFIG": str(config), "ONNXSERVE_HTTP_PORT": "0", "ONNXSERVE_GRPC_PORT": "0"})
    return ServedProcess([sys.executable, "-m", "onnxserve.cli", "serve"], env)


@pytest.fixture(scope="module", params=["file", "folder"])
def served(request: pytest.FixtureRequest, exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp(f"tutorial-{request.param}")
    install(exported, root)
    base_path = "models/huggingface_model.onnx" if request.param == "file" else "models"
    tutorial_config(root / "config.json", base_path)
    server = start_like_the_tutorial(root / "config.json")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def direct(exported: Path, texts: list[str]) -> list[npt.NDArray[Any]]:
    """The model's first output, run directly in ONNX Runtime on each tokenized text (padded and
    truncated to the graph's fixed length, as the tokenizer would do it)."""
    from tokenizers import Tokenizer

    session = ort.InferenceSession(str(exported / "huggingface_model.onnx"))
    length = session.get_inputs()[0].shape[1]
    assert isinstance(length, int), "the tutorial's export has a fixed sequence length"
    tokenizer = Tokenizer.from_file(str(exported / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=0)
    results = []
    for text in texts:
        encoding = tokenizer.encode(text)
        available = {
            "input_ids": np.array([encoding.ids], dtype=np.int64),
            "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
        }
        feeds = {i.name: available[i.name] for i in session.get_inputs()}
        results.append(session.run(None, feeds)[0][0])
    return results


def test_the_tutorial_client_verbatim(served: str, exported: Path) -> None:
    # The tutorial's client, as written there (only the host and port differ):
    url = f"{served}/v1/models/huggingface_model:predict"
    data = {"inputs": {"input_ids": ["This is a test sentence."]}}
    response = requests.post(url, json=data)
    outputs = json.loads(response.content)["outputs"][0]

    np.testing.assert_allclose(np.array(outputs, dtype=np.float32), direct(exported, [SENTENCE])[0], atol=1e-5)


def test_several_texts_and_truncation_are_reported(served: str, exported: Path) -> None:
    long = " ".join(["this is a test sentence"] * 5)
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [SENTENCE, long]}]}
    response = requests.post(f"{served}/v2/models/huggingface_model/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["parameters"]["truncated"] == 1
    output = document["outputs"][0]
    got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    expected = direct(exported, [SENTENCE, long])
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-5)


def test_an_unknown_input_lists_the_text_input(served: str) -> None:
    body = {"inputs": [{"name": "sentence", "shape": [1], "datatype": "BYTES", "data": [SENTENCE]}]}
    response = requests.post(f"{served}/v2/models/huggingface_model/infer", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'input_ids'" in error
    assert "'text' (BYTES [-1])" in error
    tf = requests.post(
        f"{served}/v1/models/huggingface_model:predict", json={"inputs": {"sentence": [[1, 2]]}}, timeout=60
    )
    assert tf.status_code == 400
    assert "'input_ids'" in tf.json()["error"]
    assert tf.json()["error"] == error  # one message on every protocol
    assert requests.get(f"{served}/v2/health/ready", timeout=10).status_code == 200


def test_without_a_tokenizer_a_string_is_refused_with_both_fixes(exported: Path, tmp_path: Path) -> None:
    models = install(exported, tmp_path)
    (models / "tokenizer.json").unlink()
    tutorial_config(tmp_path / "config.json", "models/huggingface_model.onnx")
    server = start_like_the_tutorial(tmp_path / "config.json")
    try:
        url = server.wait_ready()
        tf = requests.post(
            f"{url}/v1/models/huggingface_model:predict",
            json={"inputs": {"input_ids": [SENTENCE]}},
            timeout=60,
        )
        v2 = requests.post(
            f"{url}/v2/models/huggingface_model/infer",
            json={"inputs": [{"name": "input_ids", "shape": [1, 1], "datatype": "BYTES", "data": [SENTENCE]}]},
            timeout=60,
        )
        for response in (tf, v2):
            assert response.status_code == 400
            error = response.json()["error"]
            assert "expects INT64" in error
            assert "tokenizer.json beside the model" in error
            assert "onnxserve export hf" in error
        assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        server.stop()


def test_a_hugging_face_tokenizer_folder_without_tokenizer_json(exported: Path, tmp_path: Path) -> None:
    """vocab.txt + tokenizer_config.json (a slow tokenizer's files) beside the model: converted by
    transformers, the model takes text just the same."""
    models = install(exported, tmp_path)
    (models / "tokenizer.json").unlink()
    source = exported.parent / "bert"
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, models / name)
    tutorial_config(tmp_path / "config.json", "models")
    server = start_like_the_tutorial(tmp_path / "config.json")
    try:
        url = server.wait_ready()
        response = requests.post(
            f"{url}/v1/models/huggingface_model:predict", json={"inputs": {"input_ids": [SENTENCE]}}, timeout=60
        )
        assert response.status_code == 200, response.text
        got = np.array(json.loads(response.content)["outputs"][0], dtype=np.float32)
        np.testing.assert_allclose(got, direct(exported, [SENTENCE])[0], atol=1e-5)
    finally:
        server.stop()
