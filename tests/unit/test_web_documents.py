"""The web page's document cache: one computation per document, bounded, dropped with its version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import onnx
import orjson
import pytest

import models
from onnxserve.errors import InvalidInputError
from onnxserve.server.web.documents import DocumentCache


def _model_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(models.offset_model(1.5), path)
    return path


def test_concurrent_requests_share_one_computation(tmp_path: Path) -> None:
    path = _model_file(tmp_path / "1")
    name = onnx.load(path).graph.node[0].output[0]  # Constant's output: not an initializer

    async def scenario() -> None:
        cache = DocumentCache()
        pages = await asyncio.gather(*(cache.graph(path) for _ in range(20)))
        assert len(set(pages)) == 1
        assert cache.computed == 1
        await asyncio.gather(*(cache.graph(path) for _ in range(5)))
        assert cache.computed == 1
        with pytest.raises(InvalidInputError, match="no initializer named"):
            await cache.weight_page(path, name, 0, 10)
        assert cache.computed == 2  # the weights, read once; the missing name is the request's fault

    asyncio.run(scenario())


def test_documents_leave_with_their_version_and_stay_within_the_bound(tmp_path: Path) -> None:
    one, two = _model_file(tmp_path / "1"), _model_file(tmp_path / "2")

    async def scenario() -> None:
        cache = DocumentCache()
        await cache.graph(one)
        await cache.graph(two)
        assert cache.held_bytes > 0
        cache.retain([str(two)])  # version 1 unloaded
        held = cache.held_bytes
        await cache.graph(two)
        assert cache.computed == 2
        await cache.graph(one)
        assert cache.computed == 3  # computed again: it had left
        assert cache.held_bytes > held

        tiny = DocumentCache(max_bytes=10)  # nothing fits: computed per request, never kept
        document = await tiny.graph(one)
        assert orjson.loads(document)["nodes"]
        assert tiny.held_bytes == 0

    asyncio.run(scenario())
