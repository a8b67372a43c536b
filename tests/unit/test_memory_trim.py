"""Free memory goes back after large requests and answers, BYTES ones included, and a burst of them shares its
trims (issue 14, outside attack rt9 N3: 24 requests of a million empty strings left the server at 1.0 GB,
a third of it after ``malloc_trim``; their tensor bytes alone did not count as large)."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest

from onnxserve.core import memory
from onnxserve.core.memory import _glibc
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import LARGE_PAYLOAD_BYTES, OBJECT_ELEMENT_BYTES, InferenceService, held_bytes
from waiting import wait_until

TRIMMED = "malloc_trim gave free memory back"


def test_bytes_elements_count_at_their_least_python_size() -> None:
    strings = np.empty(-(-LARGE_PAYLOAD_BYTES // OBJECT_ELEMENT_BYTES), dtype=object)  # just enough
    strings[:] = b""
    assert held_bytes([strings]) == strings.size * OBJECT_ELEMENT_BYTES  # large, though 8 bytes an element
    assert held_bytes([strings[:-1]]) < LARGE_PAYLOAD_BYTES <= held_bytes([strings])
    numbers = np.zeros(1000, dtype=np.float32)
    assert held_bytes([numbers, strings[:10]]) == 4000 + 10 * OBJECT_ELEMENT_BYTES


@pytest.mark.skipif(_glibc("malloc_trim") is None, reason="the C library is not glibc")
def test_trims_asked_for_while_one_runs_are_shared_across_the_process(caplog: pytest.LogCaptureFixture) -> None:
    """One trim at a time; one more waits for it; the rest return at once (the waiting one covers them)."""
    service = InferenceService(ModelRegistry(), threads=1)
    try:
        with caplog.at_level(logging.DEBUG, logger="onnxserve.core.memory"):
            with memory._TRIMS._running:  # a trim runs (on some thread) meanwhile
                waiting = threading.Thread(target=memory.give_back_free_memory)
                waiting.start()
                wait_until(lambda: memory._TRIMS.queued, what="a trim waiting for the running one")
                others = [threading.Thread(target=memory.give_back_free_memory) for _ in range(8)]
                for other in others:
                    other.start()
                for other in others:
                    other.join(timeout=10)
                    assert not other.is_alive()  # returned at once: the waiting trim covers it
                asyncio.run(asyncio.wait_for(service.give_back_memory(), 10))  # the service's too, off the loop
                assert waiting.is_alive()
                assert not _trims(caplog)
            waiting.join(timeout=10)
            assert len(_trims(caplog)) == 1  # the one that waited; the nine others shared it
            asyncio.run(service.give_back_memory())  # alone: trims at once, on an inference thread
            assert len(_trims(caplog)) == 2
    finally:
        service.close()


def _trims(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if TRIMMED in r.getMessage()]
