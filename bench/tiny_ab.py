"""The tiny model's per-request cost in the server, two trees (or two settings) side by side (issue #18).

Two servers of the add model (``bench/data.py``: two FP32 ``[1, 16]`` inputs, ``session.run`` a few
microseconds) run at once, each started as ``make bench`` starts it (``onnxserve serve --config``, no
layout keys): A from ``--a-src`` (e.g. a detached worktree of main) and B from ``--b-src`` (default:
this tree), each with its own extra environment (``--a-env`` / ``--b-env KEY=VALUE``, e.g. a
``GRPC_POLL_STRATEGY``). A closed-loop ``tritonclient`` sends one request at a time over V2 gRPC, V2
HTTP binary and V2 HTTP JSON, to A and B in turn (request by request, so both see the same machine),
and for each round of requests this measures, besides the client's wall-clock p50 of each:

- the server's CPU time per request: user + system of the server process (all its threads) and its
  children, from ``psutil``, before and after the round (``perf stat -e instructions`` would be
  steadier still, but this machine's virtual CPUs expose no hardware counters).

Both servers share the machine's load request by request, so their ratio holds on a loaded machine,
where each number alone does not (two servers of the same tree measured 1.17 x apart in blocks of
1,000 requests each at a load average of 10). Every number is the median over the rounds; the last column is B / A.

    PYTHONPATH=src .venv/bin/python -m bench.tiny_ab --a-src /work/wt/base/src [--rounds 7] [--requests 1500]

``--a-keys`` / ``--b-keys`` add keys to that side's model entry (JSON), e.g. one tree against itself with
runs on the event loop turned off on A: ``--a-src src --a-keys '{"inline_run_us": 0}'``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from bench.data import write_add_model
from bench.server import OnnxServer
from bench.settings import ROOT

PROTOCOLS = ("grpc", "binary", "json")
WARMUP = 200


@dataclass
class Block:
    """One block of requests on one server: what it cost the server and what the client waited."""

    cpu_us: float  # server CPU per request
    p50_us: float  # client wall-clock median


@dataclass
class Side:
    name: str
    server: OnnxServer
    blocks: dict[str, list[Block]] = field(default_factory=dict)


def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU of ``process`` (every thread) and of its live children."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def _sender(side: Side, protocol: str) -> Callable[[], object]:
    """A function that sends one inference request of the add model and waits for its answer."""
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(side.server.grpc_address)
        inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("a", "b")]
        for i in inputs:
            i.set_data_from_numpy(x)
        return lambda: client.infer("add", inputs)
    binary = protocol == "binary"
    http = httpclient.InferenceServerClient(side.server.http_address)
    http_inputs = [httpclient.InferInput(n, [1, 16], "FP32") for n in ("a", "b")]
    for h in http_inputs:
        h.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("sum", binary_data=binary)]
    return lambda: http.infer("add", http_inputs, outputs=outputs)


def measure(side: Side, protocol: str, requests: int) -> Block:
    """``requests`` requests to one server, one at a time."""
    return measure_interleaved([side], protocol, requests)[0]


def measure_interleaved(sides: list[Side], protocol: str, requests: int) -> list[Block]:
    """``requests`` requests to each server, one at a time, taking turns request by request: the servers
    see the same machine (whatever else runs on it) while their CPU time is counted."""
    sends = [_sender(side, protocol) for side in sides]
    for send in sends:
        for _ in range(WARMUP):
            send()
    processes = [psutil.Process(side.server.pid) for side in sides]
    waits: list[list[int]] = [[] for _ in sides]
    before = [_cpu_seconds(p) for p in processes]
    for _ in range(requests):
        for send, wait in zip(sends, waits, strict=True):
            started = time.perf_counter_ns()
            send()
            wait.append(time.perf_counter_ns() - started)
    spent = [_cpu_seconds(p) - b for p, b in zip(processes, before, strict=True)]
    return [Block(cpu / requests * 1e6, statistics.median(w) / 1e3) for cpu, w in zip(spent, waits, strict=True)]


def _env(pairs: list[str]) -> dict[str, str]:
    return dict(p.split("=", 1) for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-src", type=Path, required=True, help="source tree of A (its src/ folder)")
    parser.add_argument("--b-src", type=Path, default=ROOT / "src", help="source tree of B (default: this tree)")
    parser.add_argument("--a-env", nargs="*", default=[], help="KEY=VALUE for A's server")
    parser.add_argument("--b-env", nargs="*", default=[], help="KEY=VALUE for B's server")
    parser.add_argument("--a-keys", default="{}", help="JSON object of keys added to A's model entry")
    parser.add_argument("--b-keys", default="{}", help="JSON object of keys added to B's model entry")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=1500, help="requests per block")
    parser.add_argument("--protocols", nargs="*", default=list(PROTOCOLS), choices=PROTOCOLS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder)
        write_add_model(repository)
        configs = []
        for name, keys in (("a", args.a_keys), ("b", args.b_keys)):
            entry = {"name": "add", "base_path": "add", **json.loads(keys)}
            configs.append(repository / f"config-{name}.json")
            configs[-1].write_text(json.dumps({"model_config_list": [entry]}))
        logs = ROOT / "bench" / "results" / "tiny_ab"
        sides = [
            Side("A", OnnxServer(configs[0], logs / "a.log", "A", src=args.a_src, env=_env(args.a_env))),
            Side("B", OnnxServer(configs[1], logs / "b.log", "B", src=args.b_src, env=_env(args.b_env))),
        ]
        with contextlib.ExitStack() as stack:
            for side in sides:
                stack.enter_context(side.server)
            for r in range(args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for protocol in args.protocols:
                    for side, block in zip(order, measure_interleaved(order, protocol, args.requests), strict=True):
                        side.blocks.setdefault(protocol, []).append(block)
                print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.1f})", flush=True)
            rss = [psutil.Process(side.server.pid).memory_info().rss / 2**20 for side in sides]
    print(f"A: {args.a_src} {args.a_env} {args.a_keys}\nB: {args.b_src} {args.b_env} {args.b_keys}")
    print(f"medians of {args.rounds} rounds x {args.requests} requests, concurrency 1")
    print(f"server RSS after the rounds: A {rss[0]:.0f} MiB, B {rss[1]:.0f} MiB")
    print(f"{'protocol':8} {'measure':26} {'A':>10} {'B':>10} {'B/A':>6}")
    for protocol in args.protocols:
        for label, pick in (
            ("server CPU us/request", lambda k: k.cpu_us),
            ("client p50 us", lambda k: k.p50_us),
        ):
            va = statistics.median(pick(k) for k in sides[0].blocks[protocol])
            vb = statistics.median(pick(k) for k in sides[1].blocks[protocol])
            print(f"{protocol:8} {label:26} {va:10.1f} {vb:10.1f} {vb / va:6.2f}")


if __name__ == "__main__":
    main()
