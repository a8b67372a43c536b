"""``onnxserve export hf`` on tiny random models built from configs (nothing is downloaded)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from transformers import BertModel, BertTokenizer

import tiny_text_models
from onnxserve.config import parse_config
from onnxserve.core.pipeline import PipelineSpec
from onnxserve.errors import ExportError
from onnxserve.server.lifecycle import RunningServer
from onnxserve.toolkit.export.huggingface import HfExportOptions, export_huggingface
from onnxserve.toolkit.validate import ValidationReport

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "onnx",
    "serves",
    "models",
    "fast",
    "and",
    "well",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 1-layer BERT with hidden size 32 and a small WordPiece vocabulary (one layer
    holds every op a deeper stack repeats; each of this module's six exports traces it op by op)."""
    return tiny_text_models.tiny_bert_folder(tmp_path_factory.mktemp("tiny-bert"), words=WORDS, layers=1)


@pytest.fixture(scope="module")
def mean_export(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ValidationReport]:
    """``tiny_bert`` exported for feature-extraction with mean pooling, once for the module: the tests
    that use it only read it (or copy it)."""
    output = tmp_path_factory.mktemp("mean") / "tiny" / "1"
    report = export_huggingface(tiny_bert, output, HfExportOptions(task="feature-extraction", pooling="mean"))
    return output, report


def no_partial_leftovers(parent: Path) -> bool:
    return not any(".partial-" in p.name or ".old-" in p.name for p in parent.iterdir())


def test_export_writes_a_self_describing_validated_folder(mean_export: tuple[Path, ValidationReport]) -> None:
    output, report = mean_export
    assert report.passed
    assert {"model.onnx", "tokenizer.json", "onnxserve.json", "validation.json"} <= {p.name for p in output.iterdir()}
    spec = PipelineSpec.read(output)
    assert spec is not None
    assert spec.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert spec.pooling == "mean"
    assert spec.normalize is False
    assert spec.max_length == 64
    saved = json.loads((output / "validation.json").read_text())
    assert saved["passed"] is True
    shapes = [c["input_shapes"]["input_ids"] for c in saved["cases"]]
    assert [1, 1] in shapes
    assert [3, 16] in shapes
    assert [3, 64] in shapes
    assert no_partial_leftovers(output.parent)


def test_served_export_matches_pytorch(tiny_bert: Path, tmp_path: Path, start_server: Any) -> None:
    export_huggingface(tiny_bert, tmp_path / "tiny" / "1", HfExportOptions(task="feature-extraction", pooling="cls"))
    server: RunningServer = start_server(
        parse_config({"model_config_list": [{"name": "tiny", "base_path": "tiny"}]}, "test", tmp_path)
    )
    tokenizer = BertTokenizer.from_pretrained(str(tiny_bert))
    encoded = tokenizer(["the quick brown fox", "onnx serves"], padding=True, return_tensors="np")
    body = {
        "inputs": [
            {
                "name": n,
                "datatype": "INT64",
                "shape": list(encoded[n].shape),
                "data": encoded[n].ravel().tolist(),
            }
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ],
        "outputs": [{"name": "sentence_embedding"}],
    }
    response = httpx.post(f"{server.http_url}/v2/models/tiny/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    served = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    model = BertModel.from_pretrained(str(tiny_bert)).eval()
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).last_hidden_state
    np.testing.assert_allclose(served, hidden[:, 0].numpy(), atol=1e-5)


def test_failed_validation_leaves_nothing_behind(tiny_bert: Path, tmp_path: Path) -> None:
    output = tmp_path / "tiny" / "1"
    # An impossible tolerance injects a mismatch: real float differences between runtimes exceed it.
    options = HfExportOptions(task="feature-extraction", pooling="mean", atol=-1.0)
    with pytest.raises(ExportError, match="does not match the original") as caught:
        export_huggingface(tiny_bert, output, options)
    assert "nothing was written" in caught.value.message
    assert not output.exists()
    assert no_partial_leftovers(output.parent)


def test_failed_replacement_keeps_the_previous_version(
    tiny_bert: Path, tmp_path: Path, mean_export: tuple[Path, ValidationReport]
) -> None:
    output = tmp_path / "tiny" / "1"
    shutil.copytree(mean_export[0], output)  # the previous version: a complete, validated export
    before = (output / "model.onnx").read_bytes()
    with pytest.raises(ExportError):
        export_huggingface(
            tiny_bert,
            output,
            HfExportOptions(task="feature-extraction", pooling="cls", force=True, atol=-1.0),
        )
    assert (output / "model.onnx").read_bytes() == before
    assert PipelineSpec.read(output).pooling == "mean"  # type: ignore[union-attr]
    assert no_partial_leftovers(output.parent)


def test_existing_output_needs_force(tiny_bert: Path, tmp_path: Path) -> None:
    output = tmp_path / "v1"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_huggingface(tiny_bert, output, HfExportOptions(task="feature-extraction"))
    assert (output / "keep.txt").read_text() == "mine"
    export_huggingface(tiny_bert, output, HfExportOptions(task="feature-extraction", force=True))
    assert (output / "model.onnx").is_file()
    assert not (output / "keep.txt").exists()


def test_unknown_task_lists_supported_ones(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unsupported task 'translation'; supported tasks: feature-extraction"):
        export_huggingface(tiny_bert, tmp_path / "out", HfExportOptions(task="translation"))
    assert not (tmp_path / "out").exists()


def test_folder_without_tokenizer_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_bert / "config.json").read_text())
    with pytest.raises(ExportError, match="has no tokenizer"):
        export_huggingface(bare, tmp_path / "out", HfExportOptions(task="feature-extraction"))


def test_cli_export_failure_exits_nonzero_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxserve.cli",
            "export",
            "hf",
            str(tmp_path),
            "--task",
            "feature-extraction",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "is not a Hugging Face model folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_hub_id_that_cannot_be_fetched_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so that "onnxserve-tests/no-such-model" is no local folder
    with pytest.raises(ExportError, match="cannot be fetched from the Hugging Face hub"):
        export_huggingface(
            "onnxserve-tests/no-such-model", tmp_path / "out", HfExportOptions(task="feature-extraction")
        )
    assert not (tmp_path / "out").exists()


def test_export_to_a_file_name_writes_one_self_contained_file_served_as_text(
    tiny_bert: Path, tmp_path: Path, start_server: Any
) -> None:
    """``--output X.onnx``: one file with its weights inlined and the tokenizer and spec in its metadata;
    served alone (base_path at the file, nothing beside it) it takes text."""
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from onnxserve.core.pipeline import PIPELINE_METADATA, TOKENIZER_METADATA

    output = tmp_path / "alone" / "minilm.onnx"
    report = export_huggingface(tiny_bert, output, HfExportOptions(task="feature-extraction", pooling="mean"))
    assert report.passed
    assert [p.name for p in output.parent.iterdir()] == ["minilm.onnx"]  # nothing beside it, nothing left over
    assert output.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    metadata = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    assert PipelineSpec.parse(metadata[PIPELINE_METADATA], "test").task == "feature-extraction"

    config = parse_config({"model_config_list": [{"name": "m", "base_path": str(output)}]}, "test", tmp_path)
    server = start_server(config)
    sentences = ["the quick brown fox", "onnx serves models fast and well"]
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": sentences}]}
    response = httpx.post(f"{server.http_url}/v2/models/m/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    served = {o["name"]: np.array(o["data"], dtype=np.float32).reshape(o["shape"]) for o in response.json()["outputs"]}

    tokenizer = Tokenizer.from_str(metadata[TOKENIZER_METADATA])
    tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(sentences)
    session = ort.InferenceSession(str(output))
    available = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    feeds = {i.name: available[i.name] for i in session.get_inputs()}
    expected = session.run(["sentence_embedding"], feeds)[0]
    np.testing.assert_allclose(served["embedding"], expected, atol=1e-5)

    from onnxserve import Pipeline

    np.testing.assert_allclose(Pipeline(output)(sentences), expected, atol=1e-5)  # local inference reads it too


def test_export_to_a_file_refuses_what_cannot_fit_in_one_file(tmp_path: Path) -> None:
    """Over 2 GB of weights cannot be one protocol buffer: refused, saying to export to a folder."""
    from onnxserve.toolkit.export.single_file import write_single_file

    folder = tmp_path / "version"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    with (folder / "model.onnx.data").open("wb") as data:  # sparse: takes no disk space
        data.truncate(2**31 + 1)
    with pytest.raises(ExportError) as caught:
        write_single_file(folder, tmp_path / "big.onnx")
    assert "more than one ONNX file can hold" in caught.value.message
    assert "export to a folder instead" in caught.value.message
    assert not (tmp_path / "big.onnx").exists()


def current_umask() -> int:
    import os

    umask = os.umask(0)
    os.umask(umask)
    return umask
