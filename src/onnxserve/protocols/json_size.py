"""Bounds on the size of JSON answers, computed from shapes and datatypes before they are written, and
the buffer that stops writing one once it passes ``--max-response-bytes``.

The JSON text of a tensor is several times the tensor (``false,`` is 6 bytes for a 1-byte BOOL, ``-128,``
5 for an INT8, a control character in a text ``\\u0001``, 6 for one byte). Every JSON answer (KServe V2
REST, TF Serving REST) is bounded here before a byte of it is written: an answer whose smallest possible
text is above the limit is refused at once, and the in-flight budget holds its largest possible text (at
most the limit) while it is written, into a :class:`Body` that stops at the limit.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# The widest text of one element of each numpy kind/size, as orjson or the standard library writes it.
_WIDEST_FLOAT = len("-2.2250738585072014e-308")
_WIDEST_INT = {1: 4, 2: 6, 4: 11, 8: 20}
_WIDEST_UINT = {1: 3, 2: 5, 4: 10, 8: 20}
_BYTES_ELEMENT = len('{"b64":""}')  # a non-UTF-8 element (TF Serving), besides its base64 text

_SHORT_ESCAPES = np.array([0x08, 0x09, 0x0A, 0x0C, 0x0D], dtype=np.uint8)  # \b \t \n \f \r
_TEXT_SLICE_BYTES = 1 << 23
"""Bytes of text joined at once to count their escapes."""


class Full(Exception):
    """The text passed the limit (raised while writing; the caller drops what was written)."""


@dataclass(frozen=True)
class Bounds:
    """The smallest and largest size an answer's text can take."""

    least: int
    most: int

    def __add__(self, other: Bounds) -> Bounds:
        return Bounds(self.least + other.least, self.most + other.most)

    @staticmethod
    def exact(size: int) -> Bounds:
        return Bounds(size, size)


def structure(shape: Sequence[int]) -> int:
    """Brackets and commas of a value of ``shape`` written as nested lists."""
    total, lists = 0, 1
    for dim in shape:
        total += lists * (2 + max(0, dim - 1))
        lists *= dim
    return total


def element_bounds(array: npt.NDArray[Any]) -> Bounds:
    """The text of ``array``'s elements (no brackets or commas) as orjson or the standard library writes
    them: numbers from the widest and narrowest text of their kind; texts from their bytes (escapes up to
    six times, or base64 in ``{"b64": ...}``)."""
    count = array.size
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind == "O":
        lengths = sum(len(v) if isinstance(v, bytes) else len(str(v).encode("utf-8")) for v in array.flat)
        return Bounds(2 * count, 6 * lengths + (2 + _BYTES_ELEMENT) * count)
    if kind == "b":
        return Bounds(4 * count, 5 * count)
    if kind == "f":
        return Bounds(count, _WIDEST_FLOAT * count)
    widest = (_WIDEST_INT if kind == "i" else _WIDEST_UINT).get(size, 20)
    return Bounds(count, widest * count)


def orjson_strings_length(items: Iterable[bytes]) -> int:
    """The exact size of ``items`` (UTF-8 texts) written by orjson as JSON strings, quotes included and
    commas not: every byte once, ``"`` and ``\\`` escaped in 2, control characters in 2 (``\\n``) or 6
    (``\\u0001``). Counted with numpy, a few MiB of text at a time."""
    total = 0
    batch: list[bytes] = []
    held = 0
    for item in items:
        total += 2 + len(item)
        batch.append(item)
        held += len(item)
        if held >= _TEXT_SLICE_BYTES:
            total += _escapes(b"".join(batch))
            batch, held = [], 0
    return total + _escapes(b"".join(batch))


def _escapes(text: bytes) -> int:
    """Bytes orjson adds to ``text`` by escaping it."""
    if not text:
        return 0
    raw = np.frombuffer(text, dtype=np.uint8)
    control = int(np.count_nonzero(raw < 0x20))
    short = int(np.count_nonzero(np.isin(raw, _SHORT_ESCAPES)))
    quoted = int(np.count_nonzero((raw == 0x22) | (raw == 0x5C)))
    return 5 * control - 4 * short + quoted


class Body:
    """An answer's text as it is written; :class:`Full` once it passes ``limit`` (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = io.BytesIO()

    def write(self, chunk: bytes | memoryview) -> None:
        self.buffer.write(chunk)
        if self.limit and self.buffer.tell() > self.limit:
            raise Full

    def size(self) -> int:
        return self.buffer.tell()

    def drop(self) -> None:
        self.buffer.close()

    def value(self) -> bytes:
        return self.buffer.getvalue()
