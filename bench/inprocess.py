"""Baselines measured in this process, with no server in the path: ONNX Runtime ``session.run`` and
``onnxserve.Pipeline``.

Throughput baselines get the whole thread budget (the machine's cores): every layout (one session with
all cores, or one single-threaded session per core, each driven by its own thread) is swept once at
several batch sizes; the fastest candidates (finalists) are then measured with the server workloads,
run for run, and the best median is the baseline.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bench.cpu import CpuMeter
from bench.stats import Sample, from_latencies

Call = Callable[[], Any]
MakeCalls = Callable[["Candidate"], list[Call]]

WARMUP_CALLS = 3
FINALISTS = 2


@dataclass(frozen=True)
class Candidate:
    """An in-process layout: ``sessions`` sessions of ``threads`` intra-op threads, each running ``batch`` rows."""

    batch: int
    sessions: int
    threads: int

    @property
    def label(self) -> str:
        sessions = f"{self.sessions} session{'s' if self.sessions > 1 else ''}"
        return f"batch {self.batch}, {sessions} x {self.threads} thread{'s' if self.threads > 1 else ''}"

    def to_json(self) -> dict[str, int | str]:
        return {"batch": self.batch, "sessions": self.sessions, "threads": self.threads, "label": self.label}


def layouts(cores: int | None = None) -> list[tuple[int, int]]:
    """(sessions, threads) pairs that use the whole thread budget: 1 x cores and cores x 1."""
    n = cores or os.cpu_count() or 1
    return [(1, n)] if n == 1 else [(1, n), (n, 1)]


def candidates(batches: Sequence[int]) -> list[Candidate]:
    return [Candidate(b, s, t) for s, t in layouts() for b in batches]


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def measure_calls(calls: Sequence[Call], rows_per_call: int, duration_s: float) -> Sample:
    """Run each call in a loop on its own thread for ``duration_s``; rows per second and per-call latency."""
    for call in calls:
        for _ in range(WARMUP_CALLS):
            call()
    meter = CpuMeter()
    latencies: list[list[float]] = [[] for _ in calls]
    barrier = threading.Barrier(len(calls) + 1)
    end = [0.0]

    def loop(call: Call, out: list[float]) -> None:
        barrier.wait()
        while True:
            sent = time.perf_counter()
            if sent >= end[0]:
                return
            call()
            done = time.perf_counter()
            if done <= end[0]:
                out.append(done - sent)

    threads = [
        threading.Thread(target=loop, args=(c, out), daemon=True) for c, out in zip(calls, latencies, strict=True)
    ]
    for t in threads:
        t.start()
    end[0] = time.perf_counter() + duration_s
    barrier.wait()
    for t in threads:
        t.join(timeout=duration_s + 120)
    sample = from_latencies([x for out in latencies for x in out], duration_s, rows_per_call)
    sample.extra["other_cpu_cores"] = meter.other_cores()
    return sample


def sweep(options: Sequence[Candidate], make_calls: MakeCalls, duration_s: float) -> list[tuple[Candidate, Sample]]:
    """One run of every candidate, fastest first."""
    found = [(c, measure_calls(make_calls(c), c.batch, duration_s)) for c in options]
    return sorted(found, key=lambda pair: pair[1].throughput, reverse=True)


def onnx_sessions(model: Path, candidate: Candidate) -> list[ort.InferenceSession]:
    return [
        ort.InferenceSession(str(model), session_options(candidate.threads), providers=["CPUExecutionProvider"])
        for _ in range(candidate.sessions)
    ]


def tiny_call(model: Path) -> Call:
    """``session.run`` of the tiny add model on two FP32 [1, 16] inputs (ONNX Runtime's default options)."""
    session = ort.InferenceSession(str(model), session_options(0), providers=["CPUExecutionProvider"])
    feeds = {name: np.ones((1, 16), dtype=np.float32) for name in ("a", "b")}
    return partial(session.run, None, feeds)


def token_tensor_calls(model: Path, row: dict[str, npt.NDArray[np.int64]]) -> MakeCalls:
    """Calls running ``session.run`` (every output, as the server computes) on batches of ``row``."""

    def make_calls(candidate: Candidate) -> list[Call]:
        feeds = {name: np.repeat(array, candidate.batch, axis=0) for name, array in row.items()}
        return [partial(session.run, None, feeds) for session in onnx_sessions(model, candidate)]

    return make_calls


def text_calls(folder: Path, sentences: Sequence[str]) -> MakeCalls:
    """Calls running ``onnxserve.Pipeline`` (tokenizer + ONNX Runtime + pooling) on batches of sentences."""
    from onnxserve import Pipeline
    from onnxserve.config import SessionOptions

    def make_calls(candidate: Candidate) -> list[Call]:
        calls: list[Call] = []
        for i in range(candidate.sessions):
            pipeline = Pipeline(folder, options=SessionOptions(intra_op_num_threads=candidate.threads))
            texts = [sentences[(i + j) % len(sentences)] for j in range(candidate.batch)]
            calls.append(partial(pipeline, texts))
        return calls

    return make_calls
