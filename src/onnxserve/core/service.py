"""InferenceService: the one object every protocol calls.

It answers liveness, readiness and metadata, and runs inference off the event loop in a thread
pool, so a slow model never blocks health checks or other models.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from onnxserve import __version__
from onnxserve.core import datatypes
from onnxserve.core.pipeline import TextBatch
from onnxserve.core.registry import PLATFORM, ModelRegistry, ModelVersion
from onnxserve.core.statistics import StatisticsSnapshot
from onnxserve.core.types import (
    InferenceRequest,
    InferenceResponse,
    ModelConfiguration,
    ModelMetadata,
    ServerMetadata,
    Tensor,
    TensorSpec,
)
from onnxserve.core.validation import prepare_feeds
from onnxserve.errors import InvalidInputError, OnnxServeError

SERVER_NAME = "onnxserve"


@dataclass(frozen=True)
class VersionStatistics:
    name: str
    version: str
    statistics: StatisticsSnapshot


@dataclass(frozen=True)
class IndexEntry:
    """One model version in the repository index."""

    name: str
    version: str
    state: str
    reason: str = ""


def _index_entry(model: ModelVersion) -> IndexEntry:
    return IndexEntry(model.name, str(model.version), model.state.value)


@dataclass(frozen=True)
class _Plan:
    """What one validated request runs on a worker thread."""

    fetch: list[str]  # graph outputs to compute
    feeds: dict[str, npt.NDArray[Any]] | None = None  # token tensors sent by the client ...
    text: TextBatch | None = None  # ... or texts to tokenize first
    answer: list[str] = field(default_factory=list)  # for text: the outputs to answer with
    rows: int = 1


@dataclass(frozen=True)
class _Result:
    outputs: dict[str, npt.NDArray[Any]]
    queue_ns: int
    input_ns: int  # tokenization, for text
    infer_ns: int
    output_ns: int  # task post-processing, for text
    truncated: int = 0


def _plan(request: InferenceRequest, model: ModelVersion) -> _Plan:
    text = model.pipeline.text_of(request) if model.pipeline is not None else None
    if text is None or model.pipeline is None:
        feeds, fetch = prepare_feeds(request, model)
        rows = int(request.inputs[0].shape[0]) if model.max_batch_size > 0 else 1
        return _Plan(fetch, feeds=feeds, rows=rows)
    if model.max_batch_size and len(text.texts) > model.max_batch_size:
        raise InvalidInputError(
            f"{len(text.texts)} texts in one request, more than the model's max_batch_size {model.max_batch_size}"
        )
    fetch, answer = model.pipeline.select_outputs(request.outputs, [o.name for o in model.outputs])
    return _Plan(fetch, text=text, answer=answer, rows=len(text.texts) if model.max_batch_size else 1)


def _execute(model: ModelVersion, plan: _Plan, submitted_ns: int) -> _Result:
    """Runs on a worker thread: tokenize if needed, run the graph, post-process; times each step."""
    start = time.perf_counter_ns()
    if plan.text is None or model.pipeline is None:
        assert plan.feeds is not None
        outputs = model.session.run(plan.feeds, plan.fetch)
        done = time.perf_counter_ns()
        return _Result(outputs, start - submitted_ns, 0, done - start, 0)
    encoded = model.pipeline.encode(plan.text)
    encoded_at = time.perf_counter_ns()
    outputs = model.session.run(encoded.feeds, plan.fetch)
    ran_at = time.perf_counter_ns()
    answer = model.pipeline.postprocess(outputs, encoded, plan.text, plan.answer)
    done = time.perf_counter_ns()
    return _Result(
        answer, start - submitted_ns, encoded_at - start, ran_at - encoded_at, done - ran_at, encoded.truncated
    )


class InferenceService:
    """Health, metadata and inference over the models in one registry."""

    def __init__(self, registry: ModelRegistry, threads: int = 4, extensions: tuple[str, ...] = ()) -> None:
        self.registry = registry
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="onnxserve-infer")
        self._extensions = extensions
        self._live = True

    def live(self) -> bool:
        return self._live

    def ready(self) -> bool:
        return self._live and self.registry.all_ready()

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
        )

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

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        started = time.perf_counter_ns()
        model = self.registry.resolve(request.model_name, request.model_version)
        try:
            plan = _plan(request, model)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._executor, _execute, model, plan, time.perf_counter_ns())
        except OnnxServeError:
            model.stats.record_failure(time.perf_counter_ns() - started)
            raise
        specs = {s.name: s for s in model.outputs}
        response = InferenceResponse(
            model_name=model.name,
            model_version=str(model.version),
            outputs=[
                Tensor(name, specs[name].datatype if name in specs else datatypes.from_numpy(array.dtype), array)
                for name, array in result.outputs.items()
            ],
            id=request.id,
            parameters={"truncated": result.truncated} if result.truncated else {},
        )
        model.stats.record_success(
            plan.rows,
            result.queue_ns,
            result.input_ns,
            result.infer_ns,
            result.output_ns,
            time.perf_counter_ns() - started,
        )
        return response

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every loaded model version with its state (only ready ones with ``ready_only``)."""
        return [
            _index_entry(v)
            for m in self.registry
            for v in (m.versions[n] for n in m.version_numbers())
            if v.ready or not ready_only
        ]

    def version_states(self, name: str, version: str | None = None) -> list[IndexEntry]:
        """The state of the version a number or label names, or of every version of the model."""
        served = self.registry.get(name)
        if version:
            return [_index_entry(served.lookup(version))]
        return [_index_entry(served.versions[n]) for n in served.version_numbers()]

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
        self._executor.shutdown(wait=True, cancel_futures=True)
