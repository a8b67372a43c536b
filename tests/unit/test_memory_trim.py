"""Free memory goes back after large requests and answers, BYTES ones included, and a burst of them shares its
trims (issue 14, outside attack rt9 N3: 24 requests of a million empty strings left the server at 1.0 GB,
a third of it after ``malloc_trim``; their tensor bytes alone did not count as large)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from onnxserve.core.memory import _glibc
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import LARGE_PAYLOAD_BYTES, OBJECT_ELEMENT_BYTES, InferenceService, held_bytes

TRIMMED = "malloc_trim gave free memory back"


def test_bytes_elements_count_at_their_least_python_size() -> None:
    strings = np.empty(-(-LARGE_PAYLOAD_BYTES // OBJECT_ELEMENT_BYTES), dtype=object)  # just enough
    strings[:] = b""
    assert held_bytes([strings]) == strings.size * OBJECT_ELEMENT_BYTES  # large, though 8 bytes an element
    assert held_bytes([strings[:-1]]) < LARGE_PAYLOAD_BYTES <= held_bytes([strings])
    numbers = np.zeros(1000, dtype=np.float32)
    assert held_bytes([numbers, strings[:10]]) == 4000 + 10 * OBJECT_ELEMENT_BYTES


@pytest.mark.skipif(_glibc("malloc_trim") is None, reason="the C library is not glibc")
def test_trims_asked_for_together_run_one_at_a_time_and_are_shared(caplog: pytest.LogCaptureFixture) -> None:
    service = InferenceService(ModelRegistry(), threads=2)

    async def burst() -> None:
        await asyncio.gather(*(service.give_back_memory() for _ in range(20)))
        await service.give_back_memory()  # alone: trims at once

    try:
        with caplog.at_level(logging.DEBUG, logger="onnxserve.core.memory"):
            asyncio.run(burst())
    finally:
        service.close()
    trims = [r for r in caplog.records if TRIMMED in r.getMessage()]
    assert len(trims) == 3  # the first, one shared by the 19 that came while it ran, the lone one
