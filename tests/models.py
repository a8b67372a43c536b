"""Small ONNX models built from ONNX text syntax, for tests (no checked-in binaries)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx.parser
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

HEADER = '<ir_version: 9, opset_import: ["" : 17]>'


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(f"{HEADER}\n{text}")
    onnx.checker.check_model(model, full_check=True)
    return model


def add_model() -> onnx.ModelProto:
    """Two FP32 inputs [batch, 16] added, and their difference."""
    return parse(
        """
        add (float[batch, 16] a, float[batch, 16] b) => (float[batch, 16] sum, float[batch, 16] diff) {
            sum = Add(a, b)
            diff = Sub(a, b)
        }
        """
    )


def mixed_model() -> onnx.ModelProto:
    """Several datatypes in and out: INT64 scaled, BOOL negated, FP16 doubled, UINT8 and INT8 passed."""
    return parse(
        """
        mixed (int64[n] ids, bool[n] flags, float16[n, 2] half, uint8[n] small, int8[n] signed, double[n] wide)
            => (int64[n] ids_x3, bool[n] not_flags, float16[n, 2] half_x2, uint8[n] small_out, int8[n] signed_out,
                double[n] wide_neg) {
            three = Constant <value = int64[1] {3}> ()
            ids_x3 = Mul(ids, three)
            not_flags = Not(flags)
            half_x2 = Add(half, half)
            small_out = Identity(small)
            signed_out = Identity(signed)
            wide_neg = Neg(wide)
        }
        """
    )


def fixed_model() -> onnx.ModelProto:
    """A fixed-shape FP32 [2, 3] input, scaled by 2 (its batch dimension is not dynamic)."""
    return parse(
        """
        fixed (float[2, 3] x) => (float[2, 3] y) {
            two = Constant <value = float[1] {2.0}> ()
            y = Mul(x, two)
        }
        """
    )


def add_arrays(batch: int = 3, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """Inputs of ``add_model``: ``a`` and ``b``, FP32 [batch, 16]."""
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal((batch, 16), dtype=np.float32),
        "b": rng.standard_normal((batch, 16), dtype=np.float32),
    }


def mixed_arrays(seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """Inputs of ``mixed_model``, four rows of each datatype."""
    rng = np.random.default_rng(seed)
    return {
        "ids": np.array([2**61 + 1, -(2**61) - 7, 0, 12345], dtype=np.int64),  # beyond float64's 53 bits
        "flags": np.array([True, False, False, True]),
        "half": rng.standard_normal((4, 2)).astype(np.float16),
        "small": np.array([0, 1, 128, 255], dtype=np.uint8),
        "signed": np.array([-128, -1, 0, 127], dtype=np.int8),
        "wide": rng.standard_normal(4) * 1e300,
    }


def fixed_array(seed: int = 0) -> npt.NDArray[Any]:
    """The input of ``fixed_model``: FP32 [2, 3]."""
    return np.random.default_rng(seed).standard_normal((2, 3), dtype=np.float32)


def strings_model() -> onnx.ModelProto:
    """A BYTES input returned as is, plus a constant string output per row."""
    return parse(
        """
        strings (string[n] text) => (string[n] echo, int64[1] count) {
            echo = Identity(text)
            shape = Shape(text)
            count = Identity(shape)
        }
        """
    )


def two_strings_model() -> onnx.ModelProto:
    """Two BYTES inputs; each one's element count comes back."""
    return parse(
        """
        two_strings (string[n] a, string[m] b) => (int64[1] count_a, int64[1] count_b) {
            count_a = Shape(a)
            count_b = Shape(b)
        }
        """
    )


def slow_model() -> onnx.ModelProto:
    """Repeats a 256x256 MatMul ``iterations`` times: a model whose run time the caller chooses."""
    return parse(
        """
        slow (int64 iterations, float[256, 256] x) => (float[256, 256] y) {
            cond = Constant <value = bool {1}> ()
            y = Loop(iterations, cond, x) <body = step (int64 i, bool c_in, float[256, 256] acc)
                => (bool c_out, float[256, 256] next) {
                    c_out = Identity(c_in)
                    prod = MatMul(acc, acc)
                    scale = Constant <value = float[1] {0.001}> ()
                    next = Mul(prod, scale)
                }>
        }
        """
    )


def warm_up_loop_model(steps: int, size: int) -> onnx.ModelProto:
    """``steps`` products of a ``size`` x ``size`` matrix whatever the input: a warm-up (a run on zeros)
    of the time the caller chooses, or of no end."""
    return parse(
        f"""
        warmup (float[{size}, {size}] x) => (float[{size}, {size}] y) {{
            count = Constant <value = int64 {{{steps}}}> ()
            cond = Constant <value = bool {{1}}> ()
            y = Loop(count, cond, x) <body = step (int64 i, bool c_in, float[{size}, {size}] acc)
                => (bool c_out, float[{size}, {size}] next) {{
                    c_out = Identity(c_in)
                    next = MatMul(acc, acc)
                }}>
        }}
        """
    )


def token_count_classifier(classes: int) -> onnx.ModelProto:
    """A text classifier over ``input_ids`` and ``attention_mask`` (``classes`` >= 2) whose logits are the
    row's token count for class 0 and minus it for every other class: any text is class 0."""
    return parse(
        f"""
        classifier (int64[batch, seq] input_ids, int64[batch, seq] attention_mask) => (float[batch, {classes}] logits)
        {{
            maskf = Cast <to = 1> (attention_mask)
            axes = Constant <value = int64[1] {{1}}> ()
            total = ReduceSum <keepdims = 1> (maskf, axes)
            negative = Neg(total)
            others = Constant <value = int64[2] {{1, {classes - 1}}}> ()
            rest = Expand(negative, others)
            logits = Concat <axis = 1> (total, rest)
        }}
        """
    )


def write_version(repository: Path, name: str, version: int, model: onnx.ModelProto) -> Path:
    folder = repository / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    return folder


NUMERIC_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "add": add_model,
    "mixed": mixed_model,
    "fixed": fixed_model,
    "strings": strings_model,
    "slow": slow_model,
}
"""The small numeric models by the name they are served under (conftest's ``numeric_repository``)."""


def rowsum_model() -> onnx.ModelProto:
    """A batch of rows of any length: each row's sum, and the rows doubled."""
    return parse(
        """
        rowsum (float[batch, n] x) => (float[batch] total, float[batch, n] doubled) {
            axes = Constant <value = int64[1] {1}> ()
            total = ReduceSum <keepdims = 0> (x, axes)
            two = Constant <value = float[1] {2.0}> ()
            doubled = Mul(x, two)
        }
        """
    )


def lookup_model() -> onnx.ModelProto:
    """Looks indices up in a table of 4 values: an index outside 0..3 makes the run fail."""
    return parse(
        """
        lookup (int64[batch, 1] index) => (float[batch, 1] value) {
            table = Constant <value = float[4] {10.0, 20.0, 30.0, 40.0}> ()
            value = Gather <axis = 0> (table, index)
        }
        """
    )


def slow_batch_model(iterations: int = 400) -> onnx.ModelProto:
    """A batchable slow model: ``iterations`` chained [batch, 256] x [256, 256] products."""
    return parse(
        f"""
        slowb (float[batch, 256] x) => (float[batch, 256] y) {{
            count = Constant <value = int64 {{{iterations}}}> ()
            cond = Constant <value = bool {{1}}> ()
            y = Loop(count, cond, x) <body = step (int64 i, bool c_in, float[batch, 256] acc)
                => (bool c_out, float[batch, 256] next) {{
                    c_out = Identity(c_in)
                    ones = Constant <value = float[256, 256] {{{", ".join(["0.001"] * 256 * 256)}}}> ()
                    next = MatMul(acc, ones)
                }}>
        }}
        """
    )


def offset_model(offset: float) -> onnx.ModelProto:
    """x + offset: which version answered is visible in the output."""
    return parse(
        f"""
        offset (float[batch, 1] x) => (float[batch, 1] y) {{
            shift = Constant <value = float[1] {{{offset}}}> ()
            y = Add(x, shift)
        }}
        """
    )


def _paced_products(size: int) -> str:
    """Graph lines that run ``count`` (an int64 scalar defined before them) chained size x size matrix
    products and define ``nothing``, a float zero that depends on them (add it to an output)."""
    return f"""
            cond = Constant <value = bool {{1}}> ()
            shape = Constant <value = int64[2] {{{size}, {size}}}> ()
            start = ConstantOfShape <value = float[1] {{0.001}}> (shape)
            last = Loop(count, cond, start) <body = step (int64 i, bool c_in, float[{size}, {size}] acc)
                => (bool c_out, float[{size}, {size}] next) {{
                    c_out = Identity(c_in)
                    prod = MatMul(acc, acc)
                    eps = Constant <value = float[1] {{0.0001}}> ()
                    next = Add(prod, eps)
                }}>
            total = ReduceSum <keepdims = 0> (last)
            zero = Constant <value = float {{0.0}}> ()
            nothing = Mul(total, zero)
    """


def value_paced_model(name: str, size: int) -> onnx.ModelProto:
    """y = x, after max(x) chained size x size matrix products: the client picks how long a run takes
    (the largest input value is the number of products). A small epsilon keeps the products finite."""
    return parse(
        f"""
        {name} (float[batch, 1] x) => (float[batch, 1] y) {{
            top = ReduceMax <keepdims = 0> (x)
            count = Cast <to = 7> (top)
            {_paced_products(size)}
            y = Add(x, nothing)
        }}
        """
    )


def value_paced_text_model(size: int = 64) -> onnx.ModelProto:
    """A token graph (``input_ids``, ``attention_mask``) that runs max(input_ids) chained size x size matrix
    products before it answers each row's token count: beside a tokenizer it is a text model whose texts
    run at once (their ids are a vocabulary's), and a client that sends ``input_ids`` itself picks how long
    a run takes."""
    return parse(
        f"""
        paced_text (int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask)
            => (float[batch, 1] tokens) {{
            count = ReduceMax <keepdims = 0> (input_ids)
            {_paced_products(size)}
            axes = Constant <value = int64[1] {{1}}> ()
            counted = ReduceSum <keepdims = 1> (attention_mask, axes)
            real = Cast <to = 1> (counted)
            tokens = Add(real, nothing)
        }}
        """
    )


def value_sized_models() -> dict[str, onnx.ModelProto]:
    """Models whose OUTPUT size is an input VALUE (not a shape): one tiny request can ask for any size.

    ``n`` is an INT64 scalar-like [1] tensor; each model answers a float tensor of about ``n`` elements:
    ConstantOfShape, Expand, Tile, Range, and a Loop whose trip count is ``n`` (one scan output row per
    iteration)."""
    return {
        "fill": parse(
            """
            fill (int64[1] n) => (float[m] y) {
                y = ConstantOfShape <value = float[1] {1.0}> (n)
            }
            """
        ),
        "expand": parse(
            """
            expand (int64[1] n) => (float[m] y) {
                one = Constant <value = float[1] {1.0}> ()
                y = Expand(one, n)
            }
            """
        ),
        "tile": parse(
            """
            tile (int64[1] n) => (float[m] y) {
                one = Constant <value = float[1] {1.0}> ()
                y = Tile(one, n)
            }
            """
        ),
        "range": parse(
            """
            range (int64[1] n) => (int64[m] y) {
                zero = Constant <value = int64 {0}> ()
                step = Constant <value = int64 {1}> ()
                axes = Constant <value = int64[1] {0}> ()
                limit = Squeeze(n, axes)
                y = Range(zero, limit, step)
            }
            """
        ),
        "loop": parse(
            """
            loop (int64[1] n) => (float[m, 1024] y) {
                axes = Constant <value = int64[1] {0}> ()
                count = Squeeze(n, axes)
                cond = Constant <value = bool {1}> ()
                y = Loop(count, cond) <body = step (int64 i, bool c_in) => (bool c_out, float[1024] row) {
                    c_out = Identity(c_in)
                    width = Constant <value = int64[1] {1024}> ()
                    row = ConstantOfShape <value = float[1] {1.0}> (width)
                }>
            }
            """
        ),
    }


DIVISION_HEADER = '<ir_version: 8, opset_import: ["" : 17, "local" : 1]>'


def integer_division_models() -> dict[str, onnx.ModelProto]:
    """Integer ``Div`` of two client inputs, where ONNX Runtime's kernel traps on INT_MIN / -1: int64 and
    int32 in the main graph, in an If branch, in a Loop body and in a model-local function."""
    graphs = {
        "div64": "g (int64[n] a, int64[n] b) => (int64[n] y) { y = Div(a, b) }",
        "div32": "g (int32[n] a, int32[n] b) => (int32[n] y) { y = Div(a, b) }",
        "div_if": """
            g (int64[n] a, int64[n] b) => (int64[n] y) {
                yes = Constant <value = bool {1}> ()
                y = If(yes) <then_branch = t () => (int64[n] q) { q = Div(a, b) },
                             else_branch = e () => (int64[n] d) { d = Sub(a, b) }>
            }""",
        "div_loop": """
            g (int64[n] a, int64[n] b) => (int64[n] y) {
                trips = Constant <value = int64 {1}> ()
                go = Constant <value = bool {1}> ()
                y = Loop(trips, go, a) <body = body (int64 i, bool c, int64[n] v) => (bool c2, int64[n] v2) {
                    c2 = Identity(c)
                    v2 = Div(v, b)
                }>
            }""",
        "div_function": """
            g (int64[n] a, int64[n] b) => (int64[n] y) { y = local.divide(a, b) }
            <domain: "local", opset_import: ["" : 17]>
            divide (x, z) => (q) { q = Div(x, z) }""",
    }
    models = {}
    for name, text in graphs.items():
        model = onnx.parser.parse_model(f"{DIVISION_HEADER}\n{text}")
        onnx.checker.check_model(model, full_check=True)
        models[name] = model
    return models


def always_min_by_minus_one() -> onnx.ModelProto:
    """An int64 ``Div`` that is INT_MIN / -1 whatever its input holds: any run of it traps unguarded, the
    sample inputs of a diff included."""
    model = onnx.parser.parse_model(
        f"""{DIVISION_HEADER}
        g (int64[n] x) => (int64[n] y) {{
            zero = Constant <value = int64 {{0}}> ()
            low = Constant <value = int64 {{{-(2**63)}}}> ()
            one = Constant <value = int64 {{1}}> ()
            nothing = Mul(x, zero)
            dividend = Add(nothing, low)
            divisor = Sub(nothing, one)
            y = Div(dividend, divisor)
        }}"""
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def truncated_quotients(a: Sequence[int], b: Sequence[int], bits: int) -> list[int]:
    """What an integer Div answers: quotients rounded toward zero, wrapped to ``bits`` in two's complement
    (so the type's minimum divided by -1 is the minimum)."""
    quotients = []
    for x, y in zip(a, b, strict=True):
        q = abs(x) // abs(y) * (1 if (x < 0) == (y < 0) else -1)
        quotients.append((q + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1))
    return quotients


def division_guard_evasions() -> dict[str, onnx.ModelProto]:
    """int64 ``Div`` of the client's ``a`` and ``b`` (and, for the If models, ``c`` true picks it) that a red
    team hid from a guard reading names model-wide or failing open: the If branch's divisor named like the
    other branch's constant 2 (``sibconst``) or like that branch's declared float (``sibtype``); a Loop body's
    names declared float by the main graph's value_info (``outervi``); operands made by
    ``com.microsoft::Range``, which ONNX shape inference cannot type (``msrange``)."""
    a, b = (h.make_tensor_value_info(name, T.INT64, [None]) for name in "ab")
    c = h.make_tensor_value_info("c", T.BOOL, [])
    y = h.make_tensor_value_info("y", T.INT64, None)

    def model(graph: onnx.GraphProto, *domains: str) -> onnx.ModelProto:
        opsets = [h.make_opsetid("", 17), *(h.make_opsetid(domain, 1) for domain in domains)]
        made = h.make_model(graph, opset_imports=opsets)
        made.ir_version = 8
        return made

    def constant(name: str, value: np.ndarray) -> onnx.NodeProto:
        return h.make_node("Constant", [], [name], value=nh.from_array(value))

    def branches(then: onnx.GraphProto, otherwise: onnx.GraphProto) -> onnx.GraphProto:
        node = h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=otherwise)
        return h.make_graph([node], "g", [a, b, c], [y])

    q, q2 = (h.make_tensor_value_info(name, T.INT64, None) for name in ("q", "q2"))
    then = h.make_graph([h.make_node("Identity", ["b"], ["d"]), h.make_node("Div", ["a", "d"], ["q"])], "then", [], [q])
    otherwise = h.make_graph(
        [constant("d", np.array(2, np.int64)), h.make_node("Div", ["a", "d"], ["q2"])], "else", [], [q2]
    )
    sibconst = branches(then, otherwise)
    then = h.make_graph(
        [
            h.make_node("Identity", ["a"], ["n"]),
            h.make_node("Identity", ["b"], ["d"]),
            h.make_node("Div", ["n", "d"], ["q"]),
        ],
        "then",
        [],
        [q],
    )
    floats = [h.make_tensor_value_info(name, T.FLOAT, [1]) for name in ("n", "d")]
    otherwise = h.make_graph(
        [
            constant("n", np.array([1.0], np.float32)),
            constant("d", np.array([1.0], np.float32)),
            h.make_node("Div", ["n", "d"], ["qf"]),
            h.make_node("Cast", ["qf"], ["q2"], to=T.INT64),
        ],
        "else",
        [],
        [q2],
        value_info=floats,
    )
    sibtype = branches(then, otherwise)
    body = h.make_graph(
        [
            h.make_node("Identity", ["cond"], ["co"]),
            h.make_node("Identity", ["a"], ["n"]),
            h.make_node("Identity", ["b"], ["d"]),
            h.make_node("Div", ["n", "d"], ["q"]),
        ],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond", T.BOOL, [])],
        [h.make_tensor_value_info("co", T.BOOL, []), q],
    )
    outervi = h.make_graph(
        [
            constant("trip", np.array(1, np.int64)),
            h.make_node("Loop", ["trip", ""], ["ys"], body=body),
            h.make_node("Squeeze", ["ys"], ["y"]),
        ],
        "g",
        [a, b],
        [y],
        value_info=[h.make_tensor_value_info(name, T.FLOAT, None) for name in ("n", "d")],
    )
    msrange = h.make_graph(
        [
            constant("one", np.array(1, np.int64)),
            h.make_node("Squeeze", ["a"], ["as"]),
            h.make_node("Squeeze", ["b"], ["bs"]),
            h.make_node("Add", ["as", "one"], ["al"]),
            h.make_node("Add", ["bs", "one"], ["bl"]),
            h.make_node("Range", ["as", "al", "one"], ["n"], domain="com.microsoft"),
            h.make_node("Range", ["bs", "bl", "one"], ["d"], domain="com.microsoft"),
            h.make_node("Div", ["n", "d"], ["q"]),
            h.make_node("Cast", ["q"], ["y"], to=T.INT64),
        ],
        "g",
        [h.make_tensor_value_info(name, T.INT64, [1]) for name in "ab"],
        [y],
    )
    return {
        "sibconst": model(sibconst),
        "sibtype": model(sibtype),
        "outervi": model(outervi),
        "msrange": model(msrange, "com.microsoft"),
    }


def total_model() -> onnx.ModelProto:
    """The sum of a FP32 vector of any length (a small answer to a large request)."""
    return parse(
        """
        total (float[n] x) => (float total) {
            total = ReduceSum <keepdims = 0> (x)
        }
        """
    )
