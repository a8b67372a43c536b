"""InferenceService: the one object every protocol calls.

It answers liveness, readiness and metadata, and runs inference off the event loop in a thread
pool, so a slow model never blocks health checks or other models (only runs proven cheap, of graphs
whose cost their input shapes bound, run on the loop itself: ``core.inline_runs``).

Every inference request may have a time limit: the ``timeout`` request parameter (microseconds, as
Triton's), the time its transport still allows (a gRPC deadline), and the server's default, whichever
is shortest. When it passes the request fails with DeadlineExceededError: if it was queued it leaves
the queue and never runs; if it was running its result is dropped (and the run is stopped when no
other request shares it). A caller that goes away (cancels the awaiting task) frees its slot the same way.

The service counts every inference request it sees, exactly once, by telling the registry's observers
(``core.observe``): answered, refused by ``infer`` (unknown model, bad input, a full queue, a passed
deadline), or refused before ``infer`` was called (a body that does not decode). For the last kind a
protocol front end opens an ``InferenceCall`` (``async with service.call(protocol, model, version)``)
around decoding, ``infer`` and encoding; a request that leaves it with an error the service has not
counted yet is counted then, under the model and version the client named when the server serves
them (else "", so that clients cannot grow the label sets without bound).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar, Token
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import numpy.typing as npt
from tokenizers import Encoding

from onnxserve.core import chunking, datatypes, request_deadline, text_slices
from onnxserve.core.batching import Scheduled
from onnxserve.core.client_text import shown
from onnxserve.core.execution import Work
from onnxserve.core.manager import ControlMode, ModelManager
from onnxserve.core.memory import give_back_memory
from onnxserve.core.observe import RequestRecord
from onnxserve.core.pace import Parts
from onnxserve.core.pipeline import TextBatch
from onnxserve.core.progress import Progress
from onnxserve.core.registry import PLATFORM, ModelRegistry, ModelVersion
from onnxserve.core.text_budget import SMALL_REQUEST_CHARACTERS, TextBudget, charged
from onnxserve.core.tokens import KeptBuilder
from onnxserve.core.types import (
    IndexEntry,
    InferenceRequest,
    InferenceResponse,
    ModelConfiguration,
    ModelMetadata,
    ModelState,
    ServerMetadata,
    Tensor,
    TensorSpec,
    VersionStatistics,
    payload_bytes,
)
from onnxserve.core.validation import check_request, prepare_feeds
from onnxserve.core.wire import response_too_large
from onnxserve.errors import (
    DeadlineExceededError,
    ErrorKind,
    InvalidInputError,
    ModelNotFoundError,
    OnnxServeError,
    UnavailableError,
)
from onnxserve.version import __version__

SERVER_NAME = "onnxserve"

DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""Largest answer (its output tensors' values, before encoding) one request may get: the request limit."""

LARGE_PAYLOAD_BYTES = 4 * 1024 * 1024
"""A request or answer of at least this many tensor bytes gives the C allocator's free memory back to the
system once it has been answered (decoding and encoding it made many transient allocations). 24 V2 JSON
requests of two million numbers (8 MB of FP32) at once to an identity model left the server at 547 MiB
instead of 116 when this was 16 MiB, 160 MiB after ``malloc_trim``; a trim took at most 22 ms of CPU,
and trims of calls answered together are shared (:meth:`InferenceService.give_back_memory`)."""

OBJECT_ELEMENT_BYTES = 56
"""The least memory a BYTES element held as a Python object takes (the object, pymalloc's 48-byte class at
least, and its pointer): what each one counts toward :data:`LARGE_PAYLOAD_BYTES`. 24 requests of a million
empty strings at once left the server at 1,047 MiB instead of 116 (an outside attack, rt9), 342 MiB after
``malloc_trim``; their tensor bytes alone (8 MB of pointers each) did not count as large."""

TIMEOUT_PARAMETER = "timeout"
"""The request parameter that limits a request's time, in microseconds (Triton's schedule-policy name)."""


def _index_entry(model: ModelVersion) -> IndexEntry:
    return IndexEntry(model.name, str(model.version), model.state.value)


def _work(request: InferenceRequest, model: ModelVersion, max_output_bytes: int = 0) -> Work:
    """Validate a request into work for the model's scheduler (texts are tokenized later, off the loop)."""
    text = model.pipeline.text_of(request, model.max_batch_size) if model.pipeline is not None else None
    if text is None or model.pipeline is None:
        feeds, fetch = prepare_feeds(request, model)
        if model.pipeline is not None:
            model.pipeline.check_token_tensors(feeds, model.name)
        rows = int(request.inputs[0].shape[0]) if model.batches_rows or model.chunk_tokens else 1
        tokens = model.pipeline.token_length(feeds) if model.pipeline is not None else 0
        return Work(fetch, rows, feeds=feeds, max_output_bytes=max_output_bytes, tokens=tokens)
    fetch, answer = model.pipeline.select_outputs(request.outputs, [o.name for o in model.outputs])
    return Work(fetch, len(text.texts), text=text, answer=answer, max_output_bytes=max_output_bytes)


def time_limit(request: InferenceRequest, default: float) -> float | None:
    """Seconds the request may take: its ``timeout`` parameter, its transport's limit and ``default``
    (0: none), whichever is shortest; None when nothing limits it."""
    limits = [default] if default > 0 else []
    raw = request.parameters.get(TIMEOUT_PARAMETER)
    if raw is not None:
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise InvalidInputError(
                f"parameter {TIMEOUT_PARAMETER!r} must be a non-negative integer number of microseconds "
                f"(0: the server's default), got {raw!r}"
            )
        if raw > 0:
            limits.append(raw / 1e6)
    if request.time_left is not None:
        limits.append(max(request.time_left, 0.0))
    return min(limits) if limits else None


def response_bytes(outputs: dict[str, Any]) -> int:
    """Bytes the output tensors' values take before any encoding (JSON text of them is several times more)."""
    return sum(payload_bytes(array) for array in outputs.values())


def held_bytes(arrays: Iterable[npt.NDArray[Any]]) -> int:
    """Memory the arrays hold at least: numeric ones their bytes, BYTES ones :data:`OBJECT_ELEMENT_BYTES` per
    element (counted, not measured: no element is visited)."""
    return sum(int(a.size) * OBJECT_ELEMENT_BYTES if a.dtype == object else int(a.nbytes) for a in arrays)


INLINE_TOKENIZE_CHARACTERS = 512
"""A text request of at most this many characters (its texts and pairs together), and at most
``INLINE_TOKENIZE_TEXTS`` texts, is tokenized on the event loop: a 12-word sentence takes about 22 us there
and 512 characters about 0.15 ms, while handing it to a worker thread and back costs about 50 us of CPU and
two wake-ups (profiled at text c=8 and c=32: the tokenizer threads' hand-over took more CPU than their
tokenizing did). Longer texts are tokenized on the service's threads, so that the loop never stalls on
them."""

INLINE_TOKENIZE_TEXTS = 32
"""The most texts (and texts of pairs) of a request tokenized on the event loop: a text costs about 10 us
however short it is (a million empty texts, no characters at all, took seconds in one call)."""


INLINE_DEADLINE_MARGIN_S = 0.001
"""A request with less time left than this never runs on the event loop (``core.inline_runs``): a run
there cannot be interrupted, and its deadline must fail it exactly as on the instance thread."""


def _tokenizes_inline(text: TextBatch) -> bool:
    if len(text.texts) + len(text.pairs or ()) > INLINE_TOKENIZE_TEXTS:
        return False
    size = 0
    for part in (text.texts, text.pairs or ()):
        for item in part:
            size += len(item)
            if size > INLINE_TOKENIZE_CHARACTERS:
                return False
    return True


def _tokenize(model: ModelVersion, work: Work) -> int:
    """Tokenize a short text work in place, on the loop; returns the time it took."""
    start = time.perf_counter_ns()
    assert model.pipeline is not None
    assert work.text is not None
    work.encodings = model.pipeline.tokenize(work.text)
    return time.perf_counter_ns() - start


T = TypeVar("T")


async def _until_returned(executor: Executor, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``executor``'s thread. When the caller goes away, a call still waiting for a thread
    is dropped at once; a running one cannot be stopped, so this waits for it to return before the
    cancellation goes on (what the thread holds stays counted meanwhile)."""
    started = executor.submit(fn, *args)
    future = asyncio.wrap_future(started)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if not started.cancel():  # already running (or done): wait for its thread
            await asyncio.wait([future])
        raise


class InferenceCall:
    """One inference request as a protocol front end handles it, from its first byte to its answer.

    Use ``async with service.call(protocol, model, version)`` around decoding, ``infer`` and encoding.
    ``model`` and ``version`` are what the client named (a path's segments); ``target`` updates them
    once known (a gRPC message names its model). A request that leaves the block with an error the
    service did not count (it never reached ``infer``'s count) is counted on the way out.

    Its ``progress`` (``core.progress``) says whether it only waits at its model; the front end that carries
    it may then ``withdraw`` it (the HTTP connection slots do, to let another client in).
    """

    def __init__(
        self, service: InferenceService, protocol: str, model: str = "", version: str = "", client: str = ""
    ) -> None:
        self.service = service
        self.protocol = protocol
        self.client = client  # who sends it, opaque: the schedulers serve clients in turn (``core.fairness``)
        self.model = model
        self.version = version
        self.started = time.perf_counter_ns()
        self.counted = False
        self.large = False  # it held a large request or answer: give memory back when it ends
        self.progress = Progress()  # waiting or started, marked by its model's scheduler (``core.progress``)
        self._token: Token[InferenceCall | None] | None = None
        self._clock: Token[float | None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the task that handles it, cancelled to withdraw it
        self._withdrawn: OnnxServeError | None = None  # what it is answered once withdrawn

    def only_waiting(self) -> bool:
        """Queued at its model or waiting for room for its text, nothing of it run yet, not withdrawn."""
        return self._withdrawn is None and self.progress.only_waiting

    def withdraw(self, error: OnnxServeError) -> bool:
        """Drop this request to be answered ``error``, if it only waits (``only_waiting``): it leaves its
        queue or budget the way a request whose caller went away does, and never runs; ``error`` comes
        out of this call's block instead of the cancellation. False, and nothing done, otherwise: an
        execution of it has begun (its run is never cut), or it is doing anything but wait.

        Decided and done at once (its task is cancelled while it is suspended in its wait), so it cannot
        start running in between."""
        task = self._task
        if task is None or task.done() or not self.only_waiting():
            return False
        self._withdrawn = error
        task.cancel()
        return True

    def target(self, model: str, version: str) -> None:
        self.model, self.version = model, version

    async def __aenter__(self) -> InferenceCall:
        self._task = asyncio.current_task()
        self._token = _current_call.set(self)
        self._clock = request_deadline.start(self.service.request_timeout)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._clock is not None:
            request_deadline.stop(self._clock)
        if self._token is not None:
            _current_call.reset(self._token)
        withdrawn = self._withdrawn
        if withdrawn is not None and not (
            isinstance(error, asyncio.CancelledError) and self._task is not None and self._task.uncancel() == 0
        ):
            withdrawn = None  # it ended otherwise, or is cancelled for another reason too: that goes on
        if withdrawn is not None:
            error = withdrawn
        if isinstance(error, Exception) and not self.counted:
            self.service.refused(self.protocol, self.model, self.version, error, self.started)
        if self.large:
            await self.service.give_back_memory()
        if withdrawn is not None:
            raise withdrawn from None


_current_call: ContextVar[InferenceCall | None] = ContextVar("onnxserve_inference_call", default=None)


class Pin:
    """One model version held for a request that the service answers in several parts (an embeddings
    request cut into pieces of ``max_batch_size``): see :meth:`InferenceService.pinned`."""

    __slots__ = ("model", "parts")

    def __init__(self, model: ModelVersion, parts: int) -> None:
        self.model = model
        self.parts = Parts(parts)  # its parts count as one request at the version's pace (``core.pace``)

    @property
    def version(self) -> str:
        """The version's number, as its parts' requests name it."""
        return str(self.model.version)


class InferenceService:
    """Health, metadata and inference over the models in one registry."""

    def __init__(
        self,
        registry: ModelRegistry,
        threads: int = 4,
        extensions: tuple[str, ...] = (),
        manager: ModelManager | None = None,
        strict_readiness: bool = True,
        request_timeout: float = 0.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.registry = registry
        self.request_timeout = request_timeout  # seconds; 0: requests have no time limit unless they set one
        self.max_response_bytes = max_response_bytes  # 0: no limit
        self.manager = manager
        self.strict_readiness = strict_readiness
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onnxserve-infer")
        self._extensions = extensions
        self._live = True
        self.draining = False  # set on SIGTERM: not ready, new requests refused, open ones finish
        self.in_flight = 0  # inference requests being answered
        self.text_budget = TextBudget()  # characters of text being tokenized, server-wide (core.text_budget)

    def live(self) -> bool:
        return self._live

    def ready(self) -> bool:
        """Live, not draining, and (strict readiness) every model has a ready version and none is loading."""
        if not self._live or self.draining:
            return False
        return self.registry.all_ready() if self.strict_readiness else True

    async def load_model(self, name: str, parameters: Sequence[str] = ()) -> None:
        """Explicit model control: load (or reload) a model by name, from its repository folder.

        ``parameters`` are the names of the load request's parameters: Triton's ``config`` and ``file:``
        overrides are refused rather than ignored (the folder is what is loaded)."""
        control = self._control()
        if parameters:
            named = ", ".join(shown(p) for p in sorted(parameters)[:8])
            raise InvalidInputError(
                f"load parameters are not supported ({named}): onnxserve loads the model as its repository "
                "folder holds it; change the folder (or the model config file) and load again"
            )
        await control.load(name)

    async def unload_model(self, name: str) -> None:
        await self._control().unload(name)

    def _control(self) -> ModelManager:
        if self.manager is None:
            raise InvalidInputError("model control is off: start the server with --model-control-mode explicit")
        return self.manager

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether the model (or that version of it) can serve now; unknown models raise ModelNotFoundError."""
        served = self.registry.get(name)
        if version:
            return served.lookup(version).ready
        return any(v.ready for v in served.versions.values())

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(SERVER_NAME, __version__, self._extensions)

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        model = self.registry.resolve(name, version)
        served = self.registry.get(name)
        return ModelMetadata(
            name=name,
            version=str(model.version),
            versions=[str(v) for v in served.version_numbers()],
            platform=PLATFORM,
            inputs=model.inputs,
            outputs=model.outputs,
            task=model.pipeline.spec.task if model.pipeline is not None else None,
            pipeline=model.pipeline.spec if model.pipeline is not None else None,
            vocabulary_size=model.pipeline.tokenizer.get_vocab_size(True) if model.pipeline is not None else 0,
            text_characters=model.pipeline.max_characters if model.pipeline is not None else 0,
        )

    @asynccontextmanager
    async def tokenized(
        self, name: str, version: str | None, texts: Sequence[str], special_tokens: bool = True
    ) -> AsyncIterator[list[Encoding]]:
        """The model's tokenizer's encodings of ``texts`` (truncated to its max length), made off the event
        loop, for the block that answers with them. Like an inference request's, their characters are held
        in the model version's text room from before tokenizing until the block ends (the encodings and
        whatever is built of them live that long), and in the server-wide budget while the tokenizer runs:
        requests that only tokenize are bounded as inference requests are (an outside attack grew the
        server by 45 MB per concurrent request of 2,048 texts of 256 characters until it crashed, when
        their encodings waited for the answer's conversion uncounted)."""
        model = self.registry.resolve(name, version)
        pipeline = model.pipeline
        if pipeline is None:
            raise InvalidInputError(f"model {name!r} takes tensors, not text: it has no tokenizer")
        if not texts:
            raise InvalidInputError("no text to tokenize; send at least one")
        bounded = pipeline.bounded(TextBatch(list(texts)))  # as long as the tokenizer keeps, no longer
        encode = partial(pipeline.tokenizer.encode_batch, bounded.texts, add_special_tokens=special_tokens)
        call = _current_call.get()
        client = call.client if call is not None else ""
        async with model.text_room.held(charged(bounded), client):
            async with self.text_budget.held(charged(bounded), client):
                encodings: list[Encoding] = await _until_returned(self._executor, encode)
            yield encodings

    async def _tokenize_and_run(self, model: ModelVersion, work: Work) -> tuple[int, Scheduled]:
        """Tokenize a larger text request off the event loop and run it (``core.text_budget``): its
        characters (``charged``: each text counts some more) held in its model version's room from before
        tokenizing until it has run (its tokens live that long), and in the server-wide budget only while it
        is tokenized. The model's room comes first: a request its busy model has no room for waits
        untokenized, and holds nothing that requests to other models need. It is tokenized in slices
        (``core.text_slices``) and holds its kept tokens only (``core.tokens``)."""
        assert work.text is not None
        characters = charged(work.text)
        async with model.text_room.held(characters, work.client, work.progress):
            async with self.text_budget.held(characters, work.client, work.progress):
                # On its way: a batch about to go may wait for it (the scheduler's ``gather_us``).
                model.scheduler.incoming += 1
                try:
                    tokenize_ns = await self._tokenize_in_slices(model, work)
                finally:
                    model.scheduler.incoming -= 1
            scheduled = await chunking.submit(model, work)
            work.encodings = []
        return tokenize_ns, scheduled

    async def _tokenize_in_slices(self, model: ModelVersion, work: Work) -> int:
        """Tokenize ``work``'s texts slice by slice on the service's threads into its kept tokens; returns the
        time it took. Before each slice it stops if a budget it holds was closed (a drain that ended, its
        version unloaded): a caller that goes away, or a time limit that passes, waits for one slice at most."""
        assert model.pipeline is not None
        assert work.text is not None
        builder = KeptBuilder(model.pipeline.reads_positions)
        start, took = 0, 0
        while start < len(work.text.texts):
            self.text_budget.check_open()
            model.text_room.check_open()
            start, ns = await _until_returned(
                self._executor, text_slices.tokenize_slice, model.pipeline, work.text, builder, start
            )
            took += ns
        work.encodings = builder.build()
        return took

    def model_configuration(self, name: str, version: str | None = None) -> ModelConfiguration:
        model = self.registry.resolve(name, version)
        batched = model.max_batch_size > 0

        def unbatched(spec: TensorSpec) -> TensorSpec:
            return TensorSpec(spec.name, spec.datatype, spec.shape[1:], spec.dim_names[1:]) if batched else spec

        return ModelConfiguration(
            name=name,
            platform=PLATFORM,
            max_batch_size=model.max_batch_size,
            inputs=[unbatched(s) for s in model.inputs],
            outputs=[unbatched(s) for s in model.outputs],
        )

    def call(self, protocol: str, model: str = "", version: str = "", client: str = "") -> InferenceCall:
        """The scope of one inference request in a protocol front end (see ``InferenceCall``); ``client``
        names its sender for fair scheduling (requests without a call share the client "")."""
        return InferenceCall(self, protocol, model, version, client)

    def refused(
        self, protocol: str, model: str, version: str, error: BaseException, started: int | None = None
    ) -> None:
        """Count an inference request refused before it reached a model version (rows and phases zero)."""
        kind = error.kind if isinstance(error, OnnxServeError) else ErrorKind.INTERNAL
        model, version = self._served_labels(model, version)
        elapsed = 0 if started is None else time.perf_counter_ns() - started
        self._report(RequestRecord(model, version, protocol, kind, 0, 0, 0, elapsed))

    async def give_back_memory(self) -> None:
        """Return the C allocator's free memory to the system, on an inference thread: a burst of large
        requests answered together shares two or three trims instead of one each
        (:func:`onnxserve.core.memory.give_back_memory`)."""
        await give_back_memory(self._executor)

    def _served_labels(self, model: str, version: str) -> tuple[str, str]:
        """The model and version a client named when the server serves them, else ""."""
        try:
            served = self.registry.get(model)
        except OnnxServeError:
            return "", ""
        if not version:
            return model, ""
        try:
            return model, str(served.lookup(version).version)
        except OnnxServeError:
            return model, ""

    def _report(self, record: RequestRecord) -> None:
        call = _current_call.get()
        if call is not None:
            call.counted = True
        self.registry.observers.request(record)

    @contextmanager
    def pinned(self, name: str, version: str | None, parts: int = 1) -> Iterator[Pin]:
        """The version of model ``name`` that ``version`` names now, for a request answered in ``parts`` parts:
        each part given the pin to :meth:`infer` is answered by that version, even once a newer one has
        taken over and this one only drains (its unload waits for the block to end, as for any request in
        flight), so one answer never mixes two versions' results. Its parts count as one request in the
        version's estimate of the work in flight (``core.pace``): admitted with the first, given up together."""
        model = self.registry.resolve(name, version)
        model.active += 1
        pin = Pin(model, parts)
        try:
            yield pin
        finally:
            pin.parts.close()
            model.active -= 1

    async def infer(self, request: InferenceRequest, pin: Pin | None = None) -> InferenceResponse:
        """Answer ``request``; with a ``pin`` (:meth:`pinned`), by the pinned version of its model."""
        started = time.perf_counter_ns()
        try:
            if self.draining:
                raise UnavailableError("the server is shutting down; send the request to another replica")
            check_request(request)
            limit = time_limit(request, self.request_timeout)
            if pin is not None and pin.model.name == request.model_name:
                model = pin.model
            else:
                model = self.registry.resolve(request.model_name, request.model_version)
        except OnnxServeError as e:
            call = _current_call.get()
            protocol = request.protocol or (call.protocol if call is not None else "")
            self.refused(protocol, request.model_name, request.model_version or "", e, started)
            raise
        self.in_flight += 1
        model.active += 1
        try:
            return await self._infer(request, model, started, limit, pin.parts if pin is not None else None)
        finally:
            self.in_flight -= 1
            model.active -= 1

    async def _infer(
        self, request: InferenceRequest, model: ModelVersion, started: int, limit: float | None, parts: Parts | None
    ) -> InferenceResponse:
        try:
            work = _work(request, model, self.max_response_bytes)
            work.parts = parts
            call = _current_call.get()
            if call is not None:
                work.client = call.client
                work.progress = call.progress
                if work.text is not None and charged(work.text) > SMALL_REQUEST_CHARACTERS:
                    call.large = True  # many tokens made and dropped: give memory back once answered or refused
            tokenize_ns = 0
            # the server's limit counts from the request's arrival: decoding its body took some of it
            async with asyncio.timeout(request_deadline.bounded(limit)) as deadline:
                when = deadline.when()
                work.deadline = when
                if when is not None and when - asyncio.get_running_loop().time() < INLINE_DEADLINE_MARGIN_S:
                    work.inline = False  # on the thread, where the deadline can interrupt its wait
                if work.text is None:
                    scheduled = await chunking.submit(model, work)  # in chunks when it is above the token budget
                elif _tokenizes_inline(work.text):
                    tokenize_ns = _tokenize(model, work)
                    scheduled = await chunking.submit(model, work)
                else:
                    tokenize_ns, scheduled = await self._tokenize_and_run(model, work)
            outputs = scheduled.outcome.outputs
            if any(array.dtype == object for array in outputs.values()):  # BYTES: counting takes a while
                size = await asyncio.get_running_loop().run_in_executor(self._executor, response_bytes, outputs)
            else:
                size = response_bytes(outputs)
            if 0 < self.max_response_bytes < size:
                # Nothing that holds the outputs may stay in this frame: the error's traceback keeps it.
                del scheduled, outputs
                await self.give_back_memory()
                raise response_too_large(model.name, size, self.max_response_bytes)
        except (OnnxServeError, TimeoutError) as caught:
            if isinstance(caught, OnnxServeError):
                e = caught
            elif deadline.expired() and limit is not None:
                e = DeadlineExceededError(
                    f"model {model.name!r}: the request's time limit of {limit * 1000:g} ms passed before it "
                    "was answered; it was dropped"
                )
            else:
                raise
            elapsed = time.perf_counter_ns() - started
            model.stats.record_failure(elapsed)
            self._report(RequestRecord(model.name, str(model.version), request.protocol, e.kind, 0, 0, 0, elapsed))
            try:
                if e is caught:
                    raise
                raise e from None
            finally:
                # the error's traceback holds this frame: were ``e`` left in it, the two would make a cycle
                # that keeps the version (``model``) until a garbage collection, past its unload
                del e
        held = max(size, held_bytes(outputs.values()), held_bytes(t.data for t in request.inputs))
        if held >= LARGE_PAYLOAD_BYTES:
            call = _current_call.get()
            if call is not None:
                call.large = True  # once it is encoded and answered
            else:
                await self.give_back_memory()
        outcome = scheduled.outcome
        specs = {s.name: s for s in model.outputs}
        response = InferenceResponse(
            model_name=model.name,
            model_version=str(model.version),
            outputs=[
                Tensor(name, specs[name].datatype if name in specs else datatypes.from_numpy(array.dtype), array)
                for name, array in outcome.outputs.items()
            ],
            id=request.id,
            parameters={"truncated": outcome.truncated} if outcome.truncated else {},
        )
        rows = work.rows if model.batches_rows else 1
        input_ns = tokenize_ns + outcome.input_ns
        total = time.perf_counter_ns() - started
        model.stats.record_success(rows, scheduled.queue_ns, input_ns, outcome.infer_ns, outcome.output_ns, total)
        compute = input_ns + outcome.infer_ns + outcome.output_ns
        self._report(
            RequestRecord(
                model.name, str(model.version), request.protocol, None, rows, scheduled.queue_ns, compute, total
            )
        )
        return response

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version with its state (only ready ones with ``ready_only``): loaded ones, ones
        that failed to load (with the reason) and, under explicit control, models not loaded (from the
        catalog's shared reading: ``ModelManager.known_models``)."""
        entries = self.served_index()
        if self.manager is not None and self.manager.mode is ControlMode.EXPLICIT and not ready_only:
            listed = set(self.registry.names()) | {e.name for e in entries}  # (a set: 3,000 names were 0.3 s)
            entries += [
                IndexEntry(name, "", ModelState.UNAVAILABLE.value, "not loaded")
                for name in await self.manager.known_models()
                if name not in listed
            ]
        return [e for e in entries if e.state == ModelState.READY.value or not ready_only]

    def served_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """The repository index of the versions the server has: loaded, loading, failed (no catalog read)."""
        entries = [_index_entry(v) for m in self.registry for v in (m.versions[n] for n in m.version_numbers())]
        loaded = {(e.name, e.version) for e in entries}
        now = time.monotonic()
        for (name, number), since in sorted(self.registry.loading.items()):
            if (name, str(number)) not in loaded:  # (a version loaded again serves meanwhile: shown READY)
                waited = f"loading for {now - since:.0f} s"
                entries.append(IndexEntry(name, str(number), ModelState.LOADING.value, waited))
                loaded.add((name, str(number)))
        for (name, number), reason in sorted(self.registry.failures.items()):
            if (name, str(number)) not in loaded:
                entries.append(IndexEntry(name, str(number), ModelState.UNAVAILABLE.value, reason))
        return [e for e in entries if e.state == ModelState.READY.value or not ready_only]

    def version_states(self, name: str, version: str | None = None) -> list[IndexEntry]:
        """The state of the version a number or label names, or of every version of the model: the
        versions served and, as in the repository index, those that failed to load (UNAVAILABLE with
        the reason), also when no version of the model loaded."""
        failed = {
            str(number): IndexEntry(name, str(number), ModelState.UNAVAILABLE.value, reason)
            for (model, number), reason in sorted(self.registry.failures.items(), reverse=True)
            if model == name
        }
        try:
            served = self.registry.get(name)
            if version:
                return [_index_entry(served.lookup(version))]
        except ModelNotFoundError:
            if version and version in failed:
                return [failed[version]]
            if not version and failed:
                return list(failed.values())
            raise
        entries = [_index_entry(served.versions[n]) for n in served.version_numbers()]
        return entries + [e for number, e in failed.items() if int(number) not in served.versions]

    def model_statistics(self, name: str = "", version: str | None = None) -> list[VersionStatistics]:
        """Statistics of one model version, of every version of one model, or (no name) of all models."""
        if name and version:
            chosen = [self.registry.resolve(name, version)]
        elif name:
            served = self.registry.get(name)
            chosen = [served.versions[v] for v in served.version_numbers()]
        else:
            chosen = [m.versions[v] for m in self.registry for v in m.version_numbers()]
        return [VersionStatistics(m.name, str(m.version), m.stats.snapshot()) for m in chosen]

    def close(self) -> None:
        self._live = False
        self.registry.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
