"""Prometheus metrics: an Observer of the core, served at ``GET /metrics`` on the HTTP port.

Each inference request is counted exactly once, by the core: the ``InferenceService`` reports every
request it sees to ``Metrics.request``, answered or failed, including those refused before reaching
a model (a malformed body, an unknown model or version, a body refused for its size or media type on
an inference endpoint). Those carry the requested model and version as labels when the server serves
them, and "" otherwise, so that clients cannot grow the label sets without bound.

Metrics (every one in a registry of its own, so several servers can live in one process):

- ``onnxserve_requests_total{model,version,protocol,status}``: inference requests; status "ok" or the
  error kind (invalid_input, not_found, unavailable, resource_exhausted, internal).
- ``onnxserve_request_duration_seconds{model,version,phase}``: one histogram, three phases: ``total``
  for every counted request, ``queue`` and ``compute`` for answered ones.
- ``onnxserve_batch_size{model,version}``: rows per model execution.
- ``onnxserve_queue_depth{model,version}``: requests waiting in the scheduler, read at scrape time.
- ``onnxserve_model_state{model,version,state}``: 1 for the version's current state, 0 for the others.
- ``onnxserve_model_load_duration_seconds{model,version}``: how long the last load took.
- ``onnxserve_json_bodies_decoded_total{where}``: JSON inference bodies decoded on the event loop, in a
  codec thread or in a worker process (``protocols.offload``), counted by the process, read at scrape time.
- the standard ``process_*`` metrics of this process.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from onnxserve.core.observe import ExecutionRecord, RequestRecord, VersionRecord
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.types import ModelState
from onnxserve.protocols import offload

PREFIX = "onnxserve_"
OK = "ok"
STATES = tuple(state.value for state in ModelState)
"""The states a version can be in; a state reported that is not listed here is added when first seen."""

DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _QueueDepth(Collector):
    """``onnxserve_queue_depth``, read from every version's scheduler when scraped."""

    def __init__(self) -> None:
        self.registry: ModelRegistry | None = None

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        if self.registry is not None:
            for version in self.registry.versions():
                family.add_metric([version.name, str(version.version)], version.scheduler.queued())
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{PREFIX}queue_depth", "Inference requests waiting in the model's scheduler.", labels=["model", "version"]
        )


class _JsonDecodes(Collector):
    """``onnxserve_json_bodies_decoded_total{where}``, read from ``offload`` when scraped: whether the server's
    interpreter (``loop``, ``thread``) or a worker process (``worker``) decoded each JSON inference body."""

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for where, count in offload.decoded_counts().items():
            family.add_metric([where], count)
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            f"{PREFIX}json_bodies_decoded",
            "JSON inference request bodies decoded, by where: on the event loop, in a codec thread of the "
            "server, or in a JSON decoding worker process.",
            labels=["where"],
        )


class Metrics:
    """The Prometheus metrics of one server; an Observer of its core."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._states = list(STATES)
        self._requests = Counter(
            f"{PREFIX}requests",
            "Inference requests, by the model version they named and how they ended (ok or the error kind).",
            ["model", "version", "protocol", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            f"{PREFIX}request_duration_seconds",
            "Inference request latency by phase: queue and compute (answered requests), total (all requests).",
            ["model", "version", "phase"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._batch_size = Histogram(
            f"{PREFIX}batch_size",
            "Rows in each model execution (one or more requests batched together).",
            ["model", "version"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self._state = Gauge(
            f"{PREFIX}model_state",
            "1 for the model version's current state, 0 for the others.",
            ["model", "version", "state"],
            registry=self.registry,
        )
        self._load_duration = Gauge(
            f"{PREFIX}model_load_duration_seconds",
            "Seconds the model version's last load took (sessions, pipeline and warm-up).",
            ["model", "version"],
            registry=self.registry,
        )
        self._queue_depth = _QueueDepth()
        self.registry.register(self._queue_depth)
        self.registry.register(_JsonDecodes())
        # The labelled children every request updates, looked up once per label set (labels() costs more
        # than the update). Metrics never drop a label set, so these are the children the registry keeps.
        self._request_counters: dict[tuple[str, str, str, str], Counter] = {}
        self._durations: dict[tuple[str, str, str], Histogram] = {}
        self._batch_sizes: dict[tuple[str, str], Histogram] = {}
        ProcessCollector(registry=self.registry)

    def watch(self, models: ModelRegistry) -> None:
        """Read queue depths from these models."""
        self._queue_depth.registry = models

    # Observer

    def request(self, record: RequestRecord) -> None:
        status = OK if record.error is None else record.error.value
        key = (record.model, record.version, record.protocol, status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self._requests.labels(*key)
        counter.inc()
        self._phase(record.model, record.version, "total").observe(record.total_ns / 1e9)
        if record.error is None:
            self._phase(record.model, record.version, "queue").observe(record.queue_ns / 1e9)
            self._phase(record.model, record.version, "compute").observe(record.compute_ns / 1e9)

    def execution(self, record: ExecutionRecord) -> None:
        key = (record.model, record.version)
        sizes = self._batch_sizes.get(key)
        if sizes is None:
            sizes = self._batch_sizes[key] = self._batch_size.labels(*key)
        sizes.observe(record.batch_size)

    def _phase(self, model: str, version: str, phase: str) -> Histogram:
        """The duration histogram of one model version's phase, made when first observed (a refused
        request makes no queue or compute series)."""
        key = (model, version, phase)
        histogram = self._durations.get(key)
        if histogram is None:
            histogram = self._durations[key] = self._duration.labels(*key)
        return histogram

    def version(self, record: VersionRecord) -> None:
        if record.state not in self._states:
            self._states.append(record.state)
        for state in self._states:
            self._state.labels(record.model, record.version, state).set(1 if state == record.state else 0)
        if record.load_seconds is not None:
            self._load_duration.labels(record.model, record.version).set(record.load_seconds)

    # Exposition

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (Prometheus text by default) and its content type."""
        encoder, content_type = choose_encoder(accept)
        body: bytes = encoder(self.registry)
        return body, content_type
