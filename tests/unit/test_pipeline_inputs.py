"""A text pipeline's token inputs: only those a tokenizer fills, so every row's length is known."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from onnxserve.core.datatypes import from_v2
from onnxserve.core.pipeline import PipelineSpec, load_pipeline
from onnxserve.core.types import TensorSpec
from onnxserve.errors import ConfigError


def _folder(tmp_path: Path, inputs: list[str]) -> Path:
    Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    PipelineSpec(task="feature-extraction", inputs=inputs, outputs=["last_hidden_state"], max_length=16).write(tmp_path)
    return tmp_path


def _specs(names: list[str]) -> list[TensorSpec]:
    return [TensorSpec(name, from_v2("INT64"), (-1, -1)) for name in names]


def test_a_pipeline_input_a_tokenizer_cannot_fill_is_refused_at_load(tmp_path: Path) -> None:
    """The demo with ``input_ids`` renamed ``ids`` loaded as a text model whose rows all counted 1 token:
    [64, 512] ran as one execution at +4.2 GB, never cut into chunks (outside attack rt14 F8)."""
    folder = _folder(tmp_path, ["ids", "attention_mask"])
    with pytest.raises(ConfigError, match="'ids' are not token inputs a tokenizer fills"):
        load_pipeline(folder, _specs(["ids", "attention_mask"]))


def test_token_tensors_tell_their_length_by_the_pipelines_inputs(tmp_path: Path) -> None:

    pipeline = load_pipeline(
        _folder(tmp_path, ["input_ids", "attention_mask"]), _specs(["input_ids", "attention_mask"])
    )
    assert pipeline is not None
    feeds = {"attention_mask": np.ones((4, 300), dtype=np.int64), "input_ids": np.ones((4, 300), dtype=np.int64)}
    assert pipeline.token_length(feeds) == 300
    assert pipeline.token_length({"attention_mask": feeds["attention_mask"]}) == 300


def test_token_inputs_that_are_not_batch_by_sequence_are_refused_at_load(tmp_path: Path) -> None:
    """A multiple-choice layout, input_ids [batch, 1, sequence], loaded as a text model whose lengths,
    chunks and execution memory were read from 2-D tensors only: a [1, 1, 12288] request ran whole at
    +4.6 GB, 24 times the model's length (outside attack rt17 F2)."""
    folder = _folder(tmp_path, ["input_ids", "attention_mask"])
    specs = [TensorSpec(name, from_v2("INT64"), (-1, 1, -1)) for name in ("input_ids", "attention_mask")]
    with pytest.raises(ConfigError, match=r"token inputs 'input_ids', 'attention_mask' are not \[batch, sequence\]"):
        load_pipeline(folder, specs)


def test_graph_inputs_the_pipeline_does_not_name_are_refused_at_load(tmp_path: Path) -> None:
    """A pipeline that named only input_ids over a graph that also took attention_mask [batch, 1, n]: text
    requests could not fill it, and token tensors were measured by input_ids alone: an attention_mask of
    24,000 beside a 4-token input_ids ran at +2.2 GB (outside attack rt18)."""
    folder = _folder(tmp_path, ["input_ids"])
    with pytest.raises(ConfigError, match="the graph's inputs 'attention_mask' are not among the pipeline's inputs"):
        load_pipeline(folder, _specs(["input_ids", "attention_mask"]))


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("100000000000000000000", "labels.100000000000000000000: Input should be less than 2147483648"),
        ("-1", "labels.-1: Input should be greater than or equal to 0"),
        ("one", "labels.one: Input should be a valid integer"),
    ],
)
def test_a_label_key_that_is_no_class_index_is_refused_at_load(tmp_path: Path, key: str, problem: str) -> None:
    """A key of 10^20 loaded, and TEI ``/info`` answered 500 on it for good: no JSON encoder of 64-bit
    integers takes it (outside attack rt31 F3)."""
    spec = '{"task": "text-classification", "inputs": ["input_ids"], "outputs": ["logits"], "max_length": 8, '
    spec += f'"labels": {{"0": "negative", "{key}": "odd"}}}}'
    (tmp_path / "onnxserve.json").write_text(spec)
    with pytest.raises(ConfigError, match=f"not a valid pipeline spec: {problem}"):
        PipelineSpec.read(tmp_path)
    assert PipelineSpec.parse(spec.replace(f'"{key}"', '"1"'), "m").labels == {0: "negative", 1: "odd"}


def _spec_folder(tmp_path: Path, **spec: object) -> Path:
    Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    PipelineSpec.model_validate({"inputs": ["input_ids"], "max_length": 16, **spec}).write(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "graph", "problem"),
    [
        (  # outside attack rt35 F2: every V2 text request was a 500 with a traceback
            {"task": "feature-extraction", "pooling": "mean", "outputs": ["last_hidden_state"]},
            ["last_hidden_state"],
            "a feature-extraction pipeline with mean pooling makes its results from the graph output(s) "
            "'sentence_embedding', which its spec's outputs (last_hidden_state) do not name",
        ),
        (
            {"task": "text-classification", "outputs": ["scores"]},
            ["scores"],
            "a text-classification pipeline makes its results from the graph output(s) 'logits'",
        ),
        (
            {"task": "feature-extraction", "pooling": "mean", "outputs": ["sentence_embedding"]},
            ["last_hidden_state"],
            "the pipeline's outputs 'sentence_embedding' are not outputs of the graph (last_hidden_state)",
        ),
    ],
)
def test_a_spec_whose_results_have_no_graph_output_is_refused_at_load(
    tmp_path: Path, spec: dict[str, object], graph: list[str], problem: str
) -> None:
    folder = _spec_folder(tmp_path, **spec)
    outputs = [TensorSpec(name, from_v2("FP32"), (-1, -1)) for name in graph]
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_pipeline(folder, _specs(["input_ids"]), outputs)


def test_a_spec_whose_results_come_from_its_outputs_loads(tmp_path: Path) -> None:
    folder = _spec_folder(tmp_path, task="feature-extraction", pooling="mean", outputs=["sentence_embedding"])
    outputs = [TensorSpec("sentence_embedding", from_v2("FP32"), (-1, 8))]
    assert load_pipeline(folder, _specs(["input_ids"]), outputs) is not None


@pytest.mark.parametrize(
    ("task", "graph", "problem"),
    [  # outside attack rt36: each loaded, and every text request to it was a 500
        ("token-classification", {"logits": (-1, 2)}, "reads the graph output 'logits' as 3 dimensions"),
        (
            "question-answering",
            {"start_logits": (-1, -1, 2), "end_logits": (-1, -1)},
            "reads the graph output 'start_logits' as 2 dimensions",
        ),
    ],
)
def test_a_spec_whose_outputs_have_other_dimensions_than_its_task_reads_is_refused_at_load(
    tmp_path: Path, task: str, graph: dict[str, tuple[int, ...]], problem: str
) -> None:
    folder = _spec_folder(tmp_path, task=task, outputs=list(graph))
    outputs = [TensorSpec(name, from_v2("FP32"), shape) for name, shape in graph.items()]
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_pipeline(folder, _specs(["input_ids"]), outputs)
    good = [
        TensorSpec(name, from_v2("FP32"), (-1, -1, 8) if task != "question-answering" else (-1, -1)) for name in graph
    ]
    assert load_pipeline(folder, _specs(["input_ids"]), good) is not None
