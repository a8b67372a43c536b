"""Per-version statistics: counters updated in place, snapshots that later updates leave alone."""

from __future__ import annotations

import threading

from onnxserve.core.statistics import BatchStatistics, ComputeTimes, Duration, ModelStatistics


def test_a_snapshot_sums_every_record() -> None:
    stats = ModelStatistics()
    stats.record_success(rows=2, queue_ns=10, input_ns=1, infer_ns=100, output_ns=3, total_ns=200)
    stats.record_success(rows=1, queue_ns=20, input_ns=2, infer_ns=50, output_ns=4, total_ns=90)
    stats.record_execution(batch_size=2, input_ns=1, infer_ns=100, output_ns=3)
    stats.record_execution(batch_size=1, input_ns=2, infer_ns=50, output_ns=4)
    stats.record_execution(batch_size=2, input_ns=5, infer_ns=70, output_ns=6)
    stats.record_failure(total_ns=7)
    snap = stats.snapshot()
    assert snap.inference_count == 3
    assert snap.execution_count == 3
    assert snap.success == Duration(2, 290)
    assert snap.fail == Duration(1, 7)
    assert snap.queue == Duration(2, 30)
    assert snap.compute == ComputeTimes(Duration(2, 3), Duration(2, 150), Duration(2, 7))
    assert snap.batches == (
        BatchStatistics(1, ComputeTimes(Duration(1, 2), Duration(1, 50), Duration(1, 4))),
        BatchStatistics(2, ComputeTimes(Duration(2, 6), Duration(2, 170), Duration(2, 9))),
    )
    assert snap.last_inference_ms > 0


def test_a_snapshot_does_not_change_with_later_records() -> None:
    stats = ModelStatistics()
    stats.record_success(rows=1, queue_ns=1, input_ns=1, infer_ns=1, output_ns=1, total_ns=1)
    stats.record_execution(batch_size=1, input_ns=1, infer_ns=1, output_ns=1)
    before = stats.snapshot()
    stats.record_success(rows=4, queue_ns=1, input_ns=1, infer_ns=1, output_ns=1, total_ns=1)
    stats.record_execution(batch_size=1, input_ns=1, infer_ns=1, output_ns=1)
    assert before.inference_count == 1
    assert before.batches[0].compute.infer == Duration(1, 1)
    assert stats.snapshot().inference_count == 5


def test_records_from_many_threads_are_all_counted() -> None:
    stats = ModelStatistics()

    def record() -> None:
        for _ in range(2000):
            stats.record_success(rows=1, queue_ns=1, input_ns=1, infer_ns=1, output_ns=1, total_ns=1)
            stats.record_execution(batch_size=1, input_ns=1, infer_ns=1, output_ns=1)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = stats.snapshot()
    assert snap.inference_count == snap.execution_count == 8000
    assert snap.success == Duration(8000, 8000)
    assert snap.batches == (
        BatchStatistics(1, ComputeTimes(Duration(8000, 8000), Duration(8000, 8000), Duration(8000, 8000))),
    )
