"""The toolkit's one generator of random inputs that fit a model's signature: used by ``diff``, by
``optimize`` / ``tune`` through :mod:`onnxserve.toolkit.samples`, and by the exporters' validation
through :mod:`onnxserve.toolkit.export.inputs`.

Fixed dims are kept; a symbolic dim gets one value per symbol name (``batch_size`` stays equal across
inputs): the size the caller gives for that symbol, else the batch size when first seen on the first
axis and the sequence length elsewhere (2 and 8 by default). The one integer rule: an integer input
that indexes a table (the indices of a ``Gather`` over an initializer, e.g. token ids into an
embedding) is drawn below that table's size; token-type / segment ids are zeros; masks are ones (an
attention mask that keeps every token); other integers are drawn from [0, 10). Booleans are random;
floats are standard normal.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from onnxserve.errors import InvalidInputError

Dim = int | str | None

SMALL_INTEGERS = 10
"""Integers that neither index a table nor name a mask or a type id are drawn from [0, SMALL_INTEGERS)."""


def signature(graph: onnx.GraphProto, which: str = "input") -> dict[str, tuple[int, list[Dim]]]:
    """Graph inputs (or outputs) -> (ONNX element type, dims: int, symbol name or None)."""
    initializers = {t.name for t in graph.initializer}
    values = graph.input if which == "input" else graph.output
    result: dict[str, tuple[int, list[Dim]]] = {}
    for value in values:
        if which == "input" and value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims: list[Dim] = []
        if tensor.HasField("shape"):
            for d in tensor.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
        result[value.name] = (tensor.elem_type, dims)
    return result


def index_bounds(graphs: Iterable[onnx.GraphProto]) -> dict[str, int]:
    """Graph input -> the smallest table size it indexes through ``Gather`` (directly or via ``Cast``)."""
    bounds: dict[str, int] = {}
    for graph in graphs:
        tables = {t.name: list(t.dims) for t in graph.initializer}
        inputs = {i.name for i in graph.input}
        alias = {name: name for name in inputs}
        for node in graph.node:  # topological: a Cast of an input is seen before its consumers
            if node.op_type == "Cast" and node.input and node.input[0] in alias:
                alias[node.output[0]] = alias[node.input[0]]
        for node in graph.node:
            if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in alias:
                continue
            dims = tables.get(node.input[0])
            if not dims:
                continue
            axis = next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == "axis"), 0)
            size = dims[axis]
            name = alias[node.input[1]]
            bounds[name] = min(bounds.get(name, size), size)
    return bounds


def generate(
    spec: Mapping[str, tuple[int, list[Dim]]], bounds: Mapping[str, int], seed: int = 0
) -> dict[str, npt.NDArray[Any]]:
    """One random array per input of ``spec``."""
    return random_feeds(spec, bounds, np.random.default_rng(seed))


def random_feeds(
    spec: Mapping[str, tuple[int, list[Dim]]],
    bounds: Mapping[str, int],
    rng: np.random.Generator,
    batch: int = 2,
    sequence: int = 8,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, npt.NDArray[Any]]:
    """One random array per input of ``spec``, drawn from ``rng`` (the rules in the module's doc);
    ``sizes`` fixes the size of symbolic dims by name."""
    symbols: dict[str, int] = dict(sizes or {})
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, (elem_type, dims) in spec.items():
        shape: list[int] = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str):
                shape.append(symbols.setdefault(d, batch if axis == 0 else sequence))
            else:
                shape.append(batch if axis == 0 else sequence)
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        except KeyError:
            raise InvalidInputError(f"input {name!r}: cannot make sample values of ONNX type {elem_type}") from None
        lowered = name.lower()
        if dtype == np.bool_:
            arrays[name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif dtype.kind in "iu":
            if name in bounds:
                arrays[name] = rng.integers(0, max(bounds[name], 1), size=shape).astype(dtype)
            elif "type" in lowered or "segment" in lowered:
                arrays[name] = np.zeros(shape, dtype=dtype)
            elif "mask" in lowered:
                arrays[name] = np.ones(shape, dtype=dtype)
            else:
                arrays[name] = rng.integers(0, SMALL_INTEGERS, size=shape).astype(dtype)
        elif dtype.kind == "f":
            arrays[name] = rng.standard_normal(size=shape).astype(dtype)
        else:
            raise InvalidInputError(f"input {name!r}: cannot make sample values of type {dtype}; give samples")
    return arrays


def load_samples(path: Path, spec: Mapping[str, tuple[int, list[Dim]]]) -> dict[str, npt.NDArray[Any]]:
    """Sample inputs from ``.npz`` (arrays by input name) or ``.json`` (``{name: nested list}``, cast to
    the type ``spec`` gives that input)."""
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such samples file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: np.asarray(data[name]) for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise InvalidInputError(f"{path}: not a readable .npz file ({e})") from None
    if path.suffix == ".json":
        try:
            document = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidInputError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(document, dict):
            raise InvalidInputError(f"{path}: expected a JSON object {{input name: nested list of values}}")
        arrays: dict[str, npt.NDArray[Any]] = {}
        for name, values in document.items():
            if name not in spec:
                raise InvalidInputError(f"{path}: {name!r} is not an input of the model (inputs: {', '.join(spec)})")
            try:
                arrays[name] = np.asarray(values, dtype=helper.tensor_dtype_to_np_dtype(spec[name][0]))
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"{path}: input {name!r}: {e}") from None
        return arrays
    raise InvalidInputError(f"{path}: samples must be a .npz or .json file")
