"""Decoding and encoding of large bodies, run off the event loop, and large JSON off the interpreter.

Parsing a 64 MiB JSON document or splitting a million BYTES elements takes long enough to stall every
other request and the health probes if it runs on the event loop. Work on a body of at least
:data:`INLINE_BYTES` runs in a small pool of :data:`WORKERS` threads instead: the loop keeps answering,
and at most that many large bodies are being converted at once, so the memory conversion needs stays
bounded (the rest wait their turn, their bodies already counted by the request-size limits; the client
that has used the threads least goes first, ``core.fairness.FairTurns``). Smaller bodies are converted
inline, where a thread hop would cost more than the work.

A thread is not enough for JSON: orjson (and the standard parser TF Serving's ``NaN`` needs) parses a
whole document in one call that holds the interpreter lock, 1 to 4 s for a 60 MB body, and the event
loop cannot run meanwhile. :func:`parse` is the one door every JSON codec decodes through: a body of at
least :data:`PROCESS_BYTES`, or a smaller one dense with values (numbers, strings, arrays, objects:
:data:`INLINE_VALUES`), is parsed and decoded to the internal request in a worker process (at most
:data:`PROCESSES` at once, started on first use from a fork server), which hands back numpy arrays
(pickled, a copy of their bytes) and domain errors as the same errors with the same messages. A worker
that runs out of memory or dies refuses the body it was decoding with :func:`worker_lost`
(RESOURCE_EXHAUSTED: 503 + Retry-After); the worker is replaced and later bodies are decoded as usual.
The wait for a worker and the decode count against the request's time limit (``core.request_deadline``):
a body whose time passes (:func:`decode_timed_out`) or whose client leaves has its worker killed and
replaced, so no worker keeps decoding a body nobody waits for. When the server starts to drain, the workers
are killed and the bodies they were decoding, or waiting for one, or arriving later, refused (503: the
service would refuse those requests after their decode anyway), so a worker that cannot run (stopped
with SIGSTOP) does not keep the exit waiting, and no new worker starts.
Each worker is killed by its watchdog process when the server exits, even in the middle of a parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
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
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

from onnxserve.core import request_deadline
from onnxserve.core.fairness import FairTurns, Turn
from onnxserve.errors import (
    DeadlineExceededError,
    InvalidInputError,
    OnnxServeError,
    ResourceExhaustedError,
    UnavailableError,
)
from onnxserve.log_throttle import LogThrottle
from onnxserve.protocols import context

log = logging.getLogger(__name__)

INLINE_BYTES = 256 * 1024
"""Work smaller than this is done on the event loop.

Measured on a loaded 2-core box: a thread hop costs about 50 us; decoding a 170 KiB V2 JSON body takes
about 1.1 ms inline (the hop would add 4 %), a 43 KiB one 0.26 ms (the hop would add 20 %). At this
threshold the loop stalls at most a millisecond or two for work it keeps.
"""

BYTES_ELEMENT_WORK = 32
"""What reading one BYTES element (its length, then a bytes object of it) counts as, in bytes of work against
:data:`INLINE_BYTES`: about 0.25 us each, so at most about 8,000 are read on the event loop (2 ms). Counted
by their bytes alone, 131,000 empty elements in a 262 KB gRPC message were decoded on the loop, 30 to 36 ms
each, and four streams of them held every new gRPC call past 5 s (outside attack rt57)."""

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


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FairTurns] = weakref.WeakKeyDictionary()
"""Each event loop's turns at the codec threads: :data:`WORKERS` works at once; of the others, the work of
the client that has used the threads least goes next (``core.fairness.FairTurns``), not the oldest. In
arrival order, a few addresses sending the heaviest messages the limits allow (65,535 inputs a message,
0.7 s of decoding each) kept every other client's large request waiting behind all of theirs (outside
attack rt56)."""


def _codec_turns(loop: asyncio.AbstractEventLoop) -> FairTurns:
    turns = _turns.get(loop)
    if turns is None:
        turns = _turns[loop] = FairTurns(WORKERS)
    return turns


async def convert(size: int, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``work(*args, **kwargs)``: inline when ``size`` bytes are few, else in the codec threads, in the turn
    of the client whose request this is (``context.current_client``)."""
    if size < INLINE_BYTES:
        return work(*args, **kwargs)
    call = functools.partial(contextvars.copy_context().run, work, *args, **kwargs)
    loop = asyncio.get_running_loop()
    turns = _codec_turns(loop)
    turn = await turns.take(context.current_client())
    try:
        running = _executor().submit(call)
    except BaseException:
        turns.end(turn)
        raise
    # The turn ends with the work, not with the wait for it: a request that goes away leaves its work
    # running in its thread, and that thread is not another client's until it is done.
    running.add_done_callback(functools.partial(_turn_ended, loop, turns, turn))
    return await asyncio.wrap_future(running, loop=loop)


def _turn_ended(loop: asyncio.AbstractEventLoop, turns: FairTurns, turn: Turn, _done: Future[Any]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: its turns with it
        loop.call_soon_threadsafe(turns.end, turn)


Decode = Callable[Concatenate[bytes, P], R]


async def parse(size: int, work: Decode[P, R], body: bytes, *args: P.args, **kwargs: P.kwargs) -> R:
    """``work(body, *args, **kwargs)``, a JSON decode of ``size`` bytes: like :func:`convert`, but in a
    worker process from :data:`PROCESS_BYTES` up. ``work`` must be a module-level function, its other
    arguments and its result picklable (numpy arrays travel cheaply; many small Python objects do not)."""
    if not decodes_in_worker(size, body):
        _decoded.add(LOOP if size < INLINE_BYTES else THREAD)
        return await convert(size, work, body, *args, **kwargs)
    _decoded.add(WORKER)
    return await _pool.run(_in_worker, (work, args, kwargs), body)


LOOP, THREAD, WORKER = "loop", "thread", "worker"
"""Where :func:`parse` decodes a body: on the event loop, in a codec thread, in a worker process."""


class _Counts:
    """How many JSON bodies :func:`parse` has decoded in this process, by where (event loops of several
    servers in one process share it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((LOOP, THREAD, WORKER), 0)

    def add(self, where: str) -> None:
        with self._lock:
            self._counts[where] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


_decoded = _Counts()


def decoded_counts() -> dict[str, int]:
    """JSON bodies handed to :func:`parse` in this process so far, by where they were decoded
    (:data:`LOOP`, :data:`THREAD`, :data:`WORKER`), refused ones included."""
    return _decoded.snapshot()


INLINE_SCAN_BYTES = 16 * 1024
"""A JSON body this small is decoded in the server whatever it holds (its decode costs at most a few
milliseconds, empty lists included): ordinary small requests are not even counted (:func:`decode_cost`)."""

INLINE_VALUES = 256 * 1024
"""A JSON body under :data:`PROCESS_BYTES` whose :func:`decode_cost` is above this many numbers' worth is
decoded in a worker process all the same.

Parsing builds one Python object per value, and building them, not the bytes, is what holds the
interpreter lock: measured with ``bench/json_offload.py --costs`` on a loaded two-core box, in CPU time of
the server, a number costs 31 to 83 ns (the integer 0 the least, long floats the most; TF Serving rows
about 50 ns), a string about 240 ns, an empty array or object about 680 ns. A body of 4 MiB - 1 bytes of
two million numbers took 80 ms (V2) to 112 ms (TF Serving) in the server, and 48 of them at once held
probes 1.2 to 2.5 s (an outside attack); 1.4 million empty lists, 0.93 s each. At this threshold a body
decoded in the server costs at most about 20 ms (262,144 long floats), as little as the largest ones
decoded in the server before; a 1 MiB FP32 body as perf_analyzer sends it (95 thousand values, 6 ms)
stays in the server, a 4 MiB - 1 one (381 thousand, 31 ms) goes to a worker, where the server spends a
sixth of that (the hand-off: the body into a memory file, the arrays back)."""

CONTAINER_VALUES = 10
"""What an array or object (its ``[`` or ``{``) costs to decode beyond its comma, in numbers' worth."""

STRING_VALUES = 3
"""What a string (two ``"``) costs to decode beyond its comma, in numbers' worth."""


def decode_cost(body: bytes, end: int) -> int:
    """The estimated cost of parsing ``body[:end]``, in numbers' worth: its values (the commas between them:
    numbers, strings, arrays and objects alike), plus :data:`CONTAINER_VALUES` per ``[`` and ``{`` and
    :data:`STRING_VALUES` per string. Bytes are counted, not parsed (those inside strings count too); each
    count is one pass in C, about 0.35 ms per MiB, and counting stops once the total is past
    :data:`INLINE_VALUES`."""
    cost = body.count(b",", 0, end)
    if cost <= INLINE_VALUES:
        cost += CONTAINER_VALUES * (body.count(b"[", 0, end) + body.count(b"{", 0, end))
    if cost <= INLINE_VALUES:
        cost += STRING_VALUES * (body.count(b'"', 0, end) // 2)  # an escaped quote counts half a string
    return cost


def decodes_in_worker(size: int, body: bytes) -> bool:
    """Whether :func:`parse` decodes a JSON body of ``size`` bytes (its first ``size`` bytes are the
    JSON) in a worker process: a large one, or one dense with values (:data:`INLINE_VALUES`)."""
    if size >= PROCESS_BYTES:
        return True
    if size <= INLINE_SCAN_BYTES:
        return False
    return decode_cost(body, min(size, len(body))) > INLINE_VALUES


def worker_lost(reason: str) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the worker decoding this large JSON body {reason}; no answer was computed; retry later "
        "(bodies under the decoding workers' memory are served)"
    )


def shutting_down() -> UnavailableError:
    return UnavailableError(
        "the server is shutting down; this large JSON body was not decoded; send the request to another replica"
    )


def decode_timed_out() -> DeadlineExceededError:
    return DeadlineExceededError(
        "the request's time limit (--request-timeout) passed while its large JSON body waited for a decoding "
        "worker or was being decoded; the body was dropped and its worker stopped"
    )


MAX_CONTAINERS = 4 * 1024 * 1024
"""The most ``[`` and ``{`` bytes a body decoded in a worker may hold (counted, not parsed, so those inside
strings count too). Each becomes a Python list or dict of 70 to 250 bytes: a 60 MB body of 20 million
empty lists would take the worker past :data:`WORKER_DATA_BYTES`, where it crawls for minutes in failing
allocations instead of running out of memory. A tensor's ``data`` may be sent flat (its shape says how it
nests), so honest bodies stay far below this."""


def check_containers(body: bytes) -> None:
    """InvalidInputError when ``body`` holds more than :data:`MAX_CONTAINERS` opening brackets and braces."""
    count = body.count(b"[") + body.count(b"{")
    if count > MAX_CONTAINERS:
        raise InvalidInputError(
            f"the JSON body holds {count} arrays and objects ('[' and '{{'); at most {MAX_CONTAINERS} are "
            "decoded: send tensor data as flat lists (the shape gives their nesting)"
        )


@dataclass(frozen=True)
class Refusal:
    """A domain error raised in a worker, in a form that always pickles (some errors take other
    constructor arguments than their message)."""

    kind: type[OnnxServeError]
    message: str
    state: dict[str, Any]

    @classmethod
    def of(cls, error: OnnxServeError) -> Refusal:
        return cls(type(error), error.message, dict(vars(error)))

    def error(self) -> OnnxServeError:
        error = self.kind.__new__(self.kind)
        Exception.__init__(error, self.message)
        error.message = self.message  # whatever the state holds: every error answers with its message
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
    body: bytes | _Shared, work: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> R | Refusal:
    try:
        data = body.read() if isinstance(body, _Shared) else body
        check_containers(data)
        return work(data, *args, **kwargs)
    except OnnxServeError as e:
        if _PARSER_OUT_OF_MEMORY in e.message:  # the codecs name it a JSON error: it is this worker's memory
            return _out_of_memory()
        return Refusal.of(e)
    except (MemoryError, SystemError):  # orjson reports a failed allocation as a SystemError
        return _out_of_memory()


_PARSER_OUT_OF_MEMORY = "Not enough memory to allocate buffer for parsing"
"""orjson's JSONDecodeError when its parse buffer cannot be allocated (proportional to the body's values)."""


def _out_of_memory() -> Refusal:
    return Refusal(ResourceExhaustedError, worker_lost("ran out of memory").message, {})


_MEMFD = sys.platform == "linux" and hasattr(os, "memfd_create")

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
WATCHDOG_NAME = "onnxserve-watch"
"""The process name of a worker's watchdog (``/proc/PID/comm``)."""


def _start_worker(server: int, data_bytes: int, niceness: int) -> None:
    """In each worker: leave Ctrl-C to the server, cap its memory at ``data_bytes`` (its kind's
    :attr:`WorkerKind.data_bytes`), and exit when the server does, even when it is killed in the middle of
    a parse (a worker's queue never ends on its own: it holds both ends of its pipe, and the fork server's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if niceness:
        os.nice(niceness)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = data_bytes if hard == resource.RLIM_INFINITY else min(hard, data_bytes)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    if not _start_watchdog(server):
        threading.Thread(target=_exit_with, args=(server,), name="onnxserve-server-watch", daemon=True).start()


def _start_watchdog(server: int) -> bool:
    """Fork a watchdog that kills this worker once ``server`` has exited (Linux; False elsewhere).

    A thread in the worker cannot do it: a parse in C holds the interpreter lock for minutes at worst.
    The watchdog is a separate process that needs no lock of the worker's; the kernel ends it when the
    worker ends (``PR_SET_PDEATHSIG``), so a replaced worker leaves nothing behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        watched = os.pidfd_open(server)
    except (AttributeError, OSError):  # not Linux, or the server is gone already
        return False
    worker = os.getpid()
    child = os.fork()
    if child:
        os.close(watched)
        return True
    try:  # the watchdog: only system calls from here on, then _exit
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(_PR_SET_NAME, WATCHDOG_NAME.encode("ascii"))
        os.closerange(0, watched)
        os.closerange(watched + 1, 65536)
        if os.getppid() == worker:  # else the worker is gone already
            select.select([watched], [], [])  # readable once the server has exited
            os.kill(worker, signal.SIGKILL)
    finally:
        os._exit(0)


def _exit_with(server: int) -> None:
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


class _Worker:
    """One worker process (a pool of one), so the work it does can be stopped alone."""

    def __init__(self, kind: WorkerKind) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(_PRELOAD))
        initargs = (os.getpid(), kind.data_bytes, kind.niceness)
        self._executor = ProcessPoolExecutor(1, context, initializer=_start_worker, initargs=initargs)
        self._lock = threading.Lock()
        self._stopped = False
        self.shut_down = False  # stopped because the server stops, not because the body failed

    def submit(self, call: Callable[..., R | Refusal], args: tuple[Any, ...]) -> Future[R | Refusal]:
        """Hand ``call(*args)`` over (in a codec thread: the first call starts the process, and the first of
        all the fork server, seconds of waiting for them to import)."""
        with self._lock:
            if self._stopped:
                raise BrokenProcessPool("the worker was stopped")
            future = self._executor.submit(call, *args)
            self._close_result_writer()
            return future

    def _close_result_writer(self) -> None:
        """Close this process's copy of the pipe the worker sends its results through, once the worker is
        started (the first submission starts it; a pool of one never starts another).

        Otherwise a worker killed while it sends a result (a large one takes many turns of the pipe) leaves
        the pool's manager thread waiting forever for the rest of the message, since the pipe's writing end
        is still open here: the body's future never ends, and at exit the interpreter waits forever for that
        thread (``concurrent.futures`` joins it). With the end closed, the manager thread reads an end of
        file, the pool breaks, and the body is refused (:func:`worker_lost`) at once."""
        queue = self._executor._result_queue
        writer = getattr(queue, "_writer", None) if queue is not None else None
        if writer is not None and self._executor._processes:
            writer.close()

    def alive(self) -> bool:
        """Whether its process (once started) still runs."""
        processes = list((self._executor._processes or {}).values())
        return not self._stopped and all(process.is_alive() for process in processes)

    def stop(self) -> None:
        """Kill the process, whatever it is doing (a body nobody waits for any more), and let it go."""
        with self._lock:
            self._kill()

    def stop_now(self) -> None:
        """:meth:`stop` without waiting for a submission in progress: that one may be starting the process
        (the fork server's first start imports the codecs: it took up to 19 s on a loaded machine, and
        the drain, which waited for it, with it), so the fork server is killed, which ends that start
        (a later body starts a new one), and the worker is stopped in a thread once the submission has
        returned."""
        if self._lock.acquire(blocking=False):
            try:
                self._kill()
            finally:
                self._lock.release()
            return
        _kill_fork_server()
        threading.Thread(target=self.stop, name="onnxserve-worker-stop", daemon=True).start()

    def _kill(self) -> None:
        self._stopped = True
        for process in list((self._executor._processes or {}).values()):
            process.kill()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Let an idle worker go: it exits once it has nothing left to do."""
        with self._lock:
            self._stopped = True
            self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class WorkerKind:
    """What a :class:`WorkerPool`'s workers are for: how many run at once, their memory, and how work they
    could not finish is refused."""

    processes: int
    """Work done at once per event loop, each in its own worker process; more waits in line."""
    data_bytes: int
    """Each worker's memory cap (``RLIMIT_DATA``, set when it starts)."""
    lost: Callable[[str], OnnxServeError]
    """The refusal of work whose worker died or was stopped under it, given why."""
    stopping: Callable[[], OnnxServeError]
    """The refusal of work the server no longer does because it stops."""
    timed_out: Callable[[], OnnxServeError]
    """The refusal of work whose request's time limit passed while it waited or ran."""
    what: str
    """The work, for the log (``"JSON decoding"``)."""
    niceness: int = 0
    """Added to each worker's nice value when it starts (work that may wait gives the CPU to the server)."""


class WorkerPool:
    """Worker processes of one :class:`WorkerKind`: started on first use, replaced when one dies or is
    stopped, stopped at shutdown.

    At most ``kind.processes`` calls run at once per event loop (servers in tests share a process, each on
    its own loop thread); a call waits for a free worker within its request's time limit (clients served in
    turn), and a call whose client left or whose time ran out has its worker killed and replaced."""

    def __init__(self, kind: WorkerKind) -> None:
        self.kind = kind
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots: dict[asyncio.AbstractEventLoop, FairTurns] = {}
        self._draining: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._deaths = LogThrottle()  # a client whose bodies or documents kill a worker each time
        _pools.append(self)

    def drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Refuse the calls of ``loop`` from now on, those waiting for a worker included."""
        with self._lock:
            self._draining.add(loop)

    def _refuse_if_draining(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if loop in self._draining:
                raise self.kind.stopping()

    def _take(self) -> _Worker:
        """An idle worker whose process is alive, else a new one: one that died while idle (the kernel's
        out-of-memory killer picks the largest process, often a worker holding its last body's memory) is
        let go, not handed the next call, which it would refuse (outside attack rt14)."""
        dead = []
        with self._lock:
            while self._idle and not self._idle[-1].alive():
                dead.append(self._idle.pop())
            worker = self._idle.pop() if self._idle else _Worker(self.kind)
            self._busy.add(worker)
        for gone in dead:
            gone.close()
        return worker

    def _done(self, worker: _Worker, finished: bool) -> None:
        """``worker`` is free again (``finished``: its call returned), else stopped and replaced."""
        with self._lock:
            known = worker in self._busy
            self._busy.discard(worker)
            keep = finished and known and len(self._idle) < self.kind.processes
            if keep:
                self._idle.append(worker)
        if keep:
            return
        if finished:
            worker.close()
        else:  # killing may wait for a submission in flight: not on the event loop
            threading.Thread(target=worker.stop, name="onnxserve-worker-stop", daemon=True).start()

    async def run(self, call: Callable[..., R | Refusal], args: tuple[Any, ...], body: bytes | None = None) -> R:
        """``call(*args)`` in a worker, ``call`` a module-level function, its arguments and result picklable;
        a :class:`Refusal` it returns is raised here as its error. ``body``, when given, is handed over as
        ``call``'s first argument, through a memory file where the platform has them (``Shared``), once a
        worker is free."""
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = FairTurns(self.kind.processes)
        self._refuse_if_draining(loop)
        try:
            async with asyncio.timeout(request_deadline.seconds_left()) as limit:
                turn = await slots.take(context.current_client())  # calls wait here, clients in turn
                try:
                    self._refuse_if_draining(loop)  # a drain began while it waited: no new worker for it
                    result = await self._call(loop, call, args, body)
                finally:
                    slots.end(turn)
        except TimeoutError:
            if not limit.expired():
                raise
            raise self.kind.timed_out() from None
        if isinstance(result, Refusal):
            raise result.error()
        return result

    async def _call(
        self,
        loop: asyncio.AbstractEventLoop,
        call: Callable[..., R | Refusal],
        args: tuple[Any, ...],
        body: bytes | None,
    ) -> R | Refusal:
        shared = await loop.run_in_executor(_executor(), _share, body) if body is not None and _MEMFD else None
        if body is not None:
            args = (shared or body, *args)
        worker = self._take()
        finished = False
        lost = self.kind.lost("stopped (killed, or out of memory)")
        try:
            submit = functools.partial(worker.submit, call, args)
            future: Future[R | Refusal] = await loop.run_in_executor(_executor(), submit)
            result = await asyncio.wrap_future(future)
            finished = True
            return result
        except BrokenProcessPool:
            if worker.shut_down:
                raise self.kind.stopping() from None
            if count := self._deaths.due():
                what, note = self.kind.what, self._deaths.note(count)
                log.warning("a %s worker died; its work is refused and the worker replaced%s", what, note)
            raise lost from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # this request was cancelled (its client left, its time)
                raise
            # Its future was cancelled, not the request: its worker was stopped under it (a drain
            # began, or the worker was killed). Answered like those, not as a cancellation (uvicorn's 500).
            if worker.shut_down:
                raise self.kind.stopping() from None
            raise lost from None
        except (OSError, EOFError):
            if worker.shut_down:  # its start ended with the fork server (``_Worker.stop_now``)
                raise self.kind.stopping() from None
            raise
        finally:
            # not finished: it died, or its client left, or the time ran out (the worker may be busy)
            self._done(worker, finished)
            if shared is not None:
                os.close(shared.fd)

    def shutdown(self) -> None:
        with self._lock:
            workers = [*self._idle, *self._busy]
            self._idle, self._busy = [], set()
        for worker in workers:  # killed, not let go: a worker still in a parse would keep the exit waiting
            worker.shut_down = True
            worker.stop_now()


_pools: list[WorkerPool] = []
"""Every pool made in this process (the JSON decoding workers, the web page's document workers): the
server's drain and shutdown stop them all."""


def _kill_fork_server() -> None:
    """Kill the fork server the workers start from, if it runs (a process start waiting for it then fails
    at once); the next worker starts a new one."""
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if isinstance(pid, int):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


_PRELOAD = (
    "onnxserve.protocols.offload",
    "onnxserve.protocols.v2_rest.codec",
    "onnxserve.protocols.tfserving_rest.codec",
    "onnxserve.protocols.openai.codec",
    "onnxserve.protocols.tei.codec",
)
"""What the fork server imports once, so each worker starts in milliseconds."""

JSON_WORKERS = WorkerKind(
    processes=PROCESSES,
    data_bytes=WORKER_DATA_BYTES,
    lost=worker_lost,
    stopping=shutting_down,
    timed_out=decode_timed_out,
    what="JSON decoding",
)
_pool = WorkerPool(JSON_WORKERS)


def drain() -> None:
    """Refuse every large JSON body this event loop hands to :func:`parse` from now on as
    :func:`shutting_down` (503), those waiting for a worker included: the server drains, and its service
    refuses their requests anyway. Before, bodies that arrived or waited for a worker when the drain began
    started new workers and were decoded for nothing, their requests still open when the listeners closed
    (answered 500 by uvicorn) and their workers' results still arriving at exit. Call :func:`shutdown`
    next."""
    loop = asyncio.get_running_loop()
    for pool in _pools:
        pool.drain(loop)


def shutdown() -> None:
    """Stop the worker processes (the server is stopping); a later large body starts new ones.

    A body being decoded is refused as :func:`shutting_down` (503): called when a drain starts, since a
    request whose body is still being decoded then would only be refused by the service after its decode
    (and a worker stopped with SIGSTOP would never finish it, keeping the exit waiting for its connection).
    Killing may wait for a worker being started: call it off the event loop where that matters."""
    for pool in _pools:
        pool.shutdown()
