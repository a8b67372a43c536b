"""``core.division_guard``: every int32/int64 Div a client can steer to INT_MIN / -1 (which makes ONNX
Runtime's kernel trap and the process die) is guarded in the served session, and nothing else changes: the
file on disk, models without such divisions, the answers of every other division."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tests.models import (
    HEADER,
    add_model,
    division_guard_evasions,
    integer_division_models,
    parse,
    truncated_quotients,
    write_version,
)

from onnxserve.core.division_guard import PREFIX, any_type_guard, guard_division
from onnxserve.core.runtime import ModelSession
from onnxserve.errors import ModelLoadError

MIN64 = np.iinfo(np.int64).min


@pytest.mark.parametrize(
    "model",
    [
        add_model(),
        parse("g (float[n] a, float[n] b) => (float[n] y) { y = Div(a, b) }"),
        parse("g (int64[n] a) => (int64[n] y) { two = Constant <value = int64 {2}> ()\n y = Div(a, two) }"),
        parse("g (int32[n] a) => (int32[n] y) { c = Constant <value = int32[2] {7, 9}> ()\n y = Div(c, a) }"),
    ],
    ids=["no-div", "float-div", "constant-divisor", "constant-dividend-without-min"],
)
def test_models_that_cannot_trap_are_not_touched(model: onnx.ModelProto) -> None:
    before = model.SerializeToString()
    assert guard_division(model) is None
    assert model.SerializeToString() == before


@pytest.mark.parametrize("name", sorted(integer_division_models()))
def test_every_steerable_division_is_guarded_and_answers_as_before(tmp_path: Path, name: str) -> None:
    model = integer_division_models()[name]
    folder = write_version(tmp_path, name, 1, model)
    on_disk = (folder / "model.onnx").read_bytes()
    session = ModelSession(folder / "model.onnx")
    bits = 32 if name == "div32" else 64
    dtype = np.int32 if bits == 32 else np.int64
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    a = np.concatenate([[info.min, info.min, info.max, info.min + 1], rng.integers(info.min, info.max, 60)])
    b = np.concatenate([[-1, 1, -1, -1], rng.integers(-5, 5, 60)])
    b[b == 0] = 3
    y = session.run({"a": a.astype(dtype), "b": b.astype(dtype)})["y"]
    assert y.tolist() == truncated_quotients(a.tolist(), b.tolist(), bits)
    assert y[0] == info.min
    assert (folder / "model.onnx").read_bytes() == on_disk  # the user's file is never rewritten


def test_the_guard_names_its_nodes_and_keeps_the_division(tmp_path: Path) -> None:
    guarded = guard_division(integer_division_models()["div64"])
    assert guarded is not None
    onnx.checker.check_model(guarded, full_check=True)
    ops = [node.op_type for node in guarded.graph.node]
    assert ops.count("Div") == 1
    assert {"Equal", "And", "Cast", "Mul", "Add"} <= set(ops)
    assert all(node.name.startswith(PREFIX) for node in guarded.graph.node if node.op_type != "Div")
    assert [o.name for o in guarded.graph.output] == ["y"]


@pytest.mark.parametrize("external", [True, False], ids=["external-data", "weights-inside"])
def test_a_model_with_weights_loads_guarded_and_reads_them_from_its_folder(tmp_path: Path, external: bool) -> None:
    # The division's operands are computed values with no declared type: shape inference finds them,
    # on a copy that declares the 80 KB of weights instead of carrying them.
    model = onnx.parser.parse_model(
        f"""{HEADER}
        g (int64[n] a, int64[n] b) => (int64[n] y, float[20000] w) {{
            c = Identity(a)
            d = Identity(b)
            q = Div(c, d)
            y = Identity(q)
            w = Identity(weights)
        }}
        """
    )
    weights = np.arange(20000, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weights, "weights"))
    folder = tmp_path / "m" / "1"
    folder.mkdir(parents=True)
    onnx.save(
        model, folder / "model.onnx", save_as_external_data=external, location="model.onnx.data", size_threshold=0
    )
    session = ModelSession(folder / "model.onnx")
    out = session.run({"a": np.array([MIN64, 9]), "b": np.array([-1, 2])})
    assert out["y"].tolist() == [MIN64, 4]
    assert np.array_equal(out["w"], weights)


@pytest.mark.parametrize("name", sorted(division_guard_evasions()))
def test_divisions_hidden_by_other_scopes_or_unknown_types_are_guarded(name: str) -> None:
    # Names another graph declares (constant 2, float value_info) say nothing about the division's own
    # operands, and a division whose type cannot be found is guarded for any type, never served unguarded.
    model = division_guard_evasions()[name]
    guarded = guard_division(model, name)
    assert guarded is not None
    session = ort.InferenceSession(guarded.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in ((MIN64, -1), (7, -2), (MIN64, 2), (-9, 1)):
        feeds = {"a": np.array([a]), "b": np.array([b])}
        if name.startswith("sib"):
            feeds["c"] = np.array(True)
        (y,) = session.run(None, feeds)
        assert y.reshape(-1).tolist() == truncated_quotients([a], [b], 64)


ALL_TYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
ALL_TYPES += [np.float16, np.float32, np.float64]
DIV_BEFORE_14 = {np.int32, np.int64, np.uint32, np.uint64, np.float16, np.float32, np.float64}


@pytest.mark.parametrize(
    ("opset", "dtype"),
    [(opset, dtype) for opset in (11, 13, 14, 17) for dtype in ALL_TYPES if opset >= 14 or dtype in DIV_BEFORE_14],
)
def test_the_guard_for_any_type_is_exact_for_every_type(opset: int, dtype: type[np.generic]) -> None:
    # CastLike from opset 15, GatherElements before it: both exact, for every type Div takes there.
    element = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    count = itertools.count()
    nodes, safe = any_type_guard("a", "b", lambda what: f"{PREFIX}/{what}_{next(count)}", opset)
    graph = onnx.helper.make_graph(
        [*nodes, onnx.helper.make_node("Div", ["a", safe], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info(n, element, [None]) for n in "ab"],
        [onnx.helper.make_tensor_value_info("y", element, [None])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    assert ("CastLike" in {node.op_type for node in nodes}) == (opset >= 15)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        edges = np.array([info.min, info.min, info.min, info.max, info.min + 1, 0, 1], dtype=dtype)
        a = np.concatenate([edges, rng.integers(info.min, info.max, 200, endpoint=True, dtype=dtype)])
        minus_one = -1 if info.min else 1
        b = np.array([minus_one, 1, 2, minus_one, minus_one, 5, 7], dtype=dtype)
        small = rng.integers(max(info.min, -4), 5, 100, dtype=dtype)
        b = np.concatenate([b, small, rng.integers(info.min, info.max, 100, endpoint=True, dtype=dtype)])
        b = np.where(b == 0, 3, b).astype(dtype)
        bits = 8 * np.dtype(dtype).itemsize
        expected = truncated_quotients(a.tolist(), b.tolist(), bits) if info.min else (a // b).tolist()
        (y,) = session.run(None, {"a": a, "b": b})
        assert y.tolist() == expected
        if info.min:
            assert y[0] == info.min  # MIN / -1 is the wrap
    else:
        finfo = np.finfo(dtype)
        edges_a = np.array([finfo.min, -1.0, -0.0, 0.0, np.inf, -np.inf, finfo.max, 3.5], dtype=dtype)
        edges_b = np.array([-1.0, -1.0, -1.0, 2.0, -1.0, -1.0, -1.0, -0.5], dtype=dtype)
        a = np.concatenate([edges_a, rng.standard_normal(200).astype(dtype)])
        b = np.concatenate([edges_b, rng.choice([-1.0, 1.0, -2.5, 0.25], 200).astype(dtype)])
        (y,) = session.run(None, {"a": a, "b": b})
        assert np.array_equal(y, a / b)
        assert np.array_equal(np.signbit(y), np.signbit(a / b))


def test_a_division_of_unknown_type_refuses_the_model_below_opset_11(tmp_path: Path) -> None:
    # The guard for any type needs Equal of every numeric type (opset 11): below it, fail closed.
    model = division_guard_evasions()["msrange"]
    model.opset_import[0].version = 10
    with pytest.raises(ModelLoadError, match=r"Div node 'q'.*element type.*opset 10.*refused"):
        guard_division(model, "old")
    folder = write_version(tmp_path, "old", 1, model)
    with pytest.raises(ModelLoadError, match="Div node 'q'"):
        ModelSession(folder / "model.onnx")


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_a_division_of_unknown_type_is_guarded_at_every_opset_from_11(opset: int) -> None:
    model = division_guard_evasions()["msrange"]
    model.opset_import[0].version = opset
    guarded = guard_division(model, "msrange")
    assert guarded is not None
    session = ort.InferenceSession(guarded.SerializeToString(), providers=["CPUExecutionProvider"])
    for a, b in ((MIN64, -1), (-7, 2)):
        (y,) = session.run(None, {"a": np.array([a]), "b": np.array([b])})
        assert y.tolist() == truncated_quotients([a], [b], 64)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize(("a_shape", "b_shape"), [([4], []), ([], [4]), ([2, 1], [1, 2])])
def test_the_guard_for_any_type_broadcasts_like_div(opset: int, a_shape: list[int], b_shape: list[int]) -> None:
    count = itertools.count()
    nodes, safe = any_type_guard("a", "b", lambda what: f"{what}_{next(count)}", opset)
    graph = onnx.helper.make_graph(
        [*nodes, onnx.helper.make_node("Div", ["a", safe], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT32, None) for n in "ab"],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT32, None)],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = np.array([np.iinfo(np.int32).min, -1, 7, -2], dtype=np.int32)
    a = np.resize(values, a_shape).astype(np.int32)
    b = np.resize(values[::-1], b_shape).astype(np.int32)
    (y,) = session.run(None, {"a": a, "b": b})
    wide_a, wide_b = np.broadcast_arrays(a.astype(np.int64), b.astype(np.int64))
    expected = truncated_quotients(wide_a.ravel().tolist(), wide_b.ravel().tolist(), 32)
    assert y.shape == wide_a.shape
    assert y.ravel().tolist() == expected
