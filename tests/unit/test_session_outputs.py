"""ModelSession.run hands ONNX Runtime its inputs as OrtValues (scalars stay scalars, any memory order)
and checks the outputs' shapes before converting them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx.parser import parse_model

from onnxserve.core import runtime
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import InferenceError, TooLargeError


def _session(tmp_path: Path, text: str) -> ModelSession:
    path = tmp_path / "model.onnx"
    onnx.save(parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + text), path)
    return ModelSession(path, name="m")


def test_scalar_inputs_stay_scalars(tmp_path: Path) -> None:
    session = _session(tmp_path, "rng (int64 a, int64 b, int64 c) => (int64[n] y) { y = Range(a, b, c) }")
    y = session.run({"a": np.array(0), "b": np.array(5), "c": np.array(1)})["y"]
    assert y.tolist() == [0, 1, 2, 3, 4]
    same = _session(tmp_path, "idn (int64 x) => (int64 y) { y = Identity(x) }").run({"x": np.array(7)})["y"]
    assert same.shape == ()
    assert same.item() == 7


def test_inputs_in_any_memory_order_are_read_as_they_are(tmp_path: Path) -> None:
    session = _session(tmp_path, "idn (float[a, b] x) => (float[a, b] y) { y = Identity(x) }")
    x = np.arange(12, dtype=np.float32).reshape(3, 4).T
    assert session.run({"x": x})["y"].tolist() == x.tolist()


def test_outputs_above_the_limit_are_refused_by_their_shapes(tmp_path: Path) -> None:
    session = _session(
        tmp_path, "fill (int64[r] s) => (float[a] y) { y = ConstantOfShape <value = float[1] {1.0}> (s) }"
    )
    assert session.run({"s": np.array([4])}, max_output_bytes=16)["y"].tolist() == [1.0] * 4
    with pytest.raises(TooLargeError, match="the response would be 20 bytes of output tensors, above the limit of 16"):
        session.run({"s": np.array([5])}, max_output_bytes=16)
    with pytest.raises(TooLargeError, match=r"has shape \[0, 4611686018427387904\], larger than any answer can be"):
        session.run({"s": np.array([0, 2**62])})


_LONG_TEXT = (
    'text_tile (int64[1] n) => (string[k] y) {\n    c = Constant <value = string[1] {"%s"}> ()\n    y = Tile(c, n)\n}'
    % ("x" * 1000)
)


def test_long_text_outputs_are_refused_by_their_exact_size_before_they_become_objects(tmp_path: Path) -> None:
    session = _session(tmp_path, _LONG_TEXT)
    assert runtime.string_layout_holds()  # this build's string tensors are read in place: the size below is exact
    y = session.run({"n": np.array([3])}, max_output_bytes=3 * 1004)["y"]
    assert y.tolist() == [b"x" * 1000] * 3
    with pytest.raises(
        TooLargeError, match="the response would be 4016 bytes of output tensors, above the limit of 4015"
    ):
        session.run({"n": np.array([4])}, max_output_bytes=4015)


def test_text_outputs_whose_size_cannot_be_read_stop_converting_at_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a build whose string layout is unknown
    monkeypatch.setattr(runtime, "string_bytes", lambda value, layout_read: None)
    session = _session(tmp_path, _LONG_TEXT)
    assert session.run({"n": np.array([3])}, max_output_bytes=3 * 1004)["y"].tolist() == [b"x" * 1000] * 3
    with pytest.raises(TooLargeError, match="the response would be more than 4015 bytes of output tensors"):
        session.run({"n": np.array([4])}, max_output_bytes=4015)


def test_text_outputs_of_a_model_with_text_inputs_stop_converting_at_the_limit(tmp_path: Path) -> None:
    session = _session(tmp_path, "tile (string[m] x, int64[1] n) => (string[k] y) { y = Tile(x, n) }")
    x = np.array(["é" * 50], dtype=object)  # 100 bytes of UTF-8: the limit counts bytes, not characters
    assert session.run({"x": x, "n": np.array([4])}, max_output_bytes=416)["y"].tolist() == ["é".encode() * 50] * 4
    with pytest.raises(TooLargeError, match="the response would be more than 415 bytes of output tensors"):
        session.run({"x": x, "n": np.array([4])}, max_output_bytes=415)
    assert session.run({"x": x, "n": np.array([4])})["y"].shape == (4,)  # no limit


_TEN_TEXTS = (
    "ten_texts (int64[1] n) => ("
    + ", ".join(f"string[k] y{i}" for i in range(10))
    + ') {\n    c = Constant <value = string[1] {"ab"}> ()\n'
    + "".join(f"    y{i} = Tile(c, n)\n" for i in range(10))
    + "}"
)


def test_bytes_elements_are_counted_over_all_outputs(tmp_path: Path) -> None:
    """Ten outputs of many short strings: each is under the element limit, together they are not (each
    element would be a Python object)."""
    session = _session(tmp_path, _TEN_TEXTS)
    outputs = session.run({"n": np.array([2])}, max_output_bytes=1 << 20, max_bytes_elements=20)
    assert [outputs[f"y{i}"].tolist() for i in range(10)] == [[b"ab", b"ab"]] * 10
    with pytest.raises(TooLargeError, match="the outputs up to 'y6' have 21 BYTES elements, more than the 20"):
        session.run({"n": np.array([3])}, max_output_bytes=1 << 20, max_bytes_elements=20)


_NOT_UTF8 = """not_utf8 (int64[1] n) => (string[k] y) {
    c = Constant <value = string[1] {"ab"}> ()
    y = Tile(c, n)
}"""


def test_a_text_output_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    model = parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + _NOT_UTF8)
    model.graph.node[0].attribute[0].t.string_data[0] = b"\xff\xfe\x80abc"
    path = tmp_path / "not_utf8.onnx"
    onnx.save(model, str(path))
    session = ModelSession(path)
    with pytest.raises(InferenceError, match="a text output holds bytes that are not UTF-8"):
        session.run({"n": np.array([2])}, max_output_bytes=1 << 20)
    with pytest.raises(InferenceError, match="not UTF-8"):
        session.run({"n": np.array([2])})
