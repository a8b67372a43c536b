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

A version's series (those labelled with its model and version) leave when it unloads (``UNLOADED``), so
that the metrics hold the versions served now, not every version that ever served (about 83 lines a
version, never dropped: 100 versions deployed one after the other took ``/metrics`` from 148 lines to
7,544; outside attack rt25). The model's own series (``version=""``: requests that named no served
version of it) stay.

The three that every request updates (requests, durations, batch sizes) are kept in plain counters of our
own (``_Series``), updated on the event loop without locks (one bisection per observation), and turned
into the same samples as ``prometheus_client``'s Counter and Histogram would show (``_total``,
``_bucket``/``_count``/``_sum``, ``_created``) only when scraped: a ``prometheus_client`` observation
takes two locked updates and a Python loop over the buckets, and a request made five of them.
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import _get_use_created
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from onnxserve.core.observe import ExecutionRecord, RequestRecord, VersionRecord
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.types import ModelState
from onnxserve.protocols import offload

PREFIX = "onnxserve_"
OK = "ok"
STATES = tuple(state.value for state in ModelState)
"""The states a version can be in; a state reported that is not listed here is added when first seen."""

UNLOADED = "UNLOADED"
"""The state a ``VersionRecord`` reports when its version has gone from memory: its series leave."""

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


class _Series:
    """One label set's counts: a counter's value, or a histogram's per-bucket counts and sum."""

    __slots__ = ("buckets", "created", "sum", "value")

    def __init__(self, buckets: int = 0) -> None:
        self.value = 0
        self.buckets = [0] * buckets  # observations per bucket (not cumulative), the last one +Inf
        self.sum = 0.0
        self.created = time.time()


class _Histogram:
    """A histogram's series by label values, shown as ``prometheus_client``'s ``Histogram`` shows them."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.bounds = tuple(float(b) for b in buckets)  # +Inf is the bucket past the last bound
        self._les = [floatToGoString(b) for b in (*self.bounds, float("inf"))]  # type: ignore[no-untyped-call]
        self.series: dict[tuple[str, ...], _Series] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series(len(self.bounds) + 1)
        series.buckets[bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound is in its bucket
        series.sum += value

    def forget(self, model: str, version: str) -> None:
        """Drop the series of one model version (the first two labels)."""
        for key in [key for key in self.series if key[:2] == (model, version)]:
            del self.series[key]

    def family(self, created: bool) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, series in list(self.series.items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, list(series.buckets), strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(key), buckets, series.sum)
            if created:
                family.samples.append(
                    Sample(f"{self.name}_created", dict(zip(self.labels, key, strict=True)), series.created)
                )
        return family


class _PerRequest(Collector):
    """``onnxserve_requests_total``, ``onnxserve_request_duration_seconds`` and ``onnxserve_batch_size``,
    from the counts ``Metrics`` keeps (see the module)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], _Series] = {}
        self.duration = _Histogram(
            f"{PREFIX}request_duration_seconds",
            "Inference request latency by phase: queue and compute (answered requests), total (all requests).",
            ["model", "version", "phase"],
            DURATION_BUCKETS,
        )
        self.batch_size = _Histogram(
            f"{PREFIX}batch_size",
            "Rows in each model execution (one or more requests batched together).",
            ["model", "version"],
            BATCH_SIZE_BUCKETS,
        )

    def describe(self) -> Iterable[Metric]:
        return self._families(with_values=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(with_values=True)

    def _families(self, with_values: bool) -> list[Metric]:
        requests = CounterMetricFamily(
            f"{PREFIX}requests",
            "Inference requests, by the model version they named and how they ended (ok or the error kind).",
            labels=["model", "version", "protocol", "status"],
        )
        if not with_values:
            return [
                requests,
                HistogramMetricFamily(self.duration.name, "", labels=self.duration.labels),
                HistogramMetricFamily(self.batch_size.name, "", labels=self.batch_size.labels),
            ]
        created = _get_use_created()
        for key, series in list(self.requests.items()):
            requests.add_metric(list(key), float(series.value), created=series.created if created else None)
        return [requests, self.duration.family(created), self.batch_size.family(created)]


class Metrics:
    """The Prometheus metrics of one server; an Observer of its core (called on the event loop)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._states = list(STATES)
        self._per_request = _PerRequest()
        self.registry.register(self._per_request)
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
        ProcessCollector(registry=self.registry)

    def watch(self, models: ModelRegistry) -> None:
        """Read queue depths from these models."""
        self._queue_depth.registry = models

    # Observer

    def request(self, record: RequestRecord) -> None:
        status = OK if record.error is None else record.error.value
        counts = self._per_request
        key = (record.model, record.version, record.protocol, status)
        series = counts.requests.get(key)
        if series is None:
            series = counts.requests[key] = _Series()
        series.value += 1
        # A duration series is made when first observed: a refused request makes no queue or compute series.
        duration = counts.duration
        duration.observe((record.model, record.version, "total"), record.total_ns / 1e9)
        if record.error is None:
            duration.observe((record.model, record.version, "queue"), record.queue_ns / 1e9)
            duration.observe((record.model, record.version, "compute"), record.compute_ns / 1e9)

    def execution(self, record: ExecutionRecord) -> None:
        self._per_request.batch_size.observe((record.model, record.version), record.batch_size)

    def version(self, record: VersionRecord) -> None:
        if record.state == UNLOADED:
            self._forget(record.model, record.version)
            return
        if record.state not in self._states:
            self._states.append(record.state)
        for state in self._states:
            self._state.labels(record.model, record.version, state).set(1 if state == record.state else 0)
        if record.load_seconds is not None:
            self._load_duration.labels(record.model, record.version).set(record.load_seconds)

    def _forget(self, model: str, version: str) -> None:
        """Remove every series of a version that has gone from memory (see the module)."""
        counts = self._per_request
        for key in [key for key in counts.requests if key[:2] == (model, version)]:
            del counts.requests[key]
        counts.duration.forget(model, version)
        counts.batch_size.forget(model, version)
        for state in self._states:
            with contextlib.suppress(KeyError):  # a state it was never reported in
                self._state.remove(model, version, state)
        with contextlib.suppress(KeyError):  # a version that never finished loading
            self._load_duration.remove(model, version)

    # Exposition

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (Prometheus text by default) and its content type."""
        encoder, content_type = choose_encoder(accept)
        body: bytes = encoder(self.registry)
        return body, content_type
