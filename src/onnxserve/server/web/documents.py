"""The JSON documents the page draws: a served version's graph, pages of its weights, and version diffs.

All are computed by the toolkit (``build_graph``, ``weight_array``, ``diff_models``) from the versions'
``model.onnx`` files. ``DocumentCache`` keeps them per file version (path, modification time, size), so
a model is parsed once however many clients ask:

- computed on worker threads, never on the event loop, at most ``concurrency`` at a time; concurrent
  requests for the same document wait for the one computation;
- bounded in size: least recently used entries go once the cache holds more than ``max_bytes``, and a
  document larger than that is computed for its request (one at a time, as any other) and not kept;
- dropped when their version unloads (``retain``); a version reloaded from a changed file gets a fresh
  document.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy.typing as npt
import onnx
import orjson

from onnxserve.errors import InvalidInputError, ModelLoadError
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


def file_key(path: Path) -> FileKey:
    try:
        stat = path.stat()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the model file: {e.strerror}") from None
    return (str(path), stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True)
class Weights:
    """Every initializer of a model file with its values, read once."""

    tensors: dict[str, tuple[onnx.TensorProto, npt.NDArray[Any]]]

    @property
    def nbytes(self) -> int:
        return sum(int(values.nbytes) for _, values in self.tensors.values())

    def page(self, name: str, offset: int, limit: int) -> bytes:
        """``limit`` values of initializer ``name`` from flat position ``offset``, with the total count."""
        if name not in self.tensors:
            raise InvalidInputError(f"the model has no initializer named {name!r}")
        tensor, values = self.tensors[name]
        return orjson.dumps(asdict(graph.page_of(tensor, values, offset, min(limit, MAX_PAGE))))


def graph_json(path: Path) -> bytes:
    """``build_graph(model).to_json()`` of the model at ``path`` (the ``onnxserve inspect --format json`` document)."""
    document = graph.build_graph(load_model(path), base_dir=path.parent, sample_values=0)
    return orjson.dumps(document.to_json())


def read_weights(path: Path) -> Weights:
    model = load_model(path)
    tensors = {}
    for tensor in model.graph.initializer:
        values = graph.weight_array(tensor, path.parent)
        tensor.ClearField("raw_data")  # the values live in the array now; keep only name, type and dims
        tensors[tensor.name] = (tensor, values)
    return Weights(tensors)


def diff_json(a: Path, b: Path) -> bytes:
    """``diff_models(a, b).to_json()`` as ``diff``, and the nodes each side's graph highlights."""
    found = diff.diff_models(load_model(a), load_model(b))
    return orjson.dumps(
        {"diff": found.to_json(), "highlight": {"a": found.highlight_a(), "b": found.highlight_b()}},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def _size(value: object) -> int:
    return value.nbytes if isinstance(value, Weights) else len(value) if isinstance(value, bytes) else 0


class DocumentCache:
    """Graph, weight and diff documents per model file version; see the module."""

    def __init__(self, max_bytes: int = CACHE_BYTES, concurrency: int = CONCURRENCY) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[object, int, tuple[str, ...]]] = OrderedDict()
        self._computing: dict[Hashable, asyncio.Task[object]] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self.computed = 0  # computations run (for tests and curiosity)

    @property
    def held_bytes(self) -> int:
        return sum(size for _, size, _ in self._entries.values())

    async def graph(self, path: Path) -> bytes:
        key = ("graph", file_key(path))
        document = await self._get(key, (str(path),), lambda: graph_json(path))
        assert isinstance(document, bytes)
        return document

    async def weight_page(self, path: Path, name: str, offset: int, limit: int) -> bytes:
        key = ("weights", file_key(path))
        weights = await self._get(key, (str(path),), lambda: read_weights(path))
        assert isinstance(weights, Weights)
        return weights.page(name, offset, limit)

    async def diff(self, a: Path, b: Path) -> bytes:
        key = ("diff", file_key(a), file_key(b))
        document = await self._get(key, (str(a), str(b)), lambda: diff_json(a, b))
        assert isinstance(document, bytes)
        return document

    def retain(self, files: Iterable[str]) -> None:
        """Drop every document of a file that is not among ``files`` (the loaded versions' model files)."""
        live = set(files)
        for key in [k for k, (_, _, paths) in self._entries.items() if not live.issuperset(paths)]:
            del self._entries[key]

    async def _get(self, key: Hashable, paths: tuple[str, ...], compute: Callable[[], object]) -> object:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        task = self._computing.get(key)
        if task is None:
            # Its own task: a client that goes away does not stop the computation others wait for.
            task = asyncio.get_running_loop().create_task(self._compute(key, paths, compute))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, always
            self._computing[key] = task
        return await asyncio.shield(task)

    async def _compute(self, key: Hashable, paths: tuple[str, ...], compute: Callable[[], object]) -> object:
        try:
            async with self._slots:
                value = await asyncio.to_thread(compute)
        finally:
            del self._computing[key]
        self.computed += 1
        self._keep(key, paths, value)
        return value

    def _keep(self, key: Hashable, paths: tuple[str, ...], value: object) -> None:
        size = _size(value)
        if size > self.max_bytes:
            return
        self._entries[key] = (value, size, paths)
        while self.held_bytes > self.max_bytes:
            self._entries.popitem(last=False)
