"""Decoding and encoding of large bodies, run off the event loop.

Parsing a 64 MiB JSON document or splitting a million BYTES elements takes long enough to stall every
other request and the health probes if it runs on the event loop. Work on a body of at least
:data:`INLINE_BYTES` runs in a small pool of :data:`WORKERS` threads instead: the loop keeps answering,
and at most that many large bodies are being converted at once, so the memory conversion needs stays
bounded (the rest wait their turn, their bodies already counted by the request-size limits). Smaller
bodies are converted inline, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

INLINE_BYTES = 256 * 1024
"""Work smaller than this is done on the event loop.

Measured on a loaded 2-core box: a thread hop costs about 50 us; decoding a 170 KiB V2 JSON body takes
about 1.1 ms inline (the hop would add 4 %), a 43 KiB one 0.26 ms (the hop would add 20 %). At this
threshold the loop stalls at most a millisecond or two for work it keeps.
"""

WORKERS = 2
"""Large bodies converted at once; more wait in line."""

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _executor() -> ThreadPoolExecutor:
    """The codec threads, started on first use (only event-loop threads call this)."""
    return ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="onnxserve-codec")


async def convert(size: int, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``work(*args, **kwargs)``: inline when ``size`` bytes are few, else in the codec threads."""
    if size < INLINE_BYTES:
        return work(*args, **kwargs)
    call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)
