"""Per-model-version inference statistics (the V2 statistics extension's numbers).

Durations are cumulative nanoseconds with a count, as KServe V2 / Triton report them: ``success`` is
the whole request, ``queue`` the wait for a worker, ``compute_input`` the preparation of the inputs
(tokenization for text), ``compute_infer`` the runtime's own time and ``compute_output`` the
building of the response. The three compute counts are always equal (perf_analyzer checks it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> Duration:
        return Duration(self.count + 1, self.ns + ns)


@dataclass(frozen=True)
class ComputeTimes:
    input: Duration = Duration()
    infer: Duration = Duration()
    output: Duration = Duration()

    def add(self, input_ns: int, infer_ns: int, output_ns: int) -> ComputeTimes:
        return ComputeTimes(self.input.add(input_ns), self.infer.add(infer_ns), self.output.add(output_ns))


@dataclass(frozen=True)
class BatchStatistics:
    batch_size: int
    compute: ComputeTimes


@dataclass(frozen=True)
class StatisticsSnapshot:
    last_inference_ms: int = 0  # milliseconds since the epoch; 0 before the first inference
    inference_count: int = 0  # rows inferred (the batch dimension summed)
    execution_count: int = 0  # model executions
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute: ComputeTimes = ComputeTimes()
    batches: tuple[BatchStatistics, ...] = ()


class _Sums:
    """A mutable count and sum of nanoseconds, updated under the statistics' lock."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns

    def frozen(self) -> Duration:
        return Duration(self.count, self.ns)


class _ComputeSums:
    __slots__ = ("infer", "input", "output")

    def __init__(self) -> None:
        self.input, self.infer, self.output = _Sums(), _Sums(), _Sums()

    def add(self, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.input.add(input_ns)
        self.infer.add(infer_ns)
        self.output.add(output_ns)

    def frozen(self) -> ComputeTimes:
        return ComputeTimes(self.input.frozen(), self.infer.frozen(), self.output.frozen())


class ModelStatistics:
    """Thread-safe counters for one model version.

    Updated in place under a lock (every request and execution records here, so updates make no new
    objects); :meth:`snapshot` copies them into the immutable :class:`StatisticsSnapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = _Sums()
        self._fail = _Sums()
        self._queue = _Sums()
        self._compute = _ComputeSums()
        self._batches: dict[int, _ComputeSums] = {}

    def record_success(
        self, rows: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, total_ns: int
    ) -> None:
        """One request answered: ``rows`` inferences, and the times it spent in each stage."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._last_inference_ms = now_ms
            self._inference_count += rows
            self._success.add(total_ns)
            self._queue.add(queue_ns)
            self._compute.add(input_ns, infer_ns, output_ns)

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution (a batch of one or more requests) of ``batch_size`` rows."""
        with self._lock:
            sums = self._batches.get(batch_size)
            if sums is None:
                sums = self._batches[batch_size] = _ComputeSums()
            sums.add(input_ns, infer_ns, output_ns)
            self._execution_count += 1

    def record_failure(self, total_ns: int) -> None:
        with self._lock:
            self._fail.add(total_ns)

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            return StatisticsSnapshot(
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success=self._success.frozen(),
                fail=self._fail.frozen(),
                queue=self._queue.frozen(),
                compute=self._compute.frozen(),
                batches=tuple(BatchStatistics(size, d.frozen()) for size, d in sorted(self._batches.items())),
            )
