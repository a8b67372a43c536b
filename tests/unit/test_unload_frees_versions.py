"""An unloaded version (its ONNX Runtime sessions, its weights) is freed when its unload ends, without
Python's cyclic garbage collector: a poll-mode server with little traffic rarely runs a full collection,
and each unload kept its version through a reference cycle (version -> text room -> refusal -> version),
so 30 reloads of the demo model took 247 -> 1,203 MB, still held 30 s later (outside attack rt25 F2).

The collector is off for the whole test, from the load on: any cycle through a version keeps it, and the
weak references below stay alive."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models
from onnxserve.config import ServerConfig, parse_config
from onnxserve.core.datatypes import from_v2 as dt
from onnxserve.core.manager import Catalog, ControlMode, ModelManager
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import InferenceService
from onnxserve.core.types import InferenceRequest, Tensor
from onnxserve.errors import InvalidInputError, UnavailableError
from onnxserve.protocols import embeddings


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _config(repo: Path, entries: list[dict[str, Any]]) -> ServerConfig:
    return parse_config({"model_config_list": entries}, "test config", repo)


def _tensor_request(name: str, rows: int = 1) -> InferenceRequest:
    x = np.arange(rows, dtype=np.float32).reshape(rows, 1)
    return InferenceRequest(model_name=name, inputs=[Tensor("x", dt("FP32"), x)])


class Served:
    """A registry, a service and an explicit-mode manager over ``repo``, all on one event loop."""

    def __init__(
        self, repo: Path, entries: list[dict[str, Any]], mode: ControlMode = ControlMode.EXPLICIT, drain: float = 5
    ) -> None:
        self.repo = repo
        self.registry = ModelRegistry.load(_config(repo, entries))
        self.manager = ModelManager(self.registry, Catalog(repository=repo), mode, drain_seconds=drain)
        self.service = InferenceService(self.registry, threads=2, manager=self.manager)

    def watch(self, name: str) -> list[weakref.ref[Any]]:
        """Weak references to every loaded version of ``name`` and its first session."""
        versions = list(self.registry.get(name).versions.values())
        return [weakref.ref(v) for v in versions] + [weakref.ref(v.session) for v in versions]

    async def traffic(self, name: str, text: bool) -> None:
        """Requests of every kind the version takes: single and batched tensors, or texts and token ids."""
        if text:
            model = embeddings.embedding_model(self.service, name)
            texts = [f"the cat sat on mat number {i}" for i in range(5)]
            await embeddings.embed(self.service, model, texts, "test")
            await embeddings.embed(self.service, model, ["the cat " * 300], "test")  # a long one, off the loop
            await embeddings.embed(self.service, model, [np.array([2, 7, 3], dtype=np.int64)], "test")
            return
        for rows in (1, 1, 2, 1):
            await self.service.infer(_tensor_request(name, rows))
        await asyncio.gather(*(self.service.infer(_tensor_request(name, 2)) for _ in range(6)))
        wrong = InferenceRequest(model_name=name, inputs=[Tensor("x", dt("FP32"), np.zeros((1, 3), np.float32))])
        with pytest.raises(InvalidInputError):  # a refusal's traceback passes through the version too
            await self.service.infer(wrong)

    def close(self) -> None:
        self.service.close()


LAYOUTS: dict[str, dict[str, Any]] = {
    "unbatched": {"max_batch_size": 0},  # DirectScheduler, cheap runs inline on the event loop
    "batched": {"max_batch_size": 4, "dynamic_batching": {"max_queue_delay_us": 500}},  # DynamicBatcher
    "instances": {"max_batch_size": 0, "instance_count": 2, "inline_run_us": 0},  # a pool of two sessions
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_an_unloaded_tensor_version_is_freed_at_once(tmp_path: Path, layout: str, no_cyclic_gc: None) -> None:
    models.write_version(tmp_path, "m", 1, models.offset_model(1.0))
    _assert_freed_by_unload(Served(tmp_path, [{"name": "m", "base_path": "m", **LAYOUTS[layout]}]), "m", text=False)


def test_an_unloaded_text_version_is_freed_at_once(tiny_text_version: Path, tmp_path: Path, no_cyclic_gc: None) -> None:
    shutil.copytree(tiny_text_version, tmp_path / "tiny" / "1")
    _assert_freed_by_unload(Served(tmp_path, [{"name": "tiny", "base_path": "tiny"}]), "tiny", text=True)


def _assert_freed_by_unload(served: Served, name: str, text: bool) -> None:
    """After traffic and an unload of ``name``, nothing of its versions is left (weak references dead)."""
    try:
        watched = served.watch(name)

        async def scenario() -> None:
            await served.traffic(name, text=text)
            await served.manager.unload(name)
            await served.manager.close()

        asyncio.run(scenario())
        assert [ref() is None for ref in watched] == [True] * len(watched)
    finally:
        served.close()


def test_versions_a_poll_replaces_or_removes_are_freed_at_once(tmp_path: Path, no_cyclic_gc: None) -> None:
    """The poll's paths: a changed entry loads the version again (the replaced one drains and goes), a
    version folder removed from disk, and a model removed from the config."""
    for number in (1, 2):
        models.write_version(tmp_path, "m", number, models.offset_model(float(number)))
    models.write_version(tmp_path, "gone", 1, models.offset_model(9.0))
    entries = [
        {"name": "m", "base_path": "m", "max_batch_size": 4, "model_version_policy": {"all": {}}},
        {"name": "gone", "base_path": "gone"},
    ]
    served = Served(tmp_path, entries, ControlMode.POLL)
    try:
        before = served.watch("m") + served.watch("gone")

        async def scenario() -> None:
            await served.traffic("m", text=False)
            await served.traffic("gone", text=False)
            shutil.rmtree(tmp_path / "m" / "1")
            changed = [{**entries[0], "max_batch_size": 2}]  # "gone" leaves the config, m's entry changes
            await served.manager.apply(_config(tmp_path, changed))
            await served.manager.close()
            assert list(served.registry.get("m").versions) == [2]
            assert served.registry.names() == ["m"]
            await served.traffic("m", text=False)  # the new load of version 2 serves

        asyncio.run(scenario())
        assert [ref() is None for ref in before] == [True] * len(before)
    finally:
        served.close()


@pytest.mark.parametrize("max_batch_size", [0, 1])
def test_a_version_unloaded_with_requests_waiting_is_freed_by_the_young_collections(
    tmp_path: Path, max_batch_size: int
) -> None:
    """Requests still waiting (and running) when the drain ends are answered 503 with the error the
    scheduler keeps for later requests; raised itself, that error took the traceback of a request, whose
    frames hold the version, so version -> scheduler -> error -> traceback -> version kept it until a full
    collection. Each request now gets a copy. (The requests' own futures and frames still make cycles of
    new objects, which the collector's young generations free many times a second in a busy process: the
    version is loaded and old, as in a server, and only those generations are collected here.)"""
    models.write_version(tmp_path, "paced", 1, models.value_paced_model("paced", 64))
    entry = {"name": "paced", "base_path": "paced", "instance_count": 1, "max_batch_size": max_batch_size}
    served = Served(tmp_path, [entry], drain=0.3)
    endless = InferenceRequest(model_name="paced", inputs=[Tensor("x", dt("FP32"), np.full((1, 1), 1e9, np.float32))])
    try:
        watched = served.watch("paced")
        gc.collect()  # the version is old, as a served one is
        gc.disable()

        async def scenario() -> list[str]:
            requests = [asyncio.ensure_future(served.service.infer(endless)) for _ in range(3)]
            while served.registry.get("paced").versions[1].active < 3:
                await asyncio.sleep(0.01)
            await served.manager.unload("paced")
            await served.manager.close()
            refused = []
            for request in requests:
                with pytest.raises(UnavailableError) as caught:
                    await request
                refused.append(str(caught.value))
            return refused

        refused = asyncio.run(scenario())
        assert sum("unloaded while this request ran" in m for m in refused) == 1, refused
        assert sum("unloaded before this request could run" in m for m in refused) == 2, refused
        gc.collect(1)
        assert [ref() is None for ref in watched] == [True] * len(watched)
    finally:
        gc.enable()
        served.close()
