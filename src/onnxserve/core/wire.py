"""Tensors on the wire <-> numpy: the one codec every protocol decodes and encodes with.

KServe V2 REST (JSON and the binary extension), KServe V2 gRPC (typed contents and raw contents) and
TF Serving REST all call these functions, so a bad tensor gets the same check and the same message on
every protocol. Protocol modules only find the pieces in their own envelope (a JSON key, a protobuf
field) and hand them here.

The checks, each done once, where a value enters:

- **Shape** (:func:`request_shape`): integers, not negative, at most :data:`MAX_RANK` dimensions,
  no dimension and no product of the non-zero dimensions above :data:`MAX_ELEMENTS`.
- **Count**: the data holds exactly as many elements as the shape declares; a BYTES tensor holds at
  most :data:`MAX_BYTES_ELEMENTS` elements, and so do all BYTES inputs of one request together
  (:func:`check_request_bytes`; each element is a Python object in memory).
- **Kind and range**: numbers for numeric datatypes, integers for integer ones, booleans for BOOL;
  integers within the datatype's range, checked exactly (beyond int64 too).
- **Raw layout**: the byte count a shape and datatype need; BYTES length prefixes that stay inside
  the data.

Zero copy where numpy allows: raw inputs are ``np.frombuffer`` views of the received buffer, JSON
values are converted with ``astype(copy=False)``, raw outputs are buffers of the output arrays that the
caller joins once, and a BYTES element is converted once each way (text <-> bytes).

This module sits below ``core/validation.py`` and imports only datatypes and types, so a decode never
loads the registry or ONNX Runtime.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from onnxserve.core.datatypes import DataType
from onnxserve.core.types import InferenceResponse, Tensor, TensorSpec
from onnxserve.errors import InvalidInputError, TooLargeError

MAX_ELEMENTS = 2**40
"""More elements than any request can carry: larger declared shapes are refused before any allocation."""

MAX_RANK = 32
"""The most dimensions a request tensor may have (numpy's own limit)."""

MAX_BYTES_ELEMENTS = 1 << 20
"""The most BYTES elements one request may hold, all its inputs together (so one tensor too): each is a
Python object, so memory and time grow with it."""

_LENGTH = struct.Struct("<I")
_KIND_WORDS = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}
_ACCEPTED_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_FOUND_WORDS = {"f": "non-integer numbers", "U": "strings", "S": "strings", "b": "booleans", "O": "non-numeric values"}

BytesLeaf = Callable[[str, Any], bytes]
"""Turns one wire element of a BYTES tensor into bytes (``where`` names the tensor for errors)."""


# --- shapes ----------------------------------------------------------------------------------------


def format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def request_shape(name: str, dims: Sequence[Any]) -> tuple[int, ...]:
    """A request tensor's declared shape, refused when a dimension is not a non-negative integer or the size absurd."""
    if len(dims) > MAX_RANK:  # first: 66 million dimensions were each looked at, then copied (outside attack rt56)
        raise InvalidInputError(f"input {name!r}: shape has {len(dims)} dimensions; at most {MAX_RANK} are allowed")
    if not all(type(d) is int for d in dims):
        raise InvalidInputError(f"input {name!r}: the shape must be a list of integers")
    shape = tuple(dims)
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape {format_shape(shape)} has a negative dimension")
    count = 1
    for d in shape:
        count *= max(d, 1)  # a zero dimension does not make the others harmless: numpy sizes them too
        if count > MAX_ELEMENTS:
            raise InvalidInputError(f"input {name!r}: shape {format_shape(shape)} declares too many elements")
    return shape


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def count_error(where: str, given: int, shape: Sequence[int], data: str = "data") -> InvalidInputError:
    """The one message for data that holds more or fewer elements than its shape; ``data`` names the field."""
    return InvalidInputError(
        f"{where}: {data} has {given} elements but shape {format_shape(shape)} needs {element_count(shape)}"
    )


def check_bytes_count(where: str, count: int) -> None:
    if count > MAX_BYTES_ELEMENTS:
        raise InvalidInputError(
            f"{where}: {count} BYTES elements; at most {MAX_BYTES_ELEMENTS} are allowed in one tensor"
        )


def check_request_bytes(inputs: Sequence[Tensor]) -> None:
    """Refuse a request whose BYTES inputs hold more than :data:`MAX_BYTES_ELEMENTS` elements together:
    the per-tensor limit alone lets many tensors of a million strings each through."""
    count = sum(t.data.size for t in inputs if t.datatype.is_bytes)
    if count > MAX_BYTES_ELEMENTS:
        raise InvalidInputError(
            f"the request's inputs hold {count} BYTES elements together; at most {MAX_BYTES_ELEMENTS} are "
            "allowed in one request"
        )


def unknown_input_error(
    name: str, model: str, inputs: Sequence[TensorSpec], text_inputs: Sequence[str] = ()
) -> InvalidInputError:
    """The one message for an input name the model does not have, on every protocol (a model that takes
    text lists its text inputs too)."""
    expected = ", ".join(describe(s) for s in inputs)
    return InvalidInputError(
        f"unknown input {name!r} for model {model!r}; expected inputs: {expected}" + text_inputs_hint(text_inputs)
    )


def text_inputs_hint(text_inputs: Sequence[str]) -> str:
    """``"; or send text as 'text' (BYTES [-1])"``, for a model that takes text; "" for one that does not."""
    if not text_inputs:
        return ""
    return "; or send text as " + " and ".join(f"{name!r} (BYTES [-1])" for name in text_inputs)


def describe(spec: TensorSpec) -> str:
    return f"{spec.name!r} ({spec.datatype.v2} {format_shape(spec.shape)})"


# --- raw bytes (HTTP binary extension, gRPC raw contents) ----------------------------------------


def from_raw(name: str, dtype: DataType, shape: tuple[int, ...], raw: bytes | memoryview) -> Tensor:
    """A tensor viewing ``raw``: little-endian values, or length-prefixed elements for BYTES.

    Numeric data is not copied (the array is a read-only view of ``raw``) unless it is misaligned.
    """
    where = f"input {name!r}"
    count = element_count(shape)
    if dtype.is_bytes:
        check_bytes_count(where, count)
        array = np.empty(count, dtype=object)
        array[:] = split_bytes(where, raw, count, shape)
        return Tensor(name, dtype, array.reshape(shape))
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"{where}: {len(raw)} bytes of binary data, but {dtype.v2} {format_shape(shape)} needs {expected}"
        )
    values = np.frombuffer(raw, dtype=dtype.numpy.newbyteorder("<"))
    if not values.flags.aligned:
        values = values.copy()
    return Tensor(name, dtype, values.astype(dtype.numpy, copy=False).reshape(shape))


def split_bytes(where: str, raw: bytes | memoryview, count: int, shape: Sequence[int] = ()) -> list[bytes]:
    """The elements of length-prefixed BYTES data, refused as soon as there are more than ``count``."""
    view = memoryview(raw).cast("B") if isinstance(raw, memoryview) else raw
    end = len(view)
    values: list[bytes] = []
    append = values.append
    unpack = _LENGTH.unpack_from
    offset = 0
    while offset < end:
        if len(values) == count:
            raise InvalidInputError(
                f"{where}: data has more than {count} elements but shape "
                f"{format_shape(shape or (count,))} needs {count}"
            )
        if offset + 4 > end:
            raise InvalidInputError(f"{where}: BYTES data ends inside an element's 4-byte length")
        (size,) = unpack(view, offset)
        offset += 4
        if offset + size > end:
            raise InvalidInputError(f"{where}: a BYTES element of {size} bytes runs past the data")
        append(bytes(view[offset : offset + size]))
        offset += size
    if len(values) != count:
        raise count_error(where, len(values), shape or (count,))
    return values


def to_raw(tensor: Tensor) -> bytes | memoryview:
    """A tensor's raw bytes: a view of the array when it is already little-endian and contiguous."""
    if tensor.datatype.is_bytes:
        parts: list[bytes] = []
        pack = _LENGTH.pack
        for value in tensor.data.reshape(-1):
            item = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(pack(len(item)))
            parts.append(item)
        return b"".join(parts)
    array = np.ascontiguousarray(tensor.data, dtype=tensor.datatype.numpy.newbyteorder("<"))
    return array.reshape(-1).data.cast("B") if array.size else b""


# --- values (JSON lists, protobuf repeated fields) -------------------------------------------------


def from_values(
    where: str,
    dtype: DataType,
    values: Any,
    shape: tuple[int, ...] | None = None,
    bytes_leaf: BytesLeaf | None = None,
) -> npt.NDArray[Any]:
    """``values`` (a scalar, or flat or evenly nested lists) as an array of ``dtype``.

    With ``shape`` the values must hold exactly its elements (in any nesting, row-major) and the array
    takes that shape; without it, the nesting is the shape. BYTES elements go through ``bytes_leaf``.
    """
    if dtype.is_bytes:
        return _bytes_values(where, values, shape, bytes_leaf or text_leaf)
    kind = dtype.numpy.kind
    try:
        parsed = np.asarray(values)
    except (ValueError, OverflowError):
        raise _ragged(where, kind) from None
    if shape is not None and parsed.size != element_count(shape):
        raise count_error(where, parsed.size, shape)
    if parsed.size:
        if kind in "iu" and parsed.dtype.kind in "fO":
            # Integers beyond int64 make numpy fall back to float64 or object: check them exactly.
            parsed = _exact_integers(where, dtype, values, parsed)
        if parsed.dtype.kind not in _ACCEPTED_KINDS[kind]:
            found = _FOUND_WORDS.get(parsed.dtype.kind, "integers")
            raise InvalidInputError(f"{where}: datatype {dtype.v2} needs {_KIND_WORDS[kind]}, but data holds {found}")
        if kind in "iu" and parsed.dtype.kind in "iu":
            info = np.iinfo(dtype.numpy)  # type: ignore[type-var]
            low, high = int(parsed.min()), int(parsed.max())
            if low < info.min or high > info.max:
                raise _range_error(where, dtype, low if low < info.min else high)
    with np.errstate(over="ignore", invalid="ignore"):
        array = parsed.astype(dtype.numpy, copy=False)
    return array if shape is None else array.reshape(shape)


def _ragged(where: str, kind: str) -> InvalidInputError:
    words = _KIND_WORDS.get(kind, "values")
    return InvalidInputError(
        f"{where}: data must be a flat or evenly nested list (every row the same length) of {words}"
    )


def _range_error(where: str, dtype: DataType, value: int) -> InvalidInputError:
    return InvalidInputError(f"{where}: value {value} is out of range for {dtype.v2}")


def _exact_integers(where: str, dtype: DataType, values: Any, parsed: npt.NDArray[Any]) -> npt.NDArray[Any]:
    flat = np.array(values, dtype=object).ravel().tolist()
    if not all(type(v) is int for v in flat):
        return parsed  # genuinely non-integer data: the kind check names it
    info = np.iinfo(dtype.numpy)  # type: ignore[type-var]
    for v in flat:
        if not info.min <= v <= info.max:
            raise _range_error(where, dtype, v)
    return np.array(flat, dtype=dtype.numpy).reshape(parsed.shape)


def text_leaf(where: str, item: Any) -> bytes:
    """A BYTES element sent as a JSON string (V2 REST): its UTF-8 bytes."""
    if isinstance(item, str):
        try:
            return item.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"{where}: a string holds a lone surrogate, which is not text") from None
    raise InvalidInputError(f"{where}: BYTES data must be strings, found {json_type(item)}")


def raw_leaf(where: str, item: Any) -> bytes:
    """A BYTES element that is already bytes (gRPC ``bytes_contents``)."""
    return bytes(item)


def json_type(item: Any) -> str:
    if isinstance(item, bool):
        return "a boolean"
    if isinstance(item, (int, float)):
        return "a number"
    if item is None:
        return "null"
    if isinstance(item, list):
        return "a list"
    return "an object" if isinstance(item, dict) else "a non-string value"


def _bytes_values(where: str, values: Any, shape: tuple[int, ...] | None, leaf: BytesLeaf) -> npt.NDArray[Any]:
    if shape is None:
        nested, flat = _nested_shape(where, values)
    else:
        nested = shape
        flat = _flatten(where, values, element_count(shape))
        if len(flat) != element_count(shape):
            raise count_error(where, len(flat), shape)
    check_bytes_count(where, len(flat))
    array = np.empty(len(flat), dtype=object)
    array[:] = [leaf(where, item) for item in flat]
    return array.reshape(nested)


def _flatten(where: str, values: Any, limit: int) -> list[Any]:
    """Row-major leaves of a flat or nested list (a scalar is one leaf); stops once past ``limit``."""
    if not isinstance(values, list):
        return [values]
    if not any(isinstance(v, list) for v in values):
        return values
    out: list[Any] = []
    stack = [values]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
            if len(out) > limit:
                break
    return out


def _nested_shape(where: str, values: Any) -> tuple[tuple[int, ...], list[Any]]:
    """The shape an evenly nested list declares, and its leaves; ragged nesting is refused."""
    shape: list[int] = []
    probe = values
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    level: list[Any] = [values]
    for size in shape:
        below: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                raise _ragged(where, "")
            below.extend(item)
        level = below
        check_bytes_count(where, len(level))
    if any(isinstance(item, list) for item in level):
        raise _ragged(where, "")
    return tuple(shape), level


def to_text(where: str, tensor: Tensor) -> list[str]:
    """A BYTES tensor's elements as text, row-major; bytes that are not UTF-8 are refused."""
    try:
        return [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in tensor.data.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidInputError(f"{where} holds bytes that are not UTF-8 text; request it with binary_data") from None


def output_bytes(response: InferenceResponse) -> int:
    """About how many bytes a response's tensors hold (a BYTES element counts as a pointer)."""
    return sum(int(t.data.nbytes) for t in response.outputs)


def response_too_large(
    model: str,
    size: int,
    limit: int,
    at_least: bool = False,
    encoding: str = "",
    advice: str = "smaller input values, fewer outputs",
) -> TooLargeError:
    """The refusal of an answer whose output tensors take ``size`` bytes (``at_least``: or more), above ``limit``;
    with ``encoding`` (e.g. ``"as TF Serving JSON"``), an answer that takes that many bytes once encoded so;
    ``advice`` says what to ask for instead."""
    amount = f"more than {limit} bytes" if at_least else f"{size} bytes"
    what = f"encoded {encoding}" if encoding else "of output tensors"
    return TooLargeError(
        f"model {model!r}: the response would be {amount} {what}, above the limit of {limit} "
        f"bytes (--max-response-bytes); ask for less ({advice})"
    )


def too_many_bytes_elements(
    model: str, held: str, count: int, limit: int, advice: str = "smaller input values, fewer outputs"
) -> TooLargeError:
    """The one refusal of an answer whose outputs hold more than ``limit`` (:data:`MAX_BYTES_ELEMENTS`) BYTES
    elements, each a Python object: ``held`` says which (``"output 'y' has"``), ``advice`` what to ask for."""
    return TooLargeError(
        f"model {model}: {held} {count} BYTES elements, more than the {limit} one answer may hold "
        f"(--max-response-bytes); ask for less ({advice})"
    )


SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
"""Triton's shared-memory tensor parameters: onnxserve has no shared-memory extension."""


def check_tensor_parameters(role: str, name: str, keys: Iterable[str]) -> None:
    """Refuse tensor parameters that ask for what onnxserve does not do, rather than ignore them: shared
    memory (an ignored output region would never be written; an ignored input region would be read as
    missing data) and Triton's ``classification`` output (top-k class strings). ``role``: input or output."""
    for key in keys:
        if key in SHARED_MEMORY_PARAMETERS:
            raise InvalidInputError(
                f"{role} {name!r}: parameter {key!r}: the shared-memory extension is not supported; send the "
                f"tensor's data in the request{' and read it from the answer' if role == 'output' else ''}"
            )
        if key == "classification" and role == "output":
            raise InvalidInputError(
                f"output {name!r}: parameter 'classification' is not supported; ask for the output itself "
                "and take the top classes from its scores"
            )
