"""A session's external data is read into memory the server owns at load (``core.external_data``), wherever
the model keeps it: ONNX Runtime maps no file of the version folder, so a file overwritten in place after the
load changes nothing the session computes (outside attack rt25 F1)."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxserve.core.confinement import check_model, model_tensors
from onnxserve.core.division_guard import guard_division
from onnxserve.core.external_data import has_external_data, take_external_data
from onnxserve.core.runtime import ModelSession, create_session, read_onnx
from onnxserve.errors import ModelLoadError

N = 300_000  # elements of each float32 tensor: 1.2 MB, several pages each
BF16_ONE = np.uint16(0x3F80)


def _external(tensor: TensorProto, location: str, offset: int, length: int) -> TensorProto:
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def everywhere_model(folder: Path, divide: bool = False) -> dict[str, np.ndarray]:
    """A model that keeps external data in every place ONNX allows, in two files, and the outputs it
    computes for ``idx = [3, N - 1]``, ``cond = True`` (and ``d = [1, 1]`` when it ``divide``s):

    - ``a``: main initializer W (``w.bin`` at 0), ``b``: main initializer V sharing W's bytes,
    - ``c``: a Constant node's value attribute (``w.bin``, after W),
    - ``e``: a then-branch initializer of an If (``sub/more.bin``, a second file in a subfolder),
    - ``f``: a sparse initializer's values (``w.bin``), ``h``: a bfloat16 initializer (``w.bin``).
    """
    folder.mkdir(parents=True)
    (folder / "sub").mkdir()
    w = np.arange(N, dtype=np.float32)
    c = w * 2
    s = w * 3
    sparse_values = np.array([5.0, 6.0], dtype=np.float32)
    bf16 = np.full(4, BF16_ONE, dtype=np.uint16)
    blob = b"".join(x.tobytes() for x in (w, c, sparse_values, bf16))
    (folder / "w.bin").write_bytes(blob)
    (folder / "sub" / "more.bin").write_bytes(b"\0" * 4096 + s.tobytes())  # at an offset
    at_c, at_sparse, at_bf16 = w.nbytes, w.nbytes + c.nbytes, w.nbytes + c.nbytes + sparse_values.nbytes

    weights = _external(numpy_helper.from_array(w, "W"), "w.bin", 0, w.nbytes)
    shared = _external(numpy_helper.from_array(w, "V"), "w.bin", 0, w.nbytes)
    half = helper.make_tensor("H", TensorProto.BFLOAT16, [4], [1.0] * 4)
    half = _external(half, "w.bin", at_bf16, bf16.nbytes)
    constant = _external(numpy_helper.from_array(c, "Cv"), "w.bin", at_c, c.nbytes)
    branch = _external(numpy_helper.from_array(s, "S"), "sub/more.bin", 4096, s.nbytes)
    values = _external(numpy_helper.from_array(sparse_values, "P"), "w.bin", at_sparse, sparse_values.nbytes)
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([1, 3], np.int64), "Pi"), [4])

    then_graph = helper.make_graph(
        [helper.make_node("Gather", ["S", "idx"], ["t"], axis=0)],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["k"])],
        [branch],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Gather", ["W", "idx"], ["u"], axis=0)],
        "else",
        [],
        [helper.make_tensor_value_info("u", TensorProto.FLOAT, ["k"])],
    )
    nodes = [
        helper.make_node("Constant", [], ["C"], value=constant),
        helper.make_node("Gather", ["W", "idx"], ["a"], axis=0),
        helper.make_node("Gather", ["V", "idx"], ["b"], axis=0),
        helper.make_node("Gather", ["C", "idx"], ["c"], axis=0),
        helper.make_node("If", ["cond"], ["e"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Identity", ["P"], ["f"]),
        helper.make_node("Cast", ["H"], ["h"], to=TensorProto.FLOAT),
    ]
    inputs = [
        helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abcefh"]
    if divide:
        nodes.append(helper.make_node("Div", ["idx", "d"], ["q"]))
        inputs.append(helper.make_tensor_value_info("d", TensorProto.INT64, ["k"]))
        outputs.append(helper.make_tensor_value_info("q", TensorProto.INT64, ["k"]))
    graph = helper.make_graph(
        nodes, "everywhere", inputs, outputs, [weights, shared, half], sparse_initializer=[sparse]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, folder / "model.onnx")
    last = N - 1
    return {
        "a": np.array([3, last], np.float32),
        "b": np.array([3, last], np.float32),
        "c": np.array([6, 2 * last], np.float32),
        "e": np.array([9, 3 * last], np.float32),
        "f": np.array([0, 5, 0, 6], np.float32),
        "h": np.ones(4, np.float32),
    }


def _feeds(divide: bool) -> dict[str, np.ndarray]:
    feeds = {"idx": np.array([3, N - 1], np.int64), "cond": np.array(True)}
    if divide:
        feeds["d"] = np.array([1, 1], np.int64)
    return feeds


def _mapped(folder: Path) -> list[str]:
    maps = Path("/proc/self/maps")
    return [line for line in maps.read_text().splitlines() if str(folder) in line] if maps.exists() else []


@pytest.mark.parametrize("divide", [False, True], ids=["from-file", "guarded-copy"])
def test_files_overwritten_after_the_load_change_nothing_the_session_computes(tmp_path: Path, divide: bool) -> None:
    folder = tmp_path / "m" / "1"
    expected = everywhere_model(folder, divide)
    model = read_onnx(folder / "model.onnx")
    assert has_external_data(model)
    assert (guard_division(model, "m") is not None) == divide
    session = ModelSession(folder / "model.onnx", name="m")
    outputs = session.run(_feeds(divide))
    for name, values in expected.items():
        np.testing.assert_array_equal(outputs[name], values, err_msg=name)
    if sys.platform == "linux":
        assert _mapped(folder) == []  # before: w.bin and sub/more.bin mapped for the session's life

    # rsync --inplace: the same sizes, other bytes (before: W, V, C and S answered them)
    for file in (folder / "w.bin", folder / "sub" / "more.bin"):
        file.write_bytes(bytes(255 - b for b in file.read_bytes()))
    outputs = session.run(_feeds(divide))
    for name, values in expected.items():
        np.testing.assert_array_equal(outputs[name], values, err_msg=name)

    # cp's first step: the files cut to nothing (before: SIGBUS at the first page read)
    for file in (folder / "w.bin", folder / "sub" / "more.bin"):
        file.write_bytes(b"")
    outputs = session.run(_feeds(divide))
    for name, values in expected.items():
        np.testing.assert_array_equal(outputs[name], values, err_msg=name)


def test_the_read_arrays_are_freed_once_the_session_is_made(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    expected = everywhere_model(folder)
    model = read_onnx(folder / "model.onnx")
    check_model(model, folder)
    taken = take_external_data(model, folder, "m")
    assert sorted(taken) == ["H", "V", "W"]  # the main graph's; the rest is embedded in the model
    assert taken["W"].array.base is taken["V"].array.base  # one byte range, read once
    assert all(t.data_location != TensorProto.EXTERNAL for _, t in model_tensors(model, main_initializers=False))
    session = create_session(model, initializers=taken)
    arrays = [weakref.ref(i.array) for i in taken.values()]
    taken.clear()
    assert [a() for a in arrays] == [None, None, None]  # ONNX Runtime copied them: nothing else holds them
    (folder / "w.bin").write_bytes(b"")
    (a,) = session.run(["a"], _feeds(False))
    np.testing.assert_array_equal(a, expected["a"])


def test_a_file_cut_between_the_check_and_the_read_is_a_load_error(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    everywhere_model(folder)
    model = read_onnx(folder / "model.onnx")
    check_model(model, folder)
    (folder / "sub" / "more.bin").write_bytes(b"\0" * 5000)  # cut after the check: S ends past it
    with pytest.raises(ModelLoadError, match=r"m: initializer 'S': external data file 'sub/more.bin' ended at byte"):
        take_external_data(model, folder, "m")
