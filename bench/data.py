"""What the workloads send: the tiny add model, 32-token MiniLM inputs, ~12-word sentences, request bodies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnx.parser
import orjson
from onnx import TensorProto, helper
from tokenizers import Tokenizer

SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog near the river.",
    "Our team shipped the new search feature to every customer last week.",
    "She bought fresh bread and some cheese at the market this morning.",
    "The new server answered every single request in under ten milliseconds today.",
    "Heavy rain and strong wind are expected across the northern coast tomorrow.",
    "He forgot his old umbrella on the train again after the meeting.",
    "The city museum opens a new exhibition about ancient maps next month.",
    "Please send the signed contract back to us before Friday evening, thanks.",
    "A small startup built a much faster way to index large documents.",
    "The children played football in the park until it got too dark.",
    "This simple recipe needs two eggs, some flour and a little sugar.",
    "Our engineers measured the latency of the new model under heavy load.",
    "The public library will stay open late during the exam period again.",
    "Traffic on the main bridge was very slow because of the repairs.",
    "My favourite song played on the radio while I was cooking dinner.",
    "The city committee approved the budget after a long and tense debate.",
)
"""Sixteen 12-word sentences; text requests cycle through them (one sentence per request)."""

TOKENS = 32
"""Sequence length of the tensors workload: INT64 [1, 32] token inputs."""

LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog while the old farmer watches quietly from his wooden "
    "porch, drinking black coffee and reading yesterday's local newspaper."
)

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def add_model() -> onnx.ModelProto:
    """Two FP32 [batch, 16] inputs added: the overhead workload's model."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 9, opset_import: ["" : 17]>
        add (float[batch, 16] a, float[batch, 16] b) => (float[batch, 16] sum) {
            sum = Add(a, b)
        }
        """
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def write_add_model(repository: Path) -> Path:
    """``repository/add/1/model.onnx`` (rewritten each run, atomically); returns the model file."""
    folder = repository / "add" / "1"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    partial = folder / "model.onnx.partial"
    onnx.save(add_model(), partial)
    partial.replace(target)
    return target


def write_identity_model(repository: Path, dims: list[int | str]) -> Path:
    """``repository/identity/1/model.onnx``: an FP32 Identity of shape ``dims`` (its answer is its input, so
    nearly all of a request's cost beyond ONNX Runtime's run is the server's); returns the model file."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = repository / "identity" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, path)
    return path


def token_row(tokenizer_file: Path, length: int = TOKENS) -> dict[str, npt.NDArray[np.int64]]:
    """One real sentence tokenized to exactly ``length`` tokens (truncated, ends with [SEP]): INT64 [1, length]."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=length)
    encoding = tokenizer.encode(LONG_TEXT)
    if len(encoding.ids) != length:
        raise ValueError(f"the sample text gives {len(encoding.ids)} tokens, not {length}")
    return {
        "input_ids": np.asarray([encoding.ids], dtype=np.int64),
        "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64),
        "token_type_ids": np.asarray([encoding.type_ids], dtype=np.int64),
    }


def perf_analyzer_input(row: dict[str, npt.NDArray[np.int64]], path: Path) -> Path:
    """perf_analyzer's ``--input-data`` JSON for one row (flat contents; ``--shape`` gives the shape)."""
    document = {"data": [{name: row[name].reshape(-1).tolist() for name in TOKEN_INPUTS}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document))
    return path


def v2_text_body(sentence: str) -> bytes:
    """A KServe V2 JSON request sending one text to a text model."""
    return orjson.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [sentence]}]})


def openai_embeddings_body(sentence: str) -> bytes:
    """An OpenAI-compatible ``/v1/embeddings`` request embedding one text with the demo model."""
    return orjson.dumps({"model": "minilm", "input": [sentence], "encoding_format": "float"})
