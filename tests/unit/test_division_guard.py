"""``core.division_guard``: every int32/int64 Div a client can steer to INT_MIN / -1 (which makes ONNX
Runtime's kernel trap and the process die) is guarded in the served session, and nothing else changes: the
file on disk, models without such divisions, the answers of every other division."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tests.models import HEADER, add_model, integer_division_models, parse, truncated_quotients, write_version

from onnxserve.core.division_guard import PREFIX, guard_division
from onnxserve.core.runtime import ModelSession

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
