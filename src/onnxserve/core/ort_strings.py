"""The bytes an ONNX Runtime string tensor holds, read before any of it becomes a Python object.

ONNX Runtime's Python API turns a string tensor into Python objects all at once (``OrtValue.numpy()``):
a model whose string outputs are long would have them all built (gigabytes) before their size could be
checked. On the CPU a string tensor is an array of C++ ``std::string``; ONNX Runtime's Linux builds use
libstdc++, whose ``std::string`` takes 32 bytes (data pointer, length, inline buffer), so each element's
UTF-8 length is the second 8-byte word of its slot. :func:`string_bytes` sums those words through a
numpy view of the tensor's own buffer: nothing is copied and no pointer is followed.

That layout is ONNX Runtime's build detail, not its API, so it is checked once in this process
(``core.runtime.string_layout_holds``) on a
tensor of known strings that ONNX Runtime itself made (lengths 0 to 1000, inline and on the heap,
multi-byte UTF-8), and every tensor must report 32 bytes per element. Where either does not hold
(another C++ library, another build, another device) :func:`string_bytes` answers None, and the caller
counts while it converts instead.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

SLOT_BYTES = 32
"""``sizeof(std::string)`` in libstdc++ (the C++11 ABI): pointer, length, 16-byte inline buffer."""

_WORDS = SLOT_BYTES // 8
_LENGTH_WORD = 1

_KNOWN = ["", "a", "x" * 15, "y" * 16, "é" * 7, "z" * 1000, "日本語", "q" * 31]
"""Strings whose lengths the layout check reads back: empty, inline (up to 15 bytes), heap, non-ASCII."""


def string_bytes(value: Any, layout_read: bool) -> int | None:
    """The UTF-8 bytes of all elements of ONNX Runtime string tensor ``value`` (an ``OrtValue``), or None
    when this build's layout cannot be read (``layout_read``: what :func:`layout_holds` found; then
    convert and count)."""
    count = math.prod(value.shape())
    if count == 0:
        return 0
    if not layout_read or value.device_name().lower() != "cpu" or value.tensor_size_in_bytes() != count * SLOT_BYTES:
        return None
    return int(_lengths(value.data_ptr(), count).sum())


def _lengths(address: int, count: int) -> Any:
    """A read-only numpy view of the length words of ``count`` slots starting at ``address``."""
    words = np.ctypeslib.as_array((ctypes.c_uint64 * (count * _WORDS)).from_address(address))
    words.flags.writeable = False
    return words[_LENGTH_WORD::_WORDS]


def known_strings_model() -> onnx.ModelProto:
    """A graph that outputs ``y``: a string tensor of known lengths, for :func:`layout_holds`."""
    known: list[Any] = [s.encode() for s in _KNOWN]
    tensor = helper.make_tensor("known", TensorProto.STRING, [len(_KNOWN)], known)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=tensor), helper.make_node("Identity", ["c"], ["y"])],
        "string_layout",
        [],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [len(_KNOWN)])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def layout_holds(known: Callable[[], Any]) -> bool:
    """Whether this ONNX Runtime's string tensors have the layout :func:`string_bytes` reads: ``known()``
    runs :func:`known_strings_model` and returns its ``y`` as an ``OrtValue`` (core/runtime.py, the one
    place that makes sessions, checks this once per process)."""
    try:
        value = known()
        if value.tensor_size_in_bytes() != len(_KNOWN) * SLOT_BYTES:
            return _unreadable(f"{value.tensor_size_in_bytes()} bytes for {len(_KNOWN)} strings")
        found = [int(n) for n in _lengths(value.data_ptr(), len(_KNOWN))]
    except Exception as e:  # ONNX Runtime's error types are not part of its public API
        return _unreadable(str(e))
    expected = [len(s.encode()) for s in _KNOWN]
    if found != expected:
        return _unreadable(f"lengths {found}, expected {expected}")
    return True


def _unreadable(why: str) -> bool:
    log.info("string outputs are counted while they are converted (ONNX Runtime's string layout: %s)", why)
    return False
