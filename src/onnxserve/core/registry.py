"""Loaded models by name, version and label, with their states and readiness."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

from onnxserve.config import DynamicBatching, ModelConfig, ServerConfig, SessionOptions
from onnxserve.core.attention_memory import MAX_EXECUTION_BYTES, SERVER_ROOM, ExecutionBound, ExecutionMemory
from onnxserve.core.batching import DirectScheduler, DynamicBatcher, InstancePool, Scheduler
from onnxserve.core.client_text import shown
from onnxserve.core.confinement import check_version_folder
from onnxserve.core.cpu import cpu_budget
from onnxserve.core.execution import Outcome, run_batch
from onnxserve.core.external_data import FileId, check_same_folder, folder_identity
from onnxserve.core.inline_runs import InlineRuns
from onnxserve.core.observe import ExecutionRecord, Observers, VersionRecord
from onnxserve.core.pace import Pace
from onnxserve.core.pipeline import TextPipeline, load_pipeline
from onnxserve.core.repository import Signature, VersionFolder, version_number, versions_to_serve
from onnxserve.core.runtime import ModelSession
from onnxserve.core.statistics import ModelStatistics
from onnxserve.core.text_budget import TextBudget, model_room
from onnxserve.core.types import ModelState, TensorSpec
from onnxserve.errors import ConfigError, FilesChangedError, ModelNotFoundError, OnnxServeError, UnavailableError

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
"""The platform string Triton reports for ONNX models; clients compare against it."""


@dataclass
class ModelVersion:
    """One loaded version of one model."""

    name: str
    version: int
    folder: VersionFolder
    config: ModelConfig
    session: ModelSession  # the first instance; every instance has the same inputs and outputs
    max_batch_size: int
    scheduler: Scheduler
    stats: ModelStatistics
    state: ModelState = ModelState.READY
    load_seconds: float = 0.0
    pipeline: TextPipeline | None = None  # set when the folder carries a tokenizer and onnxserve.json
    signature: Signature = ()  # the files as they were when loaded
    active: int = 0  # requests between resolution and answer (queued or running)
    merged_rows: int = 0  # adaptive layout: the most rows merged into one run (max_batch_size stays 0)
    chunk_tokens: int = 0  # rows x tokens one execution of a request may take (core.chunking); 0: not chunked
    bound: ExecutionBound | None = None  # estimated memory of its executions (core.attention_memory); None: tokens only
    # characters of its text requests held as tokens, from before tokenizing until run (core.text_budget)
    text_room: TextBudget = field(default_factory=model_room)
    pace: Pace = field(default_factory=Pace)  # measured time per token, requests in flight (core.pace)

    @property
    def batches_rows(self) -> bool:
        """Whether requests' first dimension counts rows that the scheduler may merge."""
        return self.max_batch_size > 0 or self.merged_rows > 0

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.session.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.session.outputs

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


ADAPTIVE_MAX_ROWS = 32
"""The adaptive layout's largest merged run, in rows (a larger request still runs, alone)."""

ADAPTIVE_MAX_TOKENS = 8192
"""The adaptive layout's largest merged text run, in rows x longest sequence (long texts merge fewer); also
the default budget of one execution of one request of a text model (``core.chunking``): a larger request
runs in chunks of at most this many."""

ADAPTIVE_GATHER_US = 2000
"""The adaptive layout's batcher: how long a batch that could go waits for texts being tokenized, while
another run keeps the cores busy (a tokenization takes well under a millisecond). Only long texts are
ever on their way: short ones are tokenized on the event loop before they queue
(``core.service.INLINE_TOKENIZE_CHARACTERS``)."""


def can_batch(session: ModelSession) -> bool:
    """Whether every graph input and output has a dynamic first dimension, all named alike (a batch
    dimension, as exporters write it: ``batch_size``, ``N``), so that requests may merge along it."""
    firsts = [
        spec.dim_names[0] if spec.shape and spec.shape[0] < 0 else "" for spec in (*session.inputs, *session.outputs)
    ]
    return bool(firsts) and all(firsts) and len(set(firsts)) == 1


def rows_independent(pipeline: TextPipeline | None, session: ModelSession) -> bool:
    """Whether a version's rows are independent of each other, so that requests may merge along
    dimension 0 and one request may run in chunks along it: a text model (its graph is an encoder the
    pipeline already runs on many texts at once) whose graph has a batch dimension (``can_batch``). An
    arbitrary tensor graph may mix its rows (a Gather or a reverse along the batch, a cumulative sum, a
    normalization over it): merging strangers' requests there would hand one caller another's rows."""
    return pipeline is not None and can_batch(session)


def execution_bound(
    batching: DynamicBatching, session: ModelSession, pipeline: TextPipeline | None
) -> ExecutionBound | None:
    """How a text model's executions are bounded in memory: its graph's attention shape, the most one
    execution may take (``max_execution_bytes``), and the server's room; None when the graph shows no attention."""
    if session.attention is None:
        return None
    heads, widest = session.attention
    fixed = pipeline.fixed_length if pipeline is not None and pipeline.fixed_length > 0 else 0
    limit = batching.max_execution_bytes or MAX_EXECUTION_BYTES
    return ExecutionBound(ExecutionMemory(heads, widest, fixed), limit, SERVER_ROOM)


def effective_max_batch_size(config: ModelConfig, session: ModelSession) -> int:
    """``max_batch_size`` from the config, or 0 when the graph's first dimension cannot be a batch."""
    if config.max_batch_size == 0:
        return 0
    for spec in (*session.inputs, *session.outputs):
        if not spec.shape or spec.shape[0] >= 0:
            log.warning(
                "model %s: max_batch_size %d ignored (batching off): %s %r has no dynamic first dimension",
                config.name,
                config.max_batch_size,
                "input" if spec in session.inputs else "output",
                spec.name,
            )
            return 0
    return config.max_batch_size


def instance_options(config: ModelConfig) -> SessionOptions:
    """Session options with the CPU budget (a container's CPU limit included) divided among the
    instances, unless the config sets the intra-op threads itself."""
    options = config.session_options
    if options.intra_op_num_threads != 0:
        return options
    budget = cpu_budget()
    if config.instance_count > 1:
        return options.model_copy(update={"intra_op_num_threads": max(1, budget // config.instance_count)})
    if budget < (os.cpu_count() or 1):  # limited below the machine: ONNX Runtime would not know
        return options.model_copy(update={"intra_op_num_threads": budget})
    return options


@dataclass(frozen=True)
class Layout:
    """How a version runs: its sessions' options, how many sessions, and how many runs at once."""

    options: SessionOptions
    sessions: int
    slots: int  # runs at once (the pool's instances; adaptive: one session run by several threads)
    adaptive: bool


THREADS_PER_CPU = 8
"""ONNX Runtime threads a version's sessions may ask for together, per CPU of the budget (at least
``MIN_THREADS``): far more only slows runs, and thousands can deadlock ONNX Runtime's thread pool
creation when the address space runs out (a load that never returns)."""

MIN_THREADS = 64


def check_threads(config: ModelConfig, chosen: Layout) -> None:
    """A ConfigError when the layout asks for more threads than :data:`THREADS_PER_CPU` allows."""
    cpus = os.cpu_count() or 1
    options = chosen.options
    intra = options.intra_op_num_threads or cpus  # 0: ONNX Runtime's default, one per core
    inter = (options.inter_op_num_threads or cpus) if options.execution_mode == "parallel" else 0
    threads = chosen.sessions * (intra + inter)
    allowed = max(MIN_THREADS, THREADS_PER_CPU * cpu_budget())
    if threads > allowed:
        raise ConfigError(
            f"its config asks for {threads:,} ONNX Runtime threads ({chosen.sessions} session(s) x "
            f"({intra} intra-op + {inter} inter-op)); at most {allowed} are allowed with {cpu_budget()} CPU(s) "
            "(lower instance_count or session_options' thread counts)"
        )


def layout(config: ModelConfig) -> Layout:
    """The configured layout, or (a config that sets none of it) the adaptive one: ONE session whose
    intra-op pool has every core of the budget, run by up to that many threads at once. One run alone
    has all the cores; runs side by side share the pool (ONNX Runtime's calling thread always works on
    its own run, the pool's threads help whichever run has work), so the weights are loaded once. Its
    pool does not spin-wait unless the config says so."""
    if not config.adaptive:
        return Layout(instance_options(config), config.instance_count, config.instance_count, False)
    options = instance_options(config)
    if options.intra_op_allow_spinning is None:
        # Runs side by side put more threads than cores on the pool (each caller, plus the pool's own):
        # a pool thread spin-waiting for work would take a core from the other run.
        options = options.model_copy(update={"intra_op_allow_spinning": False})
    return Layout(options, 1, cpu_budget(), True)


def load_version(config: ModelConfig, folder: VersionFolder, observers: Observers | None = None) -> ModelVersion:
    """Load, warm up and schedule one version; tells ``observers`` of the state changes."""
    observers = observers or Observers()
    observers.version(VersionRecord(config.name, str(folder.version), ModelState.LOADING.value))
    try:
        loaded = _load_version(config, folder, observers)
    except OnnxServeError as e:
        observers.version(
            VersionRecord(config.name, str(folder.version), ModelState.UNAVAILABLE.value, reason=e.message)
        )
        raise
    observers.version(
        VersionRecord(config.name, str(folder.version), ModelState.READY.value, load_seconds=loaded.load_seconds)
    )
    return loaded


def _check_unchanged(folder: VersionFolder, folder_id: FileId | None, signature: Signature, name: str) -> None:
    """Refuse a version whose folder was replaced, or whose files changed, while its sessions and pipeline
    were read: each session reads the model file again, and the tokenizer and the spec are read after them,
    so a deploy done meanwhile (a staged folder moved over the served one) made a version whose sessions
    answered with different weights (outside attack rt36: 9 of 24 requests old, 15 new, with 3 instances)."""
    check_same_folder(folder.path, folder_id, name)
    if (folder.fingerprint() or ()) != signature:
        raise FilesChangedError(
            f"{name}: the version's files changed while it loaded (a file was written, added, removed or "
            "replaced); load it again once they are written"
        )


def _load_version(config: ModelConfig, folder: VersionFolder, observers: Observers) -> ModelVersion:
    started = time.perf_counter()
    name = f"{config.name}/{folder.version}"
    folder_id = folder_identity(folder.path)  # before anything is read (see _check_unchanged)
    fingerprint = folder.fingerprint() or ()
    signature = folder.signature() or ()  # before reading: a change while loading shows at the next look
    check_version_folder(
        folder.path, config.base_path, config.allow_hardlinks, files=folder.files() if folder.flat else None
    )
    chosen = layout(config)
    check_threads(config, chosen)
    sessions = [
        ModelSession(folder.model_file, config.providers(), chosen.options, name=name) for _ in range(chosen.sessions)
    ]
    first = sessions[0]
    pipeline = load_pipeline(folder.path, first.inputs, first.outputs, first.metadata)
    _check_unchanged(folder, folder_id, fingerprint, name)
    for session in sessions:
        session.warmup()
    max_batch_size = effective_max_batch_size(config, first)
    # Only text models merge by default (``rows_independent``); tensor models merge only when
    # max_batch_size says so, and are never cut into chunks.
    independent = rows_independent(pipeline, first)
    merged_rows = ADAPTIVE_MAX_ROWS if chosen.adaptive and independent else 0
    batching = config.dynamic_batching
    if independent and not batching.max_batch_tokens:
        # One token budget per execution, merged or cut into chunks (core.chunking).
        batching = batching.model_copy(update={"max_batch_tokens": ADAPTIVE_MAX_TOKENS})
    chunk_tokens = batching.max_batch_tokens if independent else 0
    bound = execution_bound(batching, first, pipeline) if independent else None
    if bound is not None:
        log.info(
            "model %s: one execution within %d MiB of estimated memory (%d attention heads, widest layer %d)",
            name,
            bound.limit // (1024 * 1024),
            bound.memory.heads,
            bound.memory.widest,
        )
    if chosen.adaptive:
        log.info(
            "model %s: adaptive layout: 1 session, up to %d runs at once%s",
            name,
            chosen.slots,
            f", requests merged up to {merged_rows} rows" if merged_rows else ", requests not merged",
        )
    stats = ModelStatistics()
    pool = InstancePool(sessions * chosen.slots if chosen.adaptive else sessions, name, sticky=chosen.adaptive)
    run = partial(run_batch, pipeline=pipeline, output_specs=first.outputs)

    def on_execution(batch_size: int, outcome: Outcome) -> None:
        stats.record_execution(batch_size, outcome.input_ns, outcome.infer_ns, outcome.output_ns)
        compute = outcome.input_ns + outcome.infer_ns + outcome.output_ns
        observers.execution(ExecutionRecord(config.name, str(folder.version), batch_size, compute))

    scheduler: Scheduler
    if max_batch_size > 0 or merged_rows > 0:
        # Adaptive: no delay and no preferred sizes, so a free slot takes whatever is queued at once
        # (continuous batching: a lone request runs alone on every core, a deep queue runs in merged
        # batches side by side), except that while another run keeps the cores busy it waits a moment
        # for texts that are being tokenized.
        gather = ADAPTIVE_GATHER_US if merged_rows else 0
        scheduler = DynamicBatcher(
            pool, run, on_execution, max_batch_size or merged_rows, batching, name, gather, bound=bound
        )
    else:
        inline = _inline_runs(config, first, name)
        scheduler = DirectScheduler(
            pool, run, on_execution, config.dynamic_batching.max_queue_size, name, bound, inline
        )
    return ModelVersion(
        name=config.name,
        version=folder.version,
        folder=folder,
        config=config,
        session=first,
        max_batch_size=max_batch_size,
        merged_rows=merged_rows,
        chunk_tokens=chunk_tokens,
        bound=bound,
        scheduler=scheduler,
        stats=stats,
        pipeline=pipeline,
        signature=signature,
        load_seconds=time.perf_counter() - started,
    )


def _inline_runs(config: ModelConfig, session: ModelSession, name: str) -> InlineRuns | None:
    """The record that lets cheap runs of an unbatched version run on the event loop (``core.inline_runs``),
    or None when its config turns that off or its graph's cost is not bounded by input shapes."""
    if config.inline_run_us == 0:
        return None
    if session.why_not_inline is not None:
        log.info("model %s: runs on its instance threads only: %s", name, session.why_not_inline)
        return None
    log.info("model %s: runs of shapes that ran within %d us run on the event loop", name, config.inline_run_us)
    return InlineRuns(config.inline_run_us, name)


@dataclass
class ServedModel:
    """A model and the versions of it that are loaded."""

    config: ModelConfig
    versions: dict[int, ModelVersion] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def version_numbers(self) -> list[int]:
        """Served versions, highest first."""
        return sorted(self.versions, reverse=True)

    def resolve(self, version: str | None) -> ModelVersion:
        """The version a request names (a number, a label, or None for the highest ready one), if ready."""
        if version is None or version == "":
            for number in self.version_numbers():
                if self.versions[number].ready:
                    return self.versions[number]
            raise UnavailableError(f"model {self.name!r} has no ready version")
        found = self.lookup(version)
        if not found.ready:
            raise UnavailableError(f"model {self.name!r} version {found.version} is {found.state.value.lower()}")
        return found

    def lookup(self, version: str) -> ModelVersion:
        """The version a number or label names, whatever its state; ModelNotFoundError if none."""
        number = version_number(version)
        if number is None and version in self.config.version_labels:
            number = self.config.version_labels[version]
        found = None if number is None else self.versions.get(number)
        if found is not None:
            return found
        served = ", ".join(str(v) for v in self.version_numbers())
        if version.isascii() and version.isdigit():
            raise ModelNotFoundError(f"model {self.name!r} has no version {shown(version)} (served: {served})")
        labels = ", ".join(sorted(self.config.version_labels)) or "none"
        raise ModelNotFoundError(f"model {self.name!r} has no version or label {shown(version)} (labels: {labels})")


class ModelRegistry:
    """Every served model, looked up by name."""

    def __init__(self, models: dict[str, ServedModel] | None = None, observers: Observers | None = None) -> None:
        self._models: dict[str, ServedModel] = models or {}
        self.observers = observers or Observers()
        self.failures: dict[tuple[str, int], str] = {}  # versions that failed to load, with the reason
        self.loading: dict[tuple[str, int], float] = {}  # versions being loaded, since (time.monotonic())
        # Models being unloaded as a whole on purpose (the control API, or gone from the config), draining
        # until they are dropped: strict readiness leaves them out, as Triton counts only models that
        # should be ready.
        self.retiring: set[str] = set()

    @classmethod
    def load(cls, config: ServerConfig, observers: Observers | None = None) -> ModelRegistry:
        """Load every model the config names, or raise one ConfigError listing every failure."""
        observers = observers or Observers()
        models: dict[str, ServedModel] = {}
        failures: list[str] = []
        for model_config in config.model_config_list:
            try:
                served = ServedModel(model_config)
                for folder in versions_to_serve(model_config):
                    served.versions[folder.version] = load_version(model_config, folder, observers)
                models[model_config.name] = served
            except OnnxServeError as e:
                failures.append(e.message)
        if failures:
            raise ConfigError("cannot serve this configuration:\n  " + "\n  ".join(failures))
        return cls(models, observers)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"unknown model {shown(name)}") from None

    def resolve(self, name: str, version: str | None) -> ModelVersion:
        return self.get(name).resolve(version)

    def put(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def drop(self, name: str) -> None:
        self._models.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self) -> list[ModelVersion]:
        return [v for m in self._models.values() for v in m.versions.values()]

    async def stop(self) -> None:
        """Stop every scheduler's work on the event loop (before the loop closes)."""
        for version in self.versions():
            await version.scheduler.stop()

    def close(self) -> None:
        """Stop every scheduler's instance threads."""
        for version in self.versions():
            version.scheduler.close()

    def all_ready(self) -> bool:
        """Every model has a ready version, and none is still loading (a model being unloaded on purpose,
        :attr:`retiring`, is not counted)."""
        return all(
            any(v.ready for v in m.versions.values())
            and not any(v.state is ModelState.LOADING for v in m.versions.values())
            for m in self._models.values()
            if m.name not in self.retiring
        )
