"""Giving memory back to the system after a run that needed a lot of it.

ONNX Runtime (with its CPU arena off, onnxserve's default) allocates through the C library. Large
blocks go back to the system when freed, but a run that made many small ones (a Loop whose trip count
came from the input makes one tensor per iteration) leaves them in the allocator's free lists: the
process keeps its peak, and the next large request fails under a memory limit. After such a run,
``give_back_free_memory`` asks glibc to return free pages (``malloc_trim``); elsewhere it does nothing.
A trim walks the whole heap (up to 0.37 s of CPU for a fragmented one) and serves every thread's frees
before it, so trims asked for at once are shared, process-wide: one runs at a time, at most one more waits
for it, and a call that comes while one waits returns at once (the waiting one starts after its memory was
freed, so covers it). ``give_back_memory`` does it off the event loop; ``give_back_memory_later`` once
after a delay, for bursts of events that each leave a little (cut TLS connections).

glibc also gives each thread that meets contention an arena of its own, up to 8 per CPU, and each arena
reserves 64 to 128 MiB of address space that it never returns. Under an address-space limit (``ulimit -v``,
a container's) a server with many worker threads reached the limit with its arenas alone, after which an
ordinary request could fail to allocate anywhere (or a library could not be mapped).
``limit_malloc_arenas`` caps their number at server start (``mallopt(M_ARENA_MAX)``).

glibc also raises its mmap threshold as large blocks are freed (from 128 KiB up to 32 MiB): after the
first large execution, blocks of up to 32 MiB come from the arenas' heaps instead of being mapped, and a
text model's execution whose attention scores are such blocks fragments them: measured on the demo
MiniLM, one execution of 8 rows of 256 tokens (live tensors about 170 MB) peaked at 450 to 650 MB, more
than one of 16 rows (340 MB). ``fix_mmap_threshold`` fixes it at ``MMAP_THRESHOLD`` (and the heaps' trim
threshold at twice that, where glibc's adjustment would put it), so blocks that large are always mapped
and go back when freed: then 8 x 256 peaks at 171 MB.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
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


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameters for the heaps' trim threshold and the mmap threshold (``malloc.h``)."""

MMAP_THRESHOLD = 4 * 1024 * 1024
"""Blocks of at least this size are mapped and unmapped on their own (a text model's activations and
attention scores); smaller ones (short texts' tensors) come from the heaps as before."""

THRESHOLD_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc's own settings for them: when the environment sets either, onnxserve leaves both as set."""


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix the C allocator's mmap threshold (glibc only). Returns whether it did: not where the C library
    is not glibc, nor where the environment sets glibc's thresholds."""
    if _MALLOPT is None or any(os.environ.get(name) for name in THRESHOLD_ENVIRONMENT):
        return False
    done = bool(_MALLOPT(M_MMAP_THRESHOLD, threshold)) and bool(_MALLOPT(M_TRIM_THRESHOLD, 2 * threshold))
    if done:
        log.debug("malloc mmap threshold fixed at %d bytes", threshold)
    return done


class _SharedTrims:
    """``malloc_trim`` calls shared by the threads that ask at once (see the module's docstring)."""

    def __init__(self) -> None:
        self._state = threading.Lock()
        self._running = threading.Lock()
        self.queued = False  # a call waits for the running trim: later ones return at once

    def __call__(self) -> None:
        with self._state:
            if self.queued:
                return
            self.queued = True
        with self._running:
            with self._state:
                self.queued = False
            self._trim()

    @staticmethod
    def _trim() -> None:
        if _TRIM is None:
            return
        started, cpu = time.perf_counter(), time.thread_time()
        _TRIM(0)
        log.debug(
            "malloc_trim gave free memory back in %.1f ms (%.1f ms of CPU)",
            (time.perf_counter() - started) * 1e3,
            (time.thread_time() - cpu) * 1e3,
        )


_TRIMS = _SharedTrims()


def give_back_free_memory() -> None:
    """Return the C allocator's free memory to the system (glibc only; a no-op elsewhere), on this thread,
    sharing a trim with the threads that ask at the same time."""
    _TRIMS()


async def give_back_memory(executor: Executor | None = None) -> None:
    """:func:`give_back_free_memory` on ``executor`` (the loop's default: ``None``), off the event loop; at
    once when a trim already waits to run (it covers this call's frees)."""
    if _TRIM is None or _TRIMS.queued:
        return
    await asyncio.get_running_loop().run_in_executor(executor, give_back_free_memory)


_later: set[asyncio.AbstractEventLoop] = set()


def give_back_memory_later(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    """:func:`give_back_free_memory` on ``loop``'s default executor ``seconds`` from now, unless that is
    already planned: once for a burst of events that each leave a little free memory behind."""
    if _TRIM is None or loop in _later:
        return
    _later.add(loop)

    def trim() -> None:
        _later.discard(loop)
        loop.run_in_executor(None, give_back_free_memory)

    loop.call_later(seconds, trim)


def short_of_memory(size: int) -> bool:
    """Whether the process cannot map ``size`` more bytes now (its address-space limit is reached): tells
    a decoder's or a run's out-of-memory failure from bad input where they report both alike. The mapping
    is never touched, so it costs no memory."""
    try:
        with mmap.mmap(-1, max(size, 1)):
            return False
    except (OSError, MemoryError, OverflowError):
        return True


def release_frames(error: BaseException) -> None:
    """Drop the tracebacks of ``error`` and of the errors it was raised from or during.

    Call it once the error has been answered (and logged), or a failed model load reported. A frame that
    keeps its error (``refused = ...; raise refused``, or a handler that keeps what it caught) makes a
    reference cycle through the traceback, which only the garbage collector frees, and it runs on object
    counts, not bytes: refused 60 MiB gRPC messages and their tensors stayed in memory, outside every
    budget, until it happened to run; a model load that ran out of memory kept 670 MB a try (the error,
    its traceback, the frame awaiting the load, the load's future). Dropping the traceback breaks the
    cycle. The frames themselves are not cleared: one error object may be raised in several requests at
    once (a stopped scheduler's refusal), so its traceback can hold the frames of other requests'
    coroutines that still run, and clearing a suspended coroutine's frame finalizes it (its task then
    never finishes: a drain that timed out left such requests unanswered)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
