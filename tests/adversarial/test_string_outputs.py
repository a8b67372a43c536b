"""String models (a known gap of issue 14, closed): a model whose string outputs are long, asked for many
of them by one small request. ONNX Runtime's Python API turns a string tensor into Python objects all at
once, and the server used to count a string at 4 bytes before that conversion: 16,000 copies of a 64 KiB
text (1 GB) passed the first check and were built twice more (Python text, then bytes) before the exact
size refused them. Now a model without string inputs has its string outputs counted exactly, in ONNX
Runtime's own memory, before any Python object is made; a model with string inputs (ONNX Runtime
answers it with Python objects) has its outputs encoded only up to the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest
import requests
from harness import CappedServer, serve_capped
from onnx import TensorProto, helper
from watch import Watch

from models import write_version

CAP = 6 * 1024**3
TEXT = 64 * 1024  # bytes of each element
COPIES = 16_000  # 1 GB of text: 16,000 elements pass the element count (1,048,576) and the 4-byte estimate
ECHOES = 2_000  # 128 MB of text from a model with a text input: ONNX Runtime makes Python text of all of it
PROBE_BOUND = 1.0


def _text_models() -> dict[str, onnx.ModelProto]:
    """``long_text``: ``n`` copies of a 64 KiB text held by the model; ``echo_text``: ``n`` copies of the input."""
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["k"])
    text = helper.make_tensor("text", TensorProto.STRING, [1], [b"t" * TEXT])
    held = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=text), helper.make_node("Tile", ["c", "n"], ["y"])],
        "long_text",
        [n],
        [y],
    )
    x = helper.make_tensor_value_info("x", TensorProto.STRING, ["m"])
    echo = helper.make_graph([helper.make_node("Tile", ["x", "n"], ["y"])], "echo_text", [x, n], [y])
    opsets = [helper.make_opsetid("", 17)]
    return {
        "long_text": helper.make_model(held, opset_imports=opsets, ir_version=8),
        "echo_text": helper.make_model(echo, opset_imports=opsets, ir_version=8),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CappedServer]:
    root: Path = tmp_path_factory.mktemp("string_models")
    for name, model in _text_models().items():
        write_version(root, name, 1, model)
    with serve_capped(root, cap_bytes=CAP) as running:
        yield running


def _infer(server: CappedServer, model: str, n: int, x: str | None = None) -> requests.Response:
    inputs = [{"name": "n", "shape": [1], "datatype": "INT64", "data": [n]}]
    if x is not None:
        inputs.append({"name": "x", "shape": [1], "datatype": "BYTES", "data": [x]})
    return requests.post(f"{server.http_url}/v2/models/{model}/infer", json={"inputs": inputs}, timeout=120)


def _assert_serving(server: CappedServer, prober: Watch) -> None:
    assert server.alive(), server.log()[-3000:]
    assert not prober.failures, prober.failures
    assert prober.worst_probe < PROBE_BOUND
    normal = _infer(server, "long_text", 2)
    assert normal.status_code == 200, normal.text
    assert normal.json()["outputs"][0]["data"] == ["t" * TEXT] * 2


def test_long_text_outputs_are_refused_by_their_exact_size_before_they_become_objects(server: CappedServer) -> None:
    before = server.rss_bytes()
    with Watch(server) as prober:
        response = _infer(server, "long_text", COPIES)
    assert response.status_code == 400, response.text
    size = COPIES * (TEXT + 4)
    assert f"the response would be {size} bytes of output tensors" in response.json()["error"]
    assert "--max-response-bytes" in response.json()["error"]
    # ONNX Runtime's own 1 GB of text, and nothing built beside it (the old server built it twice more).
    assert prober.peak_rss - before < 1.6 * COPIES * TEXT, prober.peak_rss - before
    _assert_serving(server, prober)


def test_long_text_outputs_of_a_text_input_model_are_encoded_only_up_to_the_limit(server: CappedServer) -> None:
    before = server.rss_bytes()
    with Watch(server) as prober:
        response = _infer(server, "echo_text", ECHOES, "e" * TEXT)  # a 64 KiB request
    assert response.status_code == 400, response.text
    assert "the response would be more than 67108864 bytes of output tensors" in response.json()["error"]
    # ONNX Runtime's 1 GB and the Python text it makes of it; the bytes stop at the 64 MiB limit.
    assert prober.peak_rss - before < 2.6 * ECHOES * TEXT, prober.peak_rss - before
    _assert_serving(server, prober)
    echoed = _infer(server, "echo_text", 3, "é")
    assert echoed.status_code == 200, echoed.text
    assert echoed.json()["outputs"][0]["data"] == ["é"] * 3
