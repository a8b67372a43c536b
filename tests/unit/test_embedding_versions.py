"""An embeddings request cut into pieces (more inputs than ``max_batch_size``) is answered by one model
version, even when a new version takes over while its pieces run (an outside attack saw 96 of 1,024
vectors of one /v1/embeddings answer come from the new version, and a 500 when the two versions'
sizes differed)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnxserve.config import parse_config
from onnxserve.core.observe import ExecutionRecord, Observers, RequestRecord, VersionRecord
from onnxserve.core.registry import ModelRegistry, ModelVersion
from onnxserve.core.service import InferenceService
from onnxserve.core.types import ModelState
from onnxserve.protocols import embeddings


class TakeOverAfterFirstPiece:
    """When the first piece has been answered, version 2 takes over from version 1 (as a rollout does:
    the new version ready, the old one taking no new requests while it drains)."""

    def __init__(self) -> None:
        self.versions: dict[str, ModelVersion] = {}
        self.answered: list[str] = []

    def request(self, record: RequestRecord) -> None:
        self.answered.append(record.version)
        if len(self.answered) == 1:
            self.versions["2"].state = ModelState.READY
            self.versions["1"].state = ModelState.UNLOADING

    def execution(self, record: ExecutionRecord) -> None:
        pass

    def version(self, record: VersionRecord) -> None:
        pass


@pytest.fixture
def two_versions(tiny_text_version: Path, tmp_path: Path) -> Path:
    for number in (1, 2):
        shutil.copytree(tiny_text_version, tmp_path / "tiny" / str(number))
    return tmp_path


@pytest.mark.parametrize("inputs", ["texts", "token ids"])
def test_every_piece_of_a_request_is_answered_by_the_version_it_started_on(
    two_versions: Path, inputs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(
        {
            "model_config_list": [
                {"name": "tiny", "base_path": "tiny", "max_batch_size": 2, "model_version_policy": {"all": {}}}
            ]
        },
        "test config",
        two_versions,
    )
    observers = Observers()
    switch = TakeOverAfterFirstPiece()
    observers.add(switch)
    registry = ModelRegistry.load(config, observers)
    service = InferenceService(registry, threads=2)
    try:
        served = registry.get("tiny")
        switch.versions = {str(n): v for n, v in served.versions.items()}
        switch.versions["2"].state = ModelState.LOADING  # version 1 serves when the request arrives
        model = embeddings.embedding_model(service, "tiny")
        texts = [f"the cat sat on mat number {i}" for i in range(7)]
        ids = [np.array([2, 5 + i, 3], dtype=np.int64) for i in range(7)]
        monkeypatch.setattr(embeddings, "IN_FLIGHT_CHARACTERS", 1)  # one piece at a time: the switch comes between two
        embedded = asyncio.run(embeddings.embed(service, model, texts if inputs == "texts" else ids, "test"))
        assert embedded.vectors.shape[0] == 7
        assert switch.answered == ["1", "1", "1", "1"]  # four pieces of at most 2, all by version 1
        assert registry.resolve("tiny", None).version == 2  # while the next request goes to version 2
        assert switch.versions["1"].active == 0  # the pin let go
    finally:
        service.close()
