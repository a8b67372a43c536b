"""Per-model-version inference statistics (the V2 statistics extension's numbers).

Durations are cumulative nanoseconds with a count, as KServe V2 / Triton report them: ``success`` is
the whole request, ``queue`` the wait for a worker, ``compute_input`` the preparation of the inputs
(tokenization for text), ``compute_infer`` the runtime's own time and ``compute_output`` the
building of the response. The three compute counts are always equal (perf_analyzer checks it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace


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


@dataclass
class ModelStatistics:
    """Thread-safe counters for one model version."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _totals: StatisticsSnapshot = field(default_factory=StatisticsSnapshot)
    _batches: dict[int, ComputeTimes] = field(default_factory=dict)

    def record_success(
        self, rows: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, total_ns: int
    ) -> None:
        """One request answered: ``rows`` inferences, and the times it spent in each stage."""
        with self._lock:
            t = self._totals
            self._totals = replace(
                t,
                last_inference_ms=time.time_ns() // 1_000_000,
                inference_count=t.inference_count + rows,
                success=t.success.add(total_ns),
                queue=t.queue.add(queue_ns),
                compute=t.compute.add(input_ns, infer_ns, output_ns),
            )

    def record_execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution (a batch of one or more requests) of ``batch_size`` rows."""
        with self._lock:
            self._batches[batch_size] = self._batches.get(batch_size, ComputeTimes()).add(input_ns, infer_ns, output_ns)
            self._totals = replace(self._totals, execution_count=self._totals.execution_count + 1)

    def record_failure(self, total_ns: int) -> None:
        with self._lock:
            self._totals = replace(self._totals, fail=self._totals.fail.add(total_ns))

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            batches = tuple(BatchStatistics(size, d) for size, d in sorted(self._batches.items()))
            return replace(self._totals, batches=batches)
