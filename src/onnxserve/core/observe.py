"""What the core tells observers (metrics, logs) about requests, executions and model versions.

The core calls an ``Observer``; it never knows who listens. The server's Prometheus metrics are one
observer (``onnxserve.server.metrics``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from onnxserve.errors import ErrorKind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestRecord:
    """One inference request, answered or failed; one refused before it reached a model version has
    rows and phases zero, and the model and version the client named when served, else ""."""

    model: str
    version: str
    protocol: str  # the front end: "v2_rest", "v2_grpc", "tfserving_rest", "openai", "tei", or "" (Python API)
    error: ErrorKind | None  # None: answered
    rows: int
    queue_ns: int
    compute_ns: int  # input preparation + inference + output preparation
    total_ns: int


@dataclass(frozen=True)
class ExecutionRecord:
    """One model execution: a batch of ``batch_size`` rows from one or more requests."""

    model: str
    version: str
    batch_size: int
    compute_ns: int


@dataclass(frozen=True)
class VersionRecord:
    """A model version changed state: a ModelState (LOADING, READY, UNLOADING, UNAVAILABLE), or
    UNLOADED when it is gone from memory."""

    model: str
    version: str
    state: str
    load_seconds: float | None = None  # set when a load finished
    reason: str = ""


class Observer(Protocol):
    def request(self, record: RequestRecord) -> None: ...

    def execution(self, record: ExecutionRecord) -> None: ...

    def version(self, record: VersionRecord) -> None: ...


class Observers:
    """Fan-out to every registered observer; an observer that raises never breaks serving."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def request(self, record: RequestRecord) -> None:
        for observer in self._observers:
            self._safely(observer.request, record)

    def execution(self, record: ExecutionRecord) -> None:
        for observer in self._observers:
            self._safely(observer.execution, record)

    def version(self, record: VersionRecord) -> None:
        for observer in self._observers:
            self._safely(observer.version, record)

    @staticmethod
    def _safely(call: Callable[[Any], None], record: object) -> None:
        try:
            call(record)
        except Exception:
            log.exception("an observer failed on %s", type(record).__name__)
