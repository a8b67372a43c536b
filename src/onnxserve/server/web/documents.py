"""The JSON documents the page draws: a served version's graph, pages of its weights, and version diffs.

All are computed by the toolkit (``build_graph``, ``weight_array``, ``diff_models``) from the versions'
``model.onnx`` files. ``DocumentCache`` keeps them per file version (path, modification time, size), so
a model is parsed once however many clients ask:

- computed in worker processes (``DOCUMENT_WORKERS``), never on the event loop nor under the server's
  interpreter lock, each under a memory cap of its cost + ``HEADROOM`` and at most ``DOCUMENT_SECONDS``
  (past either: refused, and the refusal kept for the file, apart from the documents: see ``REFUSALS``);
  concurrent requests for the same document wait for the one computation;
- bounded in memory while computed: a document of model files of ``S`` bytes in all is counted as
  ``COST_FACTOR * S`` bytes (what parsing a model and summarizing its weights one initializer at a time
  takes at most, measured), plus ``NODE_COST`` per node of their main graphs for a graph or a diff (a
  file of many tiny nodes costs far more than its bytes), and the documents computed at once, at most
  ``concurrency`` of them, hold at most ``memory`` bytes together; others wait their turn. A document
  that alone would take more is refused at once (``TooLargeError``, 400), as is the graph or diff of a
  model of more than ``MAX_NODES`` nodes, and one that runs out of memory while computed
  (``ResourceExhaustedError``, 503 + Retry-After: it may fit once the others are done);
- bounded in size once computed: least recently used entries go once the cache holds more than
  ``max_bytes``, and a document larger than that is computed for its request and not kept;
- dropped when their version unloads (``retain``), refusals too; a version reloaded from a changed file
  gets a fresh document;
- refused with ``FileGoneError`` (NOT_FOUND, 404) when a loaded version's file was removed from disk
  (the version is served from memory, but there is no file left to compute its documents from).

The version page's header (``overview.onnx_header``) is cached the same way; reading it costs the
header, not the file, so it takes no share of ``memory`` and has its own ``HEADER_CONCURRENCY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import resource
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnx
import orjson

from onnxserve.core.memory import give_back_free_memory
from onnxserve.core.runtime import NO_MEMORY_TO_READ
from onnxserve.errors import (
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    OnnxServeError,
    ResourceExhaustedError,
    TooLargeError,
    UnavailableError,
)
from onnxserve.protocols.offload import Refusal, WorkerKind, WorkerPool
from onnxserve.server.web import overview
from onnxserve.toolkit import diff, graph
from onnxserve.toolkit.model_file import load_model

FileKey = tuple[str, int, int]
"""A model file as it is now: path, modification time (ns), size."""

MAX_PAGE = 10_000
"""The most weight values one request may ask for."""

CACHE_BYTES = 256 * 1024 * 1024
"""What the web page's document cache holds at most."""

CONCURRENCY = 2
"""Documents computed at once (each parses a whole model)."""

MiB = 1024 * 1024

MEMORY = 1024 * MiB
"""What the documents computed at once may hold together, counted at ``COST_FACTOR`` per model byte."""

COST_FACTOR = 2.5
"""A document's peak memory per byte of the model file(s) it reads (measured: see docs/limits.md)."""

NODE_COST = 4 * 1024
"""A graph or diff document's peak memory per node of the main graph(s), beside ``COST_FACTOR`` per file
byte: a node costs about 30 bytes of file but 3.1 KiB in a graph document (its Python objects and JSON),
1.9 KiB per side in a diff (measured on chains of 50,000 nodes: see docs/limits.md)."""

EXPANDED_COST = 4
"""A document's peak memory per byte its stored tensors take beyond the file once read (``declared``:
their dims and type, counted twice in typed fields, against the file's size), beside ``COST_FACTOR`` per
file byte (measured: 10 M int64 zeros, a 10 MB file, took +354 MB for the weights and +662 MB for a diff
of it with itself, 2.3 and 2.2 per byte beyond the file; 20 M INT8 zeros in ``int32_data``, a 20 MB file,
+256 MB for a graph document, 3.2 per byte beyond it)."""

PROPERTY_COST = 256
"""A document's peak memory per metadata property of the model (its key and value as Python strings,
and in the document): 1 M short properties, a 12.9 MB file, took +224 MB for a graph document (rt18)."""

NAME_COST = 5
"""A graph or diff document's peak memory per byte of its nodes' and values' names, beside ``COST_FACTOR``
per file byte: a name appears in a node, its edges and its values (40 nodes of 1 MB names, a 117 MB
file, took +707 MB for one graph document: outside attack rt17)."""

VALUE_COST = 1536
"""A graph or diff document's peak memory per input, output and value_info entry of its graphs (their
Python objects and JSON): a million value_info entries took +1,134 MB for one graph document (rt18)."""

VALUE_BYTE_COST = 40
"""A graph or diff document's peak memory per byte of those entries: a type's dims become Python numbers
and JSON (one value of 3 M dims, a 15 MB file: +495 MB, 33 bytes a byte; outside attack rt19)."""

LIST_ITEM_COST = 80
"""A graph or diff document's peak memory per number in a node's attribute list (``ints``, ``floats``): 10 M
``value_floats`` took +662 MB, 66 bytes each (rt19: a ``value_ints`` of 30 M in a 90 MB model, admitted
within the bound, ended the process in the JSON encoder)."""

OPSET_COST = 512
"""A document's peak memory per opset import of the model: 500,000 took +217 MB (rt19)."""

STRING_COST = 128
"""A document's peak memory per string value of the model's tensors and attributes, beside ``COST_FACTOR``
per file byte: the string as a Python object, its place in an array, and its text in a document (a
one-character string is 3 bytes of file; measured: see docs/limits.md)."""

MAX_NODES = 100_000
"""The most nodes a model may have for its graph or diff document (a diff: each model), its subgraphs'
and model-local functions' included. A browser cannot draw more, and the document of a larger one holds
the interpreter for seconds."""

DIFF_RUN_LIMITS = diff.RunLimits(rows=64, values=1 << 20, sizes_from_shapes=True, seconds=5.0)
"""A diff runs both models on inputs of at most these (its generated inputs are batches of 2 rows
of 8 tokens), each run for at most 5 s (a real model's run on them takes well under a second; a 79 KB
file can ask for hours); a model whose fixed input shapes ask for more, or whose tensors may grow by its
input values, is compared without running it."""

REFUSALS = 4096
"""The refusals of documents computed and refused (too large, too slow) kept, least recently asked leave
first. They are kept apart from the documents, so documents passing through the cache never push one out
(two 130 MiB weights documents evicted them, and a refused 60 s diff ran again: outside attack rt24); each is
a key and a message (under 1 KB: about 4 MB at most), one per served file and kind, or per
ordered pair of served versions, and leaves when its version unloads."""

HEADER_CONCURRENCY = 4
"""Version-page headers read at once."""

HEADROOM = 256 * MiB
"""What a graph or diff document's worker may take beyond the cost it is counted at (the counts estimate
a document's peak from what its model holds; the worker's cap makes the bound hold when a model holds
something no count foresaw)."""

WORKER_BYTES = MEMORY + HEADROOM + 512 * MiB
"""A document worker's memory cap when it starts (its imports, then one document at a time, each under
its own cap: cost + ``HEADROOM`` beyond what the worker holds when the document starts)."""

DOCUMENT_SECONDS = 60.0
"""The longest a document may take in its worker: past it the worker is stopped and the document refused
(kept for the file). Two diffs of 79 KB versions of 3,000 chained 1024 x 1024 MatMuls ran for minutes and
held both workers, and every other document waited (outside attack rt22); the 400 MB model's graph takes
about 3 s."""

WORKER_NICENESS = 10
"""Document workers yield the CPU to the server: a document takes seconds, a probe must not wait."""


def _no_document(reason: str) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the worker computing this web page document {reason}; retry later (`onnxserve inspect` shows any model)"
    )


def _stopping() -> UnavailableError:
    return UnavailableError("the server is shutting down; this web page document was not computed")


def _timed_out() -> UnavailableError:
    return UnavailableError("this web page document took longer than its request may wait")


DOCUMENT_WORKERS = WorkerKind(
    processes=CONCURRENCY,
    data_bytes=WORKER_BYTES,
    lost=_no_document,
    stopping=_stopping,
    timed_out=_timed_out,
    what="web page document",
    niceness=WORKER_NICENESS,
)
"""Graph and diff documents are computed in worker processes, one document at a time each, under a memory
cap of their own: a model that needs more than its counts say fails there (refused, 400), not in the
server, and parsing it never holds the server's interpreter lock (an 80 MB file of 40 M quantization
annotation entries, counted at 200 MB, took +2.1 GB and held a probe 10.8 s in the server: rt20)."""

_workers = WorkerPool(DOCUMENT_WORKERS)


class FileGoneError(ModelNotFoundError):
    """A loaded version's model file is no longer on disk: the version still serves from memory, but the
    documents of its file do not exist any more (NOT_FOUND: nothing the client or the server did wrong
    now, and nothing a retry would change until the version is loaded again)."""


GONE = "the model file of this version is no longer on disk"


def file_key(path: Path) -> FileKey:
    try:
        stat = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise FileGoneError(GONE) from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the model file: {e.strerror}") from None
    return (str(path), stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class Weights:
    """Every initializer of a model file with its values, read once."""

    tensors: dict[str, tuple[onnx.TensorProto, npt.NDArray[Any]]]
    nbytes: int
    """What the values hold: their arrays, and for STRING tensors each value's bytes object."""

    def page(self, name: str, offset: int, limit: int) -> bytes:
        """``limit`` values of initializer ``name`` from flat position ``offset``, with the total count."""
        if name not in self.tensors:
            raise InvalidInputError(f"the model has no initializer named {name!r}")
        tensor, values = self.tensors[name]
        return orjson.dumps(asdict(graph.page_of(tensor, values, offset, min(limit, MAX_PAGE))))


def _too_large(cap: int) -> TooLargeError:
    return TooLargeError(
        f"this web page document needs more than the {_mib(cap)} it may take (its model holds more than its "
        "counts show: many small entries); `onnxserve inspect` shows any model"
    )


def _in_worker(what: str, paths: tuple[str, ...], cap: int) -> bytes | Weights | Refusal:
    """In a document worker: the ``what`` document ("graph", "diff" or "weights") of ``paths``, within ``cap``
    bytes beyond what the worker holds now (its data segment, ``RLIMIT_DATA``)."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _data_segment() + cap
    resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        files = [Path(path) for path in paths]
        if what == "weights":
            return read_weights(files[0])
        return graph_json(files[0]) if what == "graph" else diff_json(files[0], files[1])
    except MemoryError:
        return Refusal.of(_too_large(cap))
    except OnnxServeError as e:
        return Refusal.of(_too_large(cap) if NO_MEMORY_TO_READ in e.message else e)
    finally:
        give_back_free_memory()


def _data_segment() -> int:
    """This process's data segment and private mappings now (``VmData``: what ``RLIMIT_DATA`` caps)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def graph_json(path: Path) -> bytes:
    """``build_graph(model).to_json()`` of the model at ``path`` (the ``onnxserve inspect --format json`` document)."""
    document = graph.build_graph(load_model(path), base_dir=path.parent, sample_values=0, release_weights=True)
    return orjson.dumps(document.to_json())


def read_weights(path: Path) -> Weights:
    model = load_model(path)
    tensors = {}
    for tensor in model.graph.initializer:
        values = graph.weight_array(tensor, path.parent)
        # The values live in the array now; keep only name, type and dims, in a message of their own
        # (protobuf frees the parsed model only once no part of it is referenced).
        kept = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        tensors[tensor.name] = (kept, values)
    return Weights(tensors, sum(_held(values) for _, values in tensors.values()))


def _held(values: npt.NDArray[Any]) -> int:
    """The memory of an array of ``weight_array``'s: a STRING tensor's holds a bytes object per value."""
    if values.dtype.kind != "O":
        return int(values.nbytes)
    return int(values.nbytes) + sum(sys.getsizeof(value) for value in values.reshape(-1))


def diff_json(a: Path, b: Path) -> bytes:
    """``diff_models(a, b).to_json()`` as ``diff``, and the nodes each side's graph highlights.

    The models are compared, then dropped for copies without their weights (protobuf gives memory
    back only with the whole message), and run from their files one after the other: the diff holds
    at most both models and two initializers, then at most one session."""
    model_a, model_b = load_model(a), load_model(b)
    found = diff.diff_models(model_a, model_b, run=False, files=(a, b))
    model_a, model_b = _without_weights(model_a), _without_weights(model_b)
    numeric = diff.compare_outputs(model_a, model_b, files=(a, b), limits=DIFF_RUN_LIMITS)
    found = replace(found, numeric=numeric)
    return orjson.dumps(
        {"diff": found.to_json(), "highlight": {"a": found.highlight_a(), "b": found.highlight_b()}},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the values of its large tensors (``graph.release_model_values``)."""
    graph.release_model_values(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _size(value: object) -> int:
    if isinstance(value, Weights):
        return value.nbytes
    if isinstance(value, overview.OnnxHeader):
        return len(value.doc_string) + sum(len(k) + len(v) for k, v in value.properties) + 1024
    return len(value) if isinstance(value, bytes) else 0


def _file_size(path: Path) -> int:
    """The size of an external data file (0 when it cannot be read: the document's reading says why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mib(size: int) -> str:
    return f"{size / MiB:,.0f} MiB"


class DocumentCache:
    """Graph, weight and diff documents and version headers per model file version; see the module."""

    def __init__(
        self,
        max_bytes: int = CACHE_BYTES,
        concurrency: int = CONCURRENCY,
        memory: int = MEMORY,
        cost_factor: float = COST_FACTOR,
        max_nodes: int = MAX_NODES,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_nodes = max_nodes
        self.memory = memory
        self.cost_factor = cost_factor
        self.concurrency = concurrency
        self._entries: OrderedDict[Hashable, tuple[object, int, tuple[str, ...]]] = OrderedDict()
        self._refusals: OrderedDict[Hashable, tuple[TooLargeError, tuple[str, ...]]] = OrderedDict()
        self._computing: dict[Hashable, asyncio.Task[object]] = {}
        self._admitted = asyncio.Condition()
        self._running = 0
        self._held = 0  # the cost of the documents computed now
        self._headers = asyncio.Semaphore(HEADER_CONCURRENCY)
        self.computed = 0  # documents computed (for tests and curiosity)
        self.headers_read = 0  # headers read (likewise)

    @property
    def held_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries.values())

    @property
    def refusals(self) -> int:
        """The refusals kept (at most ``REFUSALS``)."""
        return len(self._refusals)

    async def header(self, path: Path) -> overview.OnnxHeader:
        key = ("header", file_key(path))
        found = await self._get(key, (str(path),), _in_thread(lambda: overview.onnx_header(path)), None)
        assert isinstance(found, overview.OnnxHeader)
        return found

    async def graph(self, path: Path) -> bytes:
        key = ("graph", file_key(path))
        cost = self._cost("graph", key[1]) + await self._structure_cost("graph", path)
        cost = self._within(cost)
        document = await self._get(key, (str(path),), _in_worker_of("graph", (str(path),), cost), cost)
        assert isinstance(document, bytes)
        return document

    async def weight_page(self, path: Path, name: str, offset: int, limit: int) -> bytes:
        key = ("weights", file_key(path))
        cost = self._cost("weights", key[1]) + await self._structure_cost("weights", path, nodes=False)
        cost = self._within(cost)
        weights = await self._get(key, (str(path),), _in_worker_of("weights", (str(path),), cost), cost)
        assert isinstance(weights, Weights)
        return weights.page(name, offset, limit)

    async def diff(self, a: Path, b: Path) -> bytes:
        key = ("diff", file_key(a), file_key(b))
        cost = self._cost("diff", key[1], key[2])
        cost += await self._structure_cost("diff", a) + await self._structure_cost("diff", b)
        cost = self._within(cost)
        document = await self._get(key, (str(a), str(b)), _in_worker_of("diff", (str(a), str(b)), cost), cost)
        assert isinstance(document, bytes)
        return document

    def retain(self, files: Iterable[str]) -> None:
        """Drop every document of a file that is not among ``files`` (the loaded versions' model files)."""
        live = set(files)
        for key in [k for k, (_, _, paths) in self._entries.items() if not live.issuperset(paths)]:
            del self._entries[key]
        for key in [k for k, (_, paths) in self._refusals.items() if not live.issuperset(paths)]:
            del self._refusals[key]

    def _cost(self, what: str, *files: FileKey) -> int:
        """The memory the document of ``files`` is counted at; a TooLargeError when it can never fit."""
        size = sum(file[2] for file in files)
        cost = int(size * self.cost_factor)
        if cost > self.memory:
            largest = int(self.memory / self.cost_factor)
            raise TooLargeError(
                f"the {what} document of a model file of {_mib(size)} is too large for the web page: it "
                f"computes documents of models up to {_mib(largest)} (diffs: both files together)"
            )
        return cost

    async def _structure_cost(self, what: str, path: Path, nodes: bool = True) -> int:
        """What the model at ``path`` costs beyond its file, from its cached header: ``cost_factor`` per
        byte its tensors read from external data files (each tensor its own ``length``, or the whole file;
        read like the file's own weights, once per tensor that names them), ``EXPANDED_COST`` per byte its
        stored tensors take beyond the file once read (by their dims and type), ``STRING_COST`` per string
        value of its tensors and attributes, ``PROPERTY_COST`` per metadata property, ``OPSET_COST`` per
        opset import, and, for a graph or a diff, ``NAME_COST`` per byte of its names, ``VALUE_COST`` per
        value entry and ``VALUE_BYTE_COST`` per byte of them, ``LIST_ITEM_COST`` per number in attribute
        lists and ``NODE_COST`` per node (its subgraphs' and functions' included: they are parsed and
        compared too); a TooLargeError past ``max_nodes``."""
        header = await self.header(path)
        contents = header.contents
        named = sum(length if length >= 0 else _file_size(path.parent / file) for file, length in contents.external)
        # values that take more once read than they take in the file: small numbers in typed fields, sparse
        # tensors made dense (30 M int64 zeros, a 30 MB file, took +1.8 GB; three diffs of 127-byte files
        # with sparse initializers +3.8 GB: rt17)
        expanded = max(0, contents.declared - _file_size(path))
        cost = int(named * self.cost_factor) + expanded * EXPANDED_COST + contents.strings * STRING_COST
        cost += header.properties_total * PROPERTY_COST + len(header.opsets) * OPSET_COST
        if not nodes:
            return cost
        cost += contents.names * NAME_COST + contents.values * VALUE_COST + contents.value_bytes * VALUE_BYTE_COST
        cost += contents.list_items * LIST_ITEM_COST
        nodes_in = max(header.nodes, contents.all_nodes)  # subgraphs and functions cost as much
        if nodes_in > self.max_nodes:
            raise TooLargeError(
                f"the {what} document of a model of {nodes_in:,} nodes is too large for the web page: it "
                f"draws models of up to {self.max_nodes:,} nodes (`onnxserve inspect` shows any model)"
            )
        return cost + nodes_in * NODE_COST

    def _within(self, cost: int) -> int:
        """``cost``, or a TooLargeError when it can never fit in ``memory``."""
        if cost > self.memory:
            raise TooLargeError(
                f"this web page document is counted at {_mib(cost)} (its model and external data files and "
                f"nodes), more than "
                f"the {_mib(self.memory)} the web page computes documents in (--web-document-memory)"
            )
        return cost

    async def _get(
        self, key: Hashable, paths: tuple[str, ...], compute: Callable[[], Awaitable[object]], cost: int | None
    ) -> object:
        if key in self._refusals:  # refused once: the same file is refused again at once
            self._refusals.move_to_end(key)
            raise self._refusals[key][0].with_traceback(None)  # not the frames of every earlier refusal
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        task = self._computing.get(key)
        if task is None:
            # Its own task: a client that goes away does not stop the computation others wait for.
            # No request's time limit either: a document others may wait for is not cut by the first one's.
            computing = self._compute(key, paths, compute, cost)
            task = asyncio.get_running_loop().create_task(computing, context=contextvars.Context())
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, always
            self._computing[key] = task
        return await asyncio.shield(task)

    async def _compute(
        self, key: Hashable, paths: tuple[str, ...], compute: Callable[[], Awaitable[object]], cost: int | None
    ) -> object:
        try:
            if cost is None:
                async with self._headers:
                    value = await compute()
            else:
                async with self._admission(cost):
                    value = await compute()
        except TooLargeError as e:
            self._refuse(key, paths, e)
            raise
        except ModelLoadError:
            # removed between its check and its reading: not a server fault, nor a path to show
            if all(Path(path).is_file() for path in paths):
                raise
            raise FileGoneError(GONE) from None
        finally:
            del self._computing[key]
        if cost is None:
            self.headers_read += 1
        else:
            self.computed += 1
        self._keep(key, paths, value)
        return value

    @contextlib.asynccontextmanager
    async def _admission(self, cost: int) -> AsyncIterator[None]:
        """Wait until ``cost`` fits beside the documents computed now (and a slot is free); held meanwhile."""
        async with self._admitted:
            await self._admitted.wait_for(lambda: self._running < self.concurrency and self._held + cost <= self.memory)
            self._running += 1
            self._held += cost
        try:
            yield
        finally:
            async with self._admitted:
                self._running -= 1
                self._held -= cost
                self._admitted.notify_all()

    def _refuse(self, key: Hashable, paths: tuple[str, ...], refusal: TooLargeError) -> None:
        self._refusals[key] = (refusal, paths)
        self._refusals.move_to_end(key)
        while len(self._refusals) > REFUSALS:
            self._refusals.popitem(last=False)

    def _keep(self, key: Hashable, paths: tuple[str, ...], value: object) -> None:
        size = _size(value)
        if size > self.max_bytes:
            return
        self._entries[key] = (value, size, paths)
        while self.held_bytes > self.max_bytes:
            self._entries.popitem(last=False)


def _in_thread(compute: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    """``compute`` run on a worker thread (``_guarded``)."""
    return lambda: asyncio.to_thread(_guarded, compute)


def _in_worker_of(what: str, paths: tuple[str, ...], cost: int) -> Callable[[], Awaitable[object]]:
    """The ``what`` document of ``paths`` computed in a document worker, capped at ``cost`` + ``HEADROOM``
    and ``DOCUMENT_SECONDS`` (past them its worker is stopped and replaced)."""

    async def computed() -> object:
        try:
            async with asyncio.timeout(DOCUMENT_SECONDS):
                return await _workers.run(_in_worker, (what, paths, cost + HEADROOM))
        except TimeoutError:
            raise TooLargeError(
                f"this web page document took longer than {DOCUMENT_SECONDS:g} s to compute and was stopped "
                "(`onnxserve inspect` shows any model)"
            ) from None

    return computed


def _guarded(compute: Callable[[], object]) -> object:
    """``compute()``; running out of memory is a ResourceExhaustedError (retry once others are done)."""
    try:
        return compute()
    except MemoryError:
        raise _short_of_memory() from None
    except ModelLoadError as e:
        if NO_MEMORY_TO_READ in e.message:  # protobuf's parse could not allocate: memory, not the file
            raise _short_of_memory() from None
        raise


def _short_of_memory() -> ResourceExhaustedError:
    return ResourceExhaustedError("the server has not enough memory to compute this web page document now; retry later")
