"""Input specs for exporters: ``name:shape:dtype``, with symbolic dims, e.g. ``image:batch,3,32,32:float32``.

A dim is a positive integer or a name (a Python identifier). Dims that share a name are the same
size across every input of a model; the exporter keeps them dynamic in the ONNX graph and validation
tries several sizes for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import helper

from onnxserve.errors import ExportError
from onnxserve.toolkit.sample_inputs import Dim, random_feeds

DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name)
    for name in ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
"""Element types an input spec may name (numpy's names)."""

_EXAMPLE = "image:batch,3,32,32:float32"


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, its dims (sizes or symbolic names) and its numpy element type."""

    name: str
    dims: tuple[int | str, ...]
    dtype: str

    @property
    def symbols(self) -> tuple[str, ...]:
        """The symbolic dims, in order."""
        return tuple(d for d in self.dims if isinstance(d, str))

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape with each symbolic dim replaced by ``sizes[name]``."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)

    def __str__(self) -> str:
        return f"{self.name}:{','.join(str(d) for d in self.dims)}:{self.dtype}"


def parse_input_spec(text: str) -> InputSpec:
    """``name:shape:dtype`` -> InputSpec; an ExportError says what is wrong and shows an example."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[0]:
        raise ExportError(f"--input {text!r}: expected NAME:SHAPE:DTYPE, e.g. {_EXAMPLE}")
    name, shape, dtype = parts
    dims: list[int | str] = []
    for item in shape.split(",") if shape else []:
        item = item.strip()
        if item.isascii() and item.isdigit() and int(item) > 0:
            dims.append(int(item))
        elif item.isidentifier():
            dims.append(item)
        else:
            raise ExportError(
                f"--input {text!r}: dim {item!r} is neither a positive size nor a symbolic name; e.g. {_EXAMPLE}"
            )
    if dtype not in DTYPES:
        raise ExportError(f"--input {text!r}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return InputSpec(name, tuple(dims), dtype)


def check_unique(specs: Sequence[InputSpec]) -> None:
    """Refuse two inputs with one name."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ExportError(f"--input {spec.name!r} is given twice; every input needs its own name")
        seen.add(spec.name)


def random_inputs(
    specs: Sequence[InputSpec],
    sizes: Mapping[str, int],
    rng: np.random.Generator,
    bounds: Mapping[str, int] | None = None,
) -> dict[str, npt.NDArray[Any]]:
    """Random values for ``specs`` by the toolkit's one generator
    (:func:`onnxserve.toolkit.sample_inputs.random_feeds`): standard normal floats, fair booleans and
    its integer rule (below the table an input indexes, given ``bounds`` from the exported graph; type
    ids zeros, masks ones, else [0, 10)). Symbolic dims take ``sizes``."""
    spec = {s.name: (helper.np_dtype_to_tensor_dtype(DTYPES[s.dtype]), list[Dim](s.dims)) for s in specs}
    return random_feeds(spec, bounds or {}, rng, sizes=sizes)
