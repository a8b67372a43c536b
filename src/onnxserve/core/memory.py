"""Giving memory back to the system after a run that needed a lot of it.

ONNX Runtime (with its CPU arena off, onnxserve's default) allocates through the C library. Large
blocks go back to the system when freed, but a run that made many small ones (a Loop whose trip count
came from the input makes one tensor per iteration) leaves them in the allocator's free lists: the
process keeps its peak, and the next large request fails under a memory limit. After such a run,
``give_back_free_memory`` asks glibc to return free pages (``malloc_trim``); elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim


_TRIM = _malloc_trim()


def give_back_free_memory() -> None:
    """Return the C allocator's free memory to the system (glibc only; a no-op elsewhere)."""
    if _TRIM is not None:
        _TRIM(0)
