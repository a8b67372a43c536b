"""The JSON documents the page draws: a served version's graph, pages of its weights, and version diffs.

All are computed by the toolkit (``build_graph``, ``weight_values``, ``diff_models``) from the
versions' ``model.onnx`` files, and are meant to run off the event loop. Graphs and diffs are kept
per file version (path, modification time, size): a version reloaded from a changed file gets a fresh
document; an unchanged one is not read again.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import orjson

from onnxserve.errors import ModelLoadError
from onnxserve.toolkit import diff, graph

FileKey = tuple[str, int, int]
"""A model file as it is now: path, modification time (ns), size."""

MAX_PAGE = 10_000
"""The most weight values one request may ask for."""


def file_key(path: Path) -> FileKey:
    try:
        stat = path.stat()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the model file: {e.strerror}") from None
    return (str(path), stat.st_mtime_ns, stat.st_size)


def graph_json(path: Path) -> bytes:
    """``build_graph(model).to_json()`` of the model at ``path`` (the ``onnxserve inspect --format json`` document)."""
    return _graph_json(file_key(path))


def weight_page(path: Path, name: str, offset: int, limit: int) -> bytes:
    """``limit`` values of initializer ``name`` from flat position ``offset``, with the total count."""
    page = graph.weight_values(graph.load_model(path), name, offset, min(limit, MAX_PAGE), base_dir=path.parent)
    return orjson.dumps(asdict(page))


def diff_json(a: Path, b: Path) -> bytes:
    """``diff_models(a, b).to_json()`` as ``diff``, and the nodes each side's graph highlights."""
    return _diff_json(file_key(a), file_key(b))


@lru_cache(maxsize=4)
def _graph_json(key: FileKey) -> bytes:
    path = Path(key[0])
    document = graph.build_graph(graph.load_model(path), base_dir=path.parent, sample_values=0)
    return orjson.dumps(document.to_json())


@lru_cache(maxsize=4)
def _diff_json(a: FileKey, b: FileKey) -> bytes:
    found = diff.diff_models(diff.load_model(Path(a[0])), diff.load_model(Path(b[0])))
    return orjson.dumps(
        {"diff": found.to_json(), "highlight": {"a": found.highlight_a(), "b": found.highlight_b()}},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
