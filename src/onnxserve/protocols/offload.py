"""Decoding and encoding of large bodies, run off the event loop, and large JSON off the interpreter.

Parsing a 64 MiB JSON document or splitting a million BYTES elements takes long enough to stall every
other request and the health probes if it runs on the event loop. Work on a body of at least
:data:`INLINE_BYTES` runs in a small pool of :data:`WORKERS` threads instead: the loop keeps answering,
and at most that many large bodies are being converted at once, so the memory conversion needs stays
bounded (the rest wait their turn, their bodies already counted by the request-size limits). Smaller
bodies are converted inline, where a thread hop would cost more than the work.

A thread is not enough for JSON: orjson (and the standard parser TF Serving's ``NaN`` needs) parses a
whole document in one call that holds the interpreter lock, 1 to 4 s for a 60 MB body, and the event
loop cannot run meanwhile. :func:`parse` is the one door every JSON codec decodes through: a body of at
least :data:`PROCESS_BYTES` is parsed and decoded to the internal request in a worker process (at most
:data:`PROCESSES` at once, started on first use from a fork server), which hands back numpy arrays
(pickled, a copy of their bytes) and domain errors as the same errors with the same messages. A worker
that runs out of memory or dies refuses the bodies it was decoding with :func:`worker_lost`
(RESOURCE_EXHAUSTED: 503 + Retry-After); the pool is replaced and later bodies are decoded as usual.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import multiprocessing
import os
import resource
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from onnxserve.errors import OnnxServeError, ResourceExhaustedError

log = logging.getLogger(__name__)

INLINE_BYTES = 256 * 1024
"""Work smaller than this is done on the event loop.

Measured on a loaded 2-core box: a thread hop costs about 50 us; decoding a 170 KiB V2 JSON body takes
about 1.1 ms inline (the hop would add 4 %), a 43 KiB one 0.26 ms (the hop would add 20 %). At this
threshold the loop stalls at most a millisecond or two for work it keeps.
"""

WORKERS = 2
"""Large bodies converted at once; more wait in line."""

PROCESS_BYTES = 4 * 1024 * 1024
"""JSON bodies at least this large are decoded in a worker process (see ``bench/json_offload.py``).

Below it a decode holds the interpreter lock for tens of milliseconds at most (a 1 MiB V2 FP32 body:
about 10 ms), harmless to a probe; the trip to a worker costs a few milliseconds plus the copy of the
body there and of the arrays back. From here up the lock is held long enough to add up (four 60 MB
bodies in threads held probes for seconds), and the trip costs a few percent of the decode.
"""

PROCESSES = 2
"""Large JSON bodies decoded at once, each in its own worker process; more wait in line.

A worker's peak while decoding is about ten times its body (the body, the parsed document's Python
objects, the arrays): some 0.6 GB for a 60 MB body of numbers, returned to the system when the worker
is replaced, otherwise reused by the next body it decodes."""

WORKER_DATA_BYTES = 1536 * 1024 * 1024
"""The most memory a worker may take (its data segment and private mappings, ``RLIMIT_DATA``). A body of
nested empty lists or objects takes 30 to 35 times its size as Python objects (a 63 MB one, 2 GB); past
this cap the worker runs out of memory or dies, and its body is refused (``worker_lost``) while the
server and the other bodies are unaffected. A 64 MiB body of numbers needs about 0.6 GB."""

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


Decode = Callable[Concatenate[bytes, P], R]


async def parse(size: int, work: Decode[P, R], body: bytes, *args: P.args, **kwargs: P.kwargs) -> R:
    """``work(body, *args, **kwargs)``, a JSON decode of ``size`` bytes: like :func:`convert`, but in a
    worker process from :data:`PROCESS_BYTES` up. ``work`` must be a module-level function, its other
    arguments and its result picklable (numpy arrays travel cheaply; many small Python objects do not)."""
    if size < PROCESS_BYTES:
        return await convert(size, work, body, *args, **kwargs)
    return await _pool.run(work, body, args, kwargs)


def worker_lost(reason: str) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the worker decoding this large JSON body {reason}; no answer was computed; retry later "
        "(bodies under the decoding workers' memory are served)"
    )


@dataclass(frozen=True)
class _Refusal:
    """A domain error raised in a worker, in a form that always pickles (some errors take other
    constructor arguments than their message)."""

    kind: type[OnnxServeError]
    message: str
    state: dict[str, Any]

    def error(self) -> OnnxServeError:
        error = self.kind.__new__(self.kind)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.state)
        return error


@dataclass(frozen=True)
class _Shared:
    """A body the worker reads from the server's memory file ``fd`` (pipes hand 60 MB over in 64 KiB
    turns, a second or more on a loaded box; this is one copy)."""

    pid: int
    fd: int
    size: int

    def read(self) -> bytes:
        with open(f"/proc/{self.pid}/fd/{self.fd}", "rb", buffering=0) as file:
            body = file.read(self.size)
        if len(body) != self.size:
            raise OSError(f"read {len(body)} of the body's {self.size} bytes")
        return body


def _share(body: bytes) -> _Shared:
    fd = os.memfd_create("onnxserve-json-body", os.MFD_CLOEXEC)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return _Shared(os.getpid(), fd, len(body))


def _in_worker(
    work: Callable[..., R], body: bytes | _Shared, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> R | _Refusal:
    try:
        return work(body.read() if isinstance(body, _Shared) else body, *args, **kwargs)
    except OnnxServeError as e:
        return _Refusal(type(e), e.message, dict(vars(e)))
    except (MemoryError, SystemError):  # orjson reports a failed allocation as a SystemError
        return _Refusal(ResourceExhaustedError, worker_lost("ran out of memory").message, {})


_MEMFD = sys.platform == "linux" and hasattr(os, "memfd_create")


def _start_worker(server: int) -> None:
    """In each worker: leave Ctrl-C to the server, cap its memory at :data:`WORKER_DATA_BYTES`, and exit
    when the server does, even when it is killed (a worker's queue never ends on its own: it holds both
    ends of its pipe, and the fork server's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = WORKER_DATA_BYTES if hard == resource.RLIM_INFINITY else min(hard, WORKER_DATA_BYTES)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    threading.Thread(target=_exit_with, args=(server,), name="onnxserve-server-watch", daemon=True).start()


def _exit_with(server: int) -> None:
    try:
        watched = os.pidfd_open(server)
    except (AttributeError, OSError):  # not Linux, or the server is gone already
        watched = -1
    if watched >= 0:
        select.select([watched], [], [])  # readable once the server has exited
    else:
        while _running(server):
            time.sleep(1)
    os._exit(0)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ProcessPool:
    """The worker processes: started on first use, replaced when one dies, stopped at shutdown."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()  # servers in tests share a process, each on its own loop thread
        self._slots: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(list(_PRELOAD))
                self._executor = ProcessPoolExecutor(
                    PROCESSES, context, initializer=_start_worker, initargs=(os.getpid(),)
                )
            return self._executor

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    async def run(self, work: Callable[..., R], body: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        loop = asyncio.get_running_loop()
        slots = self._slots.setdefault(loop, asyncio.Semaphore(PROCESSES))
        async with slots:  # bodies wait here, not pickled in the pool's queue
            shared = await loop.run_in_executor(_executor(), _share, body) if _MEMFD else None
            executor = self._current()
            try:
                # Submitting may start a worker, and the first one the fork server: seconds of waiting for
                # them to import, done in a codec thread.
                submit = functools.partial(executor.submit, _in_worker, work, shared or body, args, kwargs)
                future: Future[R | _Refusal] = await loop.run_in_executor(_executor(), submit)
                result = await asyncio.wrap_future(future)
            except BrokenProcessPool:
                log.warning("a JSON decoding worker died; its bodies are refused and the workers replaced")
                self._replace(executor)
                raise worker_lost("stopped (killed, or out of memory)") from None
            finally:
                if shared is not None:
                    os.close(shared.fd)
        if isinstance(result, _Refusal):
            raise result.error()
        return result

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


_PRELOAD = (
    "onnxserve.protocols.offload",
    "onnxserve.protocols.v2_rest.codec",
    "onnxserve.protocols.tfserving_rest.codec",
    "onnxserve.protocols.openai.codec",
    "onnxserve.protocols.tei.codec",
)
"""What the fork server imports once, so each worker starts in milliseconds."""

_pool = _ProcessPool()


def shutdown() -> None:
    """Stop the worker processes (the server is stopping); a later large body starts new ones."""
    _pool.shutdown()
