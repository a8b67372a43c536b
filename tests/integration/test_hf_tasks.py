"""Every Hugging Face task on tiny random BERT, DistilBERT and RoBERTa models built from configs (nothing
is downloaded): the export and its validation, ``onnxserve.Pipeline`` against transformers and PyTorch,
the server over V2 and TF Serving REST, and ``onnxserve predict``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch
import transformers
import tritonclient.grpc as grpcclient
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertTokenizer,
    DistilBertConfig,
    DistilBertTokenizer,
    GPT2Config,
    GPT2Model,
    GPT2Tokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaTokenizer,
)
from tritonclient.utils import InferenceServerException

from onnxserve import Pipeline
from onnxserve.config import ServerConfig, parse_config
from onnxserve.core.pipeline import TASK_OUTPUTS, PipelineSpec, TextBatch
from onnxserve.core.service import INLINE_TOKENIZE_CHARACTERS
from onnxserve.errors import ExportError
from onnxserve.server.lifecycle import RunningServer
from onnxserve.toolkit.export.huggingface import ARCHITECTURES, TASKS, HfExportOptions, export_huggingface
from onnxserve.toolkit.validate import ValidationReport

StartServer = Callable[[ServerConfig], RunningServer]

ONNXSERVE = [sys.executable, "-m", "onnxserve.cli"]

WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"),
    *("onnx", "runtime", "serves", "this", "model", "models", "fast", "and", "well"),
    *("alice", "met", "bob", "in", "paris", "who", "where", "did", "a", "sentence", "maps", "text", "to"),
    *(".", "?", ","),
]
BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime serves this model, fast and well.",
    "Alice met Bob in Paris.",
    "Who did Alice meet? Where did they meet?",
    "A sentence embedding maps text to a vector.",
]
MAX_LENGTH = 64
"""Every tiny model takes up to this many tokens (RoBERTa's position table is 2 longer, see below)."""
INIT_RANGE = 0.3
"""Wider than the default 0.02, so that random heads decide by clear margins (no near-ties to flip)."""

SEQUENCE_LABELS = {0: "NEG", 1: "POS"}
TOKEN_LABELS = {0: "O", 1: "B-PER", 2: "I-PER"}
AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
}
EXPORTS = [
    *(("bert", task) for task in AUTO_CLASSES),
    ("distilbert", "feature-extraction"),
    ("distilbert", "text-classification"),
    ("roberta", "feature-extraction"),
    ("roberta", "text-classification"),
]
EXPECTED_INPUTS = {
    "bert": ["input_ids", "attention_mask", "token_type_ids"],
    "distilbert": ["input_ids", "attention_mask"],  # DistilBERT has no segment embeddings
    "roberta": ["input_ids", "attention_mask"],  # RoBERTa's tokenizer does not produce token_type_ids
}

TEXTS = [
    "alice met bob in paris.",
    "the quick brown fox jumps over the lazy dog.",
    "onnx runtime serves models fast and well",
    "who?",
]
QUESTIONS = ["who did alice meet?", "where did alice meet bob?"]
CONTEXTS = [
    "alice met bob in paris. the quick brown fox jumps over the lazy dog.",
    "in paris, alice met bob and the fox.",
]
ANSWER_TOKENS = 15
"""The longest answer span considered: Hugging Face's default ``max_answer_len``."""


def name_of(arch: str, task: str) -> str:
    return f"{arch}-{task}"


# --- tiny models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wordpiece_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def known_words(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, after checking it really loaded the vocabulary (no unknown tokens in TEXTS)."""
    ids = tokenizer(TEXTS)["input_ids"]
    assert tokenizer.unk_token_id not in [i for row in ids for i in row]
    return tokenizer


@pytest.fixture(scope="module")
def bert_tokenizer(wordpiece_vocab: Path) -> PreTrainedTokenizerBase:
    # transformers 5 takes the vocabulary as ``vocab=``: a ``vocab_file=`` keyword is silently ignored
    # there and leaves a 5-token vocabulary in which every word is [UNK].
    return known_words(BertTokenizer(vocab=str(wordpiece_vocab)))


@pytest.fixture(scope="module")
def distilbert_tokenizer(wordpiece_vocab: Path) -> PreTrainedTokenizerBase:
    return known_words(DistilBertTokenizer(vocab=str(wordpiece_vocab)))


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A byte-level BPE vocabulary (vocab.json, merges.txt) trained here on a few sentences."""
    folder = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        BPE_CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(folder))
    return folder / "vocab.json", folder / "merges.txt"


@pytest.fixture(scope="module")
def roberta_tokenizer(bpe_files: tuple[Path, Path]) -> PreTrainedTokenizerBase:
    vocab, merges = bpe_files
    # As roberta-base's tokenizer does, say how many tokens the model takes.
    tokenizer = RobertaTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=MAX_LENGTH)
    assert len(tokenizer) == len(json.loads(vocab.read_text()))  # the trained vocabulary, not a default one
    return known_words(tokenizer)


def model_config(arch: str, tokenizer: PreTrainedTokenizerBase, task: str) -> PretrainedConfig:
    """One encoder layer (each of the nine exports is traced op by op: about a quarter less work than with
    two, and one layer holds every kind of op a deeper stack repeats), except fill-mask's two: that seeded
    model proposes a special token among its top 5, the case ``test_fill_mask_token_strings...`` checks."""
    depth = 2 if task == "fill-mask" else 1
    labels = {"text-classification": SEQUENCE_LABELS, "token-classification": TOKEN_LABELS}.get(task)
    heads: dict[str, Any] = {}
    if labels is not None:
        heads = {"num_labels": len(labels), "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    size = {"vocab_size": len(tokenizer), "initializer_range": INIT_RANGE, **heads}
    if arch == "distilbert":
        return DistilBertConfig(
            dim=32, n_layers=depth, n_heads=2, hidden_dim=64, max_position_embeddings=MAX_LENGTH, **size
        )
    layers: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": depth,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    if arch == "roberta":
        # Positions start after the padding index: MAX_LENGTH tokens need MAX_LENGTH + 2 positions.
        return RobertaConfig(
            **layers, max_position_embeddings=MAX_LENGTH + 2, pad_token_id=tokenizer.pad_token_id, **size
        )
    return BertConfig(**layers, max_position_embeddings=MAX_LENGTH, **size)


def save_source(folder: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, auto_class: str) -> Path:
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    getattr(transformers, auto_class).from_config(config).eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@dataclass(frozen=True)
class Exported:
    """The Hugging Face source folders, the repository their exports went to, and the reports."""

    sources: dict[str, Path]
    repository: Path
    reports: dict[str, ValidationReport]

    def folder(self, arch: str, task: str) -> Path:
        return self.repository / name_of(arch, task) / "1"


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
    bert_tokenizer: PreTrainedTokenizerBase,
    distilbert_tokenizer: PreTrainedTokenizerBase,
    roberta_tokenizer: PreTrainedTokenizerBase,
) -> Exported:
    """Every task on BERT, and feature-extraction and text-classification on DistilBERT and RoBERTa, exported
    once for the whole module into one model repository (``<arch>-<task>/1``)."""
    tokenizers = {"bert": bert_tokenizer, "distilbert": distilbert_tokenizer, "roberta": roberta_tokenizer}
    hf = tmp_path_factory.mktemp("hf")
    repository = tmp_path_factory.mktemp("repository")
    sources: dict[str, Path] = {}
    reports: dict[str, ValidationReport] = {}
    for arch, task in EXPORTS:
        name = name_of(arch, task)
        config = model_config(arch, tokenizers[arch], task)
        sources[name] = save_source(hf / name, config, tokenizers[arch], AUTO_CLASSES[task])
        pooling = "mean" if task == "feature-extraction" else None
        reports[name] = export_huggingface(
            sources[name], repository / name / "1", HfExportOptions(task=task, pooling=pooling)
        )
    return Exported(sources, repository, reports)


def torch_model(exported: Exported, arch: str, task: str) -> Any:
    return getattr(transformers, AUTO_CLASSES[task]).from_pretrained(str(exported.sources[name_of(arch, task)])).eval()


def source_tokenizer(exported: Exported, arch: str, task: str) -> PreTrainedTokenizerBase:
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(str(exported.sources[name_of(arch, task)]))
    return tokenizer


# --- the export ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "task"), EXPORTS, ids=[name_of(*e) for e in EXPORTS])
def test_export_is_validated_and_self_describing(exported: Exported, arch: str, task: str) -> None:
    folder = exported.folder(arch, task)
    source_config = json.loads((exported.sources[name_of(arch, task)] / "config.json").read_text())
    assert source_config["model_type"] == arch

    spec = PipelineSpec.read(folder)
    assert spec is not None
    assert spec.task == task
    assert spec.inputs == EXPECTED_INPUTS[arch]
    assert [i.name for i in onnx.load(str(folder / "model.onnx")).graph.input] == spec.inputs
    expected_outputs = [*TASKS[task][1], *(["sentence_embedding"] if task == "feature-extraction" else [])]
    assert spec.outputs == expected_outputs
    assert [o.name for o in onnx.load(str(folder / "model.onnx")).graph.output] == expected_outputs
    usable = source_config["max_position_embeddings"] - (source_config["pad_token_id"] + 1 if arch == "roberta" else 0)
    assert spec.max_length == usable == MAX_LENGTH
    if task.endswith("classification"):
        assert spec.labels == {int(k): v for k, v in source_config["id2label"].items()}
    else:
        assert spec.labels == {}
    assert spec.mask_token == (source_tokenizer(exported, arch, task).mask_token if task == "fill-mask" else None)
    assert spec.pooling == ("mean" if task == "feature-extraction" else "none")

    report = exported.reports[name_of(arch, task)]
    saved = json.loads((folder / "validation.json").read_text())
    assert report.passed
    assert saved["passed"] is True
    assert saved["cases"]
    for case in saved["cases"]:
        assert case["passed"] is True
        assert set(case["max_abs_diff"]) == set(expected_outputs)
        assert max(case["max_abs_diff"].values()) <= saved["atol"]
        if task == "feature-extraction":
            assert case["agreement"] == {}
            assert case["min_cosine"]["sentence_embedding"] >= saved["min_cosine"]
        else:
            assert set(case["agreement"]) == set(TASKS[task][1])
            assert min(case["agreement"].values()) >= saved["min_agreement"]


# --- onnxserve.Pipeline against transformers and PyTorch -----------------------------------------


def hf_pipeline(exported: Exported, arch: str, task: str) -> Any:
    """transformers' own pipeline for the task, on the PyTorch original."""
    make: Any = transformers.pipeline
    return make(task, model=torch_model(exported, arch, task), tokenizer=source_tokenizer(exported, arch, task))


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
def test_text_classification_matches_transformers(exported: Exported, arch: str) -> None:
    ours = Pipeline(exported.folder(arch, "text-classification"))(TEXTS)
    theirs = hf_pipeline(exported, arch, "text-classification")(TEXTS)
    assert len(ours) == len(theirs) == len(TEXTS)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine["label"] == reference["label"]
        assert mine["label"] in SEQUENCE_LABELS.values()
        assert mine["score"] == pytest.approx(reference["score"], abs=1e-4)
    single = Pipeline(exported.folder(arch, "text-classification"))(TEXTS[0])
    assert single["label"] == ours[0]["label"]


def test_token_classification_matches_transformers(exported: Exported) -> None:
    ours = Pipeline(exported.folder("bert", "token-classification"))(TEXTS)
    theirs = hf_pipeline(exported, "bert", "token-classification")(TEXTS)  # aggregation "none", the default
    assert len(ours) == len(theirs) == len(TEXTS)
    assert any(ours), "the random model labels no token as an entity; the comparison would prove nothing"
    for mine, reference in zip(ours, theirs, strict=True):
        assert len(mine) == len(reference)
        for entity, expected in zip(mine, reference, strict=True):
            for key in ("entity", "index", "start", "end", "word"):
                assert entity[key] == expected[key], key
            assert entity["score"] == pytest.approx(float(expected["score"]), abs=1e-4)


def torch_answer(model: Any, tokenizer: PreTrainedTokenizerBase, question: str, context: str) -> dict[str, Any]:
    """The best span by brute force over the PyTorch model's logits: start <= end < start + ANSWER_TOKENS
    within the context, maximizing start_logit + end_logit; its score is p(start) * p(end), each a softmax
    over the context's tokens."""
    encoded = tokenizer(question, context, truncation="only_second", max_length=MAX_LENGTH, return_offsets_mapping=True)
    offsets = encoded.pop("offset_mapping")
    in_context = [i for i, s in enumerate(encoded.sequence_ids()) if s == 1]
    with torch.no_grad():
        out = model(**{k: torch.tensor([v]) for k, v in encoded.items()})
    start = out.start_logits[0, in_context].double()
    end = out.end_logits[0, in_context].double()
    pairs = [(s, e) for s in range(len(in_context)) for e in range(s, min(s + ANSWER_TOKENS, len(in_context)))]
    s, e = max(pairs, key=lambda p: float(start[p[0]] + end[p[1]]))
    score = float(torch.softmax(start, 0)[s] * torch.softmax(end, 0)[e])
    char_start, char_end = offsets[in_context[s]][0], offsets[in_context[e]][1]
    return {"score": score, "start": char_start, "end": char_end, "answer": context[char_start:char_end]}


def test_question_answering_matches_pytorch(exported: Exported) -> None:
    # transformers 5 no longer ships a question-answering pipeline, so the reference is computed here from
    # the PyTorch model's logits (the same span search that pipeline did, max_answer_len 15). Its score was
    # normalized over the context plus [CLS] (kept for the "no answer" option); onnxserve, with no such
    # option, normalizes over the context alone, and so does this reference.
    ours = Pipeline(exported.folder("bert", "question-answering"))(QUESTIONS, context=CONTEXTS)
    model = torch_model(exported, "bert", "question-answering")
    tokenizer = source_tokenizer(exported, "bert", "question-answering")
    assert len(ours) == len(QUESTIONS)
    for mine, question, context in zip(ours, QUESTIONS, CONTEXTS, strict=True):
        reference = torch_answer(model, tokenizer, question, context)
        assert (mine["answer"], mine["start"], mine["end"]) == (
            reference["answer"],
            reference["start"],
            reference["end"],
        )
        assert mine["answer"]
        assert mine["score"] == pytest.approx(reference["score"], abs=1e-4)
    single = Pipeline(exported.folder("bert", "question-answering"))(QUESTIONS[0], context=CONTEXTS[0])
    assert single == ours[0]


def test_fill_mask_matches_transformers(exported: Exported) -> None:
    mask = source_tokenizer(exported, "bert", "fill-mask").mask_token
    texts = [f"alice met {mask} in paris.", f"the quick brown {mask} jumps over the lazy dog."]
    ours = Pipeline(exported.folder("bert", "fill-mask"))(texts)
    theirs = hf_pipeline(exported, "bert", "fill-mask")(texts)  # top_k 5, the default
    assert len(ours) == len(theirs) == len(texts)
    for mine, reference in zip(ours, theirs, strict=True):
        assert len(mine) == len(reference) == 5
        assert [c["token"] for c in mine] == [c["token"] for c in reference]
        assert [c["score"] for c in mine] == pytest.approx([c["score"] for c in reference], abs=1e-4)
        assert [c["sequence"] for c in mine] == [c["sequence"] for c in reference]


def test_fill_mask_token_strings_match_transformers(exported: Exported) -> None:
    tokenizer = source_tokenizer(exported, "bert", "fill-mask")
    texts = [f"alice met {tokenizer.mask_token} in paris."]
    ours = Pipeline(exported.folder("bert", "fill-mask"))(texts)
    theirs = hf_pipeline(exported, "bert", "fill-mask")(texts)
    # This seeded model proposes a special token ([UNK]) among its top 5: the case worth checking.
    assert set(tokenizer.all_special_ids) & {c["token"] for c in theirs}
    assert [c["token"] for c in ours[0]] == [c["token"] for c in theirs]
    assert [c["token_str"] for c in ours[0]] == [c["token_str"] for c in theirs]


def torch_mean_pooling(model: Any, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> npt.NDArray[np.float32]:
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled: npt.NDArray[np.float32] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return pooled


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
def test_mean_pooled_embeddings_match_pytorch(exported: Exported, arch: str) -> None:
    ours = Pipeline(exported.folder(arch, "feature-extraction"))(TEXTS)
    reference = torch_mean_pooling(
        torch_model(exported, arch, "feature-extraction"), source_tokenizer(exported, arch, "feature-extraction"), TEXTS
    )
    assert ours.shape == reference.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


# --- the server ----------------------------------------------------------------------------------


def serve(start_server: StartServer, exported: Exported, *names: str) -> RunningServer:
    document = {"model_config_list": [{"name": n, "base_path": n, "max_batch_size": 8} for n in names]}
    return start_server(parse_config(document, "test", exported.repository))


def text_inputs(**inputs: list[str]) -> list[dict[str, Any]]:
    return [{"name": k, "datatype": "BYTES", "shape": [len(v)], "data": v} for k, v in inputs.items()]


def infer(server: RunningServer, model: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.http_url}/v2/models/{model}/infer", json=body, timeout=60)


def outputs_of(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def array(output: dict[str, Any]) -> npt.NDArray[Any]:
    return np.array(output["data"]).reshape(output["shape"])


def test_served_text_classification(exported: Exported, start_server: StartServer) -> None:
    name = name_of("bert", "text-classification")
    server = serve(start_server, exported, name)
    local = Pipeline(exported.folder("bert", "text-classification"))
    expected, _ = local.run(TextBatch(TEXTS))
    outputs = outputs_of(infer(server, name, {"inputs": text_inputs(text=TEXTS)}))
    assert list(outputs) == list(TASK_OUTPUTS["text-classification"])
    assert (outputs["label"]["datatype"], outputs["label"]["shape"]) == ("BYTES", [len(TEXTS)])
    assert outputs["label"]["data"] == [label["label"] for label in local(TEXTS)]
    assert outputs["score"]["datatype"] == "FP32"
    np.testing.assert_allclose(array(outputs["score"]), expected["score"], atol=1e-6)
    assert outputs["logits"]["shape"] == [len(TEXTS), len(SEQUENCE_LABELS)]
    np.testing.assert_allclose(array(outputs["logits"]), expected["logits"], atol=1e-6)


def test_served_question_answering(exported: Exported, start_server: StartServer) -> None:
    name = name_of("bert", "question-answering")
    server = serve(start_server, exported, name)
    local = Pipeline(exported.folder("bert", "question-answering"))(QUESTIONS, context=CONTEXTS)
    outputs = outputs_of(infer(server, name, {"inputs": text_inputs(question=QUESTIONS, context=CONTEXTS)}))
    assert list(outputs) == list(TASK_OUTPUTS["question-answering"])
    assert outputs["answer"]["datatype"] == "BYTES"
    assert outputs["answer"]["data"] == [r["answer"] for r in local]
    assert outputs["start"]["data"] == [r["start"] for r in local]
    assert outputs["end"]["data"] == [r["end"] for r in local]
    np.testing.assert_allclose(outputs["score"]["data"], [r["score"] for r in local], atol=1e-6)


@pytest.mark.parametrize("length", [MAX_LENGTH * 4, MAX_LENGTH * 300])
def test_a_question_too_long_for_the_model_is_refused_and_serving_goes_on(
    exported: Exported, start_server: StartServer, length: int
) -> None:
    """Only the context is truncated: a question that alone takes the max length cannot fit (an outside
    attack got a 500 and an ERROR traceback for each); 400 / INVALID_ARGUMENT naming the question."""
    name = name_of("bert", "question-answering")
    server = serve(start_server, exported, name)
    body = {"inputs": text_inputs(question=["!" * length], context=["ok"])}
    for response in (
        infer(server, name, body),
        httpx.post(
            f"{server.http_url}/v1/models/{name}:predict",
            json={"instances": [{"question": "!" * length, "context": "ok"}]},
            timeout=60,
        ),
    ):
        assert response.status_code == 400, response.text
        assert "too long for this model" in response.text
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        tensors = []
        for key in ("question", "context"):
            tensor = grpcclient.InferInput(key, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([("!" * length if key == "question" else "ok").encode()], dtype=object))
            tensors.append(tensor)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(name, tensors)
        assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "too long for this model" in str(refused.value.message())
    finally:
        client.close()
    outputs = outputs_of(infer(server, name, {"inputs": text_inputs(question=QUESTIONS, context=CONTEXTS)}))
    assert len(outputs["answer"]["data"]) == len(QUESTIONS)


def test_served_fill_mask(exported: Exported, start_server: StartServer) -> None:
    name = name_of("bert", "fill-mask")
    server = serve(start_server, exported, name)
    mask = PipelineSpec.read(exported.folder("bert", "fill-mask")).mask_token  # type: ignore[union-attr]
    texts = [f"alice met {mask} in paris.", f"{mask} did alice meet?"]
    local = Pipeline(exported.folder("bert", "fill-mask"))(texts)
    body = {"inputs": text_inputs(text=texts), "outputs": [{"name": "token_str"}, {"name": "score"}]}
    outputs = outputs_of(infer(server, name, body))
    assert list(outputs) == ["token_str", "score"]
    assert (outputs["token_str"]["datatype"], outputs["token_str"]["shape"]) == ("BYTES", [len(texts), 5])
    assert array(outputs["token_str"]).tolist() == [[c["token_str"] for c in row] for row in local]
    np.testing.assert_allclose(array(outputs["score"]), [[c["score"] for c in row] for row in local], atol=1e-6)


def test_served_token_classification(exported: Exported, start_server: StartServer) -> None:
    name = name_of("bert", "token-classification")
    server = serve(start_server, exported, name)
    local = Pipeline(exported.folder("bert", "token-classification"))(TEXTS)
    outputs = outputs_of(infer(server, name, {"inputs": text_inputs(text=TEXTS)}))
    assert (outputs["entities"]["datatype"], outputs["entities"]["shape"]) == ("BYTES", [len(TEXTS)])
    served = [json.loads(row) for row in outputs["entities"]["data"]]
    assert len(served) == len(local)
    for got, want in zip(served, local, strict=True):
        assert [{k: v for k, v in e.items() if k != "score"} for e in got] == [
            {k: v for k, v in e.items() if k != "score"} for e in want
        ]
        assert [e["score"] for e in got] == pytest.approx([e["score"] for e in want], abs=1e-6)


def test_served_tasks_of_long_requests_read_their_kept_tokens(exported: Exported, start_server: StartServer) -> None:
    """Requests over ``INLINE_TOKENIZE_CHARACTERS`` are tokenized off the event loop and keep only their kept
    tokens while they wait and run (``core.tokens``): the tasks that map tokens back to the text answer as the
    local pipeline does with the tokenizer's own encodings."""
    long_texts = [" ".join([text] * 8) for text in TEXTS]
    contexts = [" ".join([context] * 8) for context in CONTEXTS]
    assert sum(map(len, long_texts)) > INLINE_TOKENIZE_CHARACTERS
    assert sum(map(len, [*QUESTIONS, *contexts])) > INLINE_TOKENIZE_CHARACTERS

    name = name_of("bert", "token-classification")
    server = serve(start_server, exported, name)
    local = Pipeline(exported.folder("bert", "token-classification"))(long_texts)
    outputs = outputs_of(infer(server, name, {"inputs": text_inputs(text=long_texts)}))
    served = [json.loads(row) for row in outputs["entities"]["data"]]
    assert [[{k: v for k, v in e.items() if k != "score"} for e in row] for row in served] == [
        [{k: v for k, v in e.items() if k != "score"} for e in row] for row in local
    ]

    name = name_of("bert", "question-answering")
    server = serve(start_server, exported, name)
    answers = Pipeline(exported.folder("bert", "question-answering"))(QUESTIONS, context=contexts)
    outputs = outputs_of(infer(server, name, {"inputs": text_inputs(question=QUESTIONS, context=contexts)}))
    assert outputs["answer"]["data"] == [r["answer"] for r in answers]
    assert outputs["start"]["data"] == [r["start"] for r in answers]
    assert outputs["end"]["data"] == [r["end"] for r in answers]


def test_tf_serving_columnar_text_classification(exported: Exported, start_server: StartServer) -> None:
    name = name_of("bert", "text-classification")
    server = serve(start_server, exported, name)
    expected, _ = Pipeline(exported.folder("bert", "text-classification")).run(TextBatch(TEXTS))
    response = httpx.post(f"{server.http_url}/v1/models/{name}:predict", json={"inputs": {"text": TEXTS}}, timeout=60)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert set(outputs) == set(TASK_OUTPUTS["text-classification"])
    assert outputs["label"] == [label.decode() for label in expected["label"]]
    np.testing.assert_allclose(outputs["score"], expected["score"], atol=1e-6)
    np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-6)


MASK = "[MASK]"  # BERT's mask token: the WordPiece vocabulary above is BERT's
GOOD_REQUESTS = {
    name_of("bert", "question-answering"): {"inputs": text_inputs(question=QUESTIONS[:1], context=CONTEXTS[:1])},
    name_of("bert", "fill-mask"): {"inputs": text_inputs(text=[f"alice met {MASK}."])},
    name_of("bert", "text-classification"): {"inputs": text_inputs(text=TEXTS[:1])},
}
BAD_REQUESTS = [
    (
        "qa-without-context",
        name_of("bert", "question-answering"),
        {"inputs": text_inputs(question=QUESTIONS[:1])},
        ("question", "context"),
    ),
    (
        "fill-mask-without-mask",
        name_of("bert", "fill-mask"),
        {"inputs": text_inputs(text=["alice met bob."])},
        ("mask token", MASK),
    ),
    (
        "unknown-output",
        name_of("bert", "text-classification"),
        {"inputs": text_inputs(text=TEXTS[:1]), "outputs": [{"name": "nope"}]},
        ("unknown output 'nope'", *TASK_OUTPUTS["text-classification"]),
    ),
]


@pytest.mark.parametrize(("model", "body", "words"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_text_requests_are_refused_and_serving_goes_on(
    exported: Exported, start_server: StartServer, model: str, body: dict[str, Any], words: tuple[str, ...]
) -> None:
    assert PipelineSpec.read(exported.folder("bert", "fill-mask")).mask_token == MASK  # type: ignore[union-attr]
    server = serve(start_server, exported, model)
    response = infer(server, model, body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message
    assert infer(server, model, GOOD_REQUESTS[model]).status_code == 200


# --- onnxserve predict ---------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ONNXSERVE, *args], capture_output=True, text=True, timeout=120, check=False)


def assert_same_results(printed: Any, expected: Any) -> None:
    """Equal JSON-like results, floats (scores) to 1e-6."""
    if isinstance(expected, float):
        assert printed == pytest.approx(expected, abs=1e-6)
    elif isinstance(expected, dict):
        assert isinstance(printed, dict)
        assert printed.keys() == expected.keys()
        for key in expected:
            assert_same_results(printed[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(printed, list)
        assert len(printed) == len(expected)
        for a, b in zip(printed, expected, strict=True):
            assert_same_results(a, b)
    else:
        assert printed == expected


def test_cli_predict_text_classification(exported: Exported) -> None:
    folder = exported.folder("bert", "text-classification")
    result = run_cli("predict", str(folder), TEXTS[0], TEXTS[1])
    assert result.returncode == 0, result.stderr
    assert_same_results(json.loads(result.stdout), Pipeline(folder)(TEXTS[:2]))


def test_cli_predict_question_answering(exported: Exported) -> None:
    folder = exported.folder("bert", "question-answering")
    result = run_cli("predict", str(folder), QUESTIONS[0], "--context", CONTEXTS[0])
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert_same_results(printed, Pipeline(folder)(QUESTIONS[:1], context=CONTEXTS[:1]))
    assert printed[0]["answer"]


def test_cli_predict_needs_a_text_model_folder(exported: Exported, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.onnx").write_bytes((exported.folder("bert", "text-classification") / "model.onnx").read_bytes())
    result = run_cli("predict", str(plain), "hello")
    assert result.returncode == 2
    assert "no onnxserve.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --- what the exporter refuses -------------------------------------------------------------------


def test_unsupported_architecture_is_refused(bpe_files: tuple[Path, Path], tmp_path: Path) -> None:
    vocab, merges = bpe_files
    tokenizer = GPT2Tokenizer(vocab=str(vocab), merges=str(merges))
    source = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=MAX_LENGTH)
    GPT2Model(config).save_pretrained(str(source))
    tokenizer.save_pretrained(str(source))
    output = tmp_path / "gpt2" / "1"
    with pytest.raises(ExportError, match="unsupported architecture 'gpt2'") as caught:
        export_huggingface(source, output, HfExportOptions(task="feature-extraction"))
    for architecture in ARCHITECTURES:
        assert architecture in caught.value.message
    assert not output.exists()


def test_pooling_with_text_classification_is_refused(exported: Exported, tmp_path: Path) -> None:
    source = exported.sources[name_of("bert", "text-classification")]
    output = tmp_path / "classifier" / "1"
    with pytest.raises(ExportError, match="--pooling and --normalize apply to feature-extraction"):
        export_huggingface(source, output, HfExportOptions(task="text-classification", pooling="mean"))
    result = run_cli(
        "export", "hf", str(source), "--task", "text-classification", "--output", str(output), "--pooling", "mean"
    )
    assert result.returncode == 2
    assert "--pooling" in result.stderr
    assert "not text-classification" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_roberta_max_length_leaves_room_for_the_position_offset(bpe_files: tuple[Path, Path], tmp_path: Path) -> None:
    # RoBERTa numbers positions from pad_token_id + 1, so a table of MAX_LENGTH + 2 positions takes
    # MAX_LENGTH tokens. A tokenizer that states no model_max_length (the transformers default is a huge
    # sentinel) must not make the exporter use the whole table as the max length.
    vocab, merges = bpe_files
    tokenizer = RobertaTokenizer(vocab=str(vocab), merges=str(merges))
    source = save_source(
        tmp_path / "roberta", model_config("roberta", tokenizer, "feature-extraction"), tokenizer, "AutoModel"
    )
    output = tmp_path / "out" / "1"
    report = export_huggingface(source, output, HfExportOptions(task="feature-extraction"))
    assert report.passed
    spec = PipelineSpec.read(output)
    assert spec is not None
    assert spec.max_length == MAX_LENGTH
