"""Giving memory back to the system after a run that needed a lot of it.

ONNX Runtime (with its CPU arena off, onnxserve's default) allocates through the C library. Large
blocks go back to the system when freed, but a run that made many small ones (a Loop whose trip count
came from the input makes one tensor per iteration) leaves them in the allocator's free lists: the
process keeps its peak, and the next large request fails under a memory limit. After such a run,
``give_back_free_memory`` asks glibc to return free pages (``malloc_trim``); elsewhere it does nothing.

glibc also gives each thread that meets contention an arena of its own, up to 8 per CPU, and each arena
reserves 64 to 128 MiB of address space that it never returns. Under an address-space limit (``ulimit -v``,
a container's) a server with many worker threads reached the limit with its arenas alone, after which an
ordinary request could fail to allocate anywhere (or a library could not be mapped).
``limit_malloc_arenas`` caps their number at server start (``mallopt(M_ARENA_MAX)``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter for the most arenas (``malloc.h``)."""

ARENA_ENVIRONMENT = "MALLOC_ARENA_MAX"
"""glibc's own setting for it: when the environment sets it, onnxserve leaves it as set."""


def _glibc(symbol: str) -> Callable[..., Any] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function: Callable[..., Any] = getattr(ctypes.CDLL(name), symbol)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    return function


_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")


def default_arena_count() -> int:
    """Two arenas per CPU, at most 8: enough for the worker threads, a bounded reservation."""
    return min(8, 2 * (os.cpu_count() or 1))


def limit_malloc_arenas(count: int | None = None) -> bool:
    """Cap the C allocator's arenas (glibc only; call before thread pools start). Returns whether it did:
    not where the C library is not glibc, nor where ``MALLOC_ARENA_MAX`` is set in the environment."""
    if _MALLOPT is None or os.environ.get(ARENA_ENVIRONMENT):
        return False
    arenas = count or default_arena_count()
    done = bool(_MALLOPT(M_ARENA_MAX, arenas))
    if done:
        log.debug("malloc arenas capped at %d", arenas)
    return done


def give_back_free_memory() -> None:
    """Return the C allocator's free memory to the system (glibc only; a no-op elsewhere)."""
    if _TRIM is not None:
        started, cpu = time.perf_counter(), time.thread_time()
        _TRIM(0)
        log.debug(
            "malloc_trim gave free memory back in %.1f ms (%.1f ms of CPU)",
            (time.perf_counter() - started) * 1e3,
            (time.thread_time() - cpu) * 1e3,
        )
