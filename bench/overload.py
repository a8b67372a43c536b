"""An overload of large text requests (outside attack rt11, finding O1), measured from outside. Usage:
``PYTHONPATH=src python -m bench.overload [--before /other/src] [--requests 24] [--rows 2048]``

A server (``onnxserve serve --config models/config.json``: the demo MiniLM, ``max_batch_size`` 32) gets
``--requests`` concurrent ``/v1/embeddings`` requests of ``--rows`` lists of 256 token ids from
127.0.0.2 (rt11's: 24 of 2,048, 2.6 MB each), after one warm-up request of 64 rows. Meanwhile another
client, from 127.0.0.3, sends a one-sentence V2 request to the same model every 0.5 s, and readiness is
probed. Printed per server: the answers' statuses with their times, the server's CPU (its workers
included) while the attack ran, the one-sentence requests' latencies and the slowest probe; with
``--before``, the same run against that source tree first, and the ratios. Before core.pace every request
of such an overload ended in its 504 at the time limit; now those that cannot finish are refused early.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import psutil

from bench.server import HOST, OnnxServer
from bench.settings import ROOT

ATTACKER, OTHER = "127.0.0.2", "127.0.0.3"
TOKENS = 256
JSON = {"Content-Type": "application/json"}


@dataclass
class Run:
    answers: list[tuple[int, float]] = field(default_factory=list)  # status, seconds
    light: list[float] = field(default_factory=list)  # seconds of each one-sentence request
    probes: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0


def _post(server: OnnxServer, source: str, path: str, body: bytes) -> int:
    connection = http.client.HTTPConnection(HOST, server.http_port, timeout=300, source_address=(source, 0))
    try:
        connection.request("POST", path, body=body, headers=JSON)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _cpu_s(pid: int) -> float:
    process = psutil.Process(pid)
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return float(total)


def _ids(rows: int) -> list[list[int]]:
    ids: list[list[int]] = np.random.default_rng(0).integers(1000, 20000, size=(rows, TOKENS)).tolist()
    return ids


def attack(server: OnnxServer, requests: int, rows: int) -> Run:
    _post(server, ATTACKER, "/v1/embeddings", orjson.dumps({"model": "minilm", "input": _ids(64)}))  # warm-up
    body = orjson.dumps({"model": "minilm", "input": _ids(rows)})
    sentence = [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a short sentence about the weather"]}]
    light_body = orjson.dumps({"inputs": sentence})
    run, stop = Run(), threading.Event()

    def send() -> None:
        started = time.perf_counter()
        status = _post(server, ATTACKER, "/v1/embeddings", body)
        run.answers.append((status, time.perf_counter() - started))

    def watch() -> None:
        while not stop.wait(0.5):
            started = time.perf_counter()
            _post(server, OTHER, "/v2/models/minilm/infer", light_body)
            run.light.append(time.perf_counter() - started)
            started = time.perf_counter()
            httpx.get(f"{server.http_url}/v2/health/ready", timeout=30)
            run.probes.append(time.perf_counter() - started)

    cpu, started = _cpu_s(server.pid), time.perf_counter()
    threads = [threading.Thread(target=send) for _ in range(requests)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    run.wall_s, run.cpu_s = time.perf_counter() - started, _cpu_s(server.pid) - cpu
    return run


def report(name: str, run: Run) -> None:
    print(f"{name}: {run.wall_s:.1f} s, server CPU {run.cpu_s:.1f} s")
    for status in sorted({s for s, _ in run.answers}):
        times = [t for s, t in run.answers if s == status]
        print(
            f"  {len(times)} x {status}: {min(times):.2f} to {max(times):.2f} s (median {statistics.median(times):.2f})"
        )
    if run.light:
        print(
            f"  one-sentence requests: {len(run.light)}, median {statistics.median(run.light):.2f} s, "
            f"max {max(run.light):.2f} s; slowest probe {max(run.probes):.3f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another source tree to measure first (PYTHONPATH)")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()
    config, logs = ROOT / "models" / "config.json", ROOT / "bench" / "results"
    runs: dict[str, Run] = {}
    for name, src in (("before", args.before), ("now", None)):
        if name == "before" and src is None:
            continue
        with OnnxServer(config, logs / f"overload-{name}.log", name, src=src) as server:
            runs[name] = attack(server, args.requests, args.rows)
        report(name, runs[name])
    if "before" in runs:
        before, now = runs["before"], runs["now"]
        print(
            f"now / before: server CPU {now.cpu_s / max(before.cpu_s, 1e-9):.2f}, "
            f"wall {now.wall_s / max(before.wall_s, 1e-9):.2f}, "
            f"slowest one-sentence request {max(now.light, default=0) / max(max(before.light, default=0), 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
