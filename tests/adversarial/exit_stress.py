"""Stress the server's exit: SIGTERM at random moments while clients flood it with JSON decodes.

Run by hand (not collected by pytest)::

    nice -n 19 env PYTHONPATH=src:tests:tests/adversarial .venv/bin/python tests/adversarial/exit_stress.py --rounds 30

Each round starts ``onnxserve serve`` under an address-space cap (``harness.CappedServer``), floods it
from many threads with number-dense JSON bodies (just under and over the worker thresholds of
``protocols.offload``), keeps a long ``Loop`` run, a stalled slow sender and an open gRPC stream going,
optionally kills a decoding worker with SIGKILL mid-request, then sends SIGTERM (or SIGINT) at a random
moment and measures how long the process takes to exit. A server that outlives its drain timeout by
``--slack`` seconds is dumped with py-spy (every thread's stack) and killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import requests
from harness import CappedServer, alive, cpu_seconds, held_stream, serve_capped

import models
from onnxserve.protocols.offload import INLINE_VALUES, PROCESS_BYTES, WATCHDOG_NAME
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

V2 = "/v2/models/total/infer"
TFS = "/v1/models/total:predict"
SLOW = "/v2/models/slow/infer"


def v2_body(size: int) -> bytes:
    """A V2 body of about ``size`` bytes of short numbers (dense: a value every 2 bytes)."""
    count = size // 2 - 40
    data = b",".join([b"1"] * count)
    return b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d],"data":[%s]}]}' % (count, data)


def tfs_nan_body(size: int) -> bytes:
    count = size // 11
    return b'{"inputs": [NaN' + b", 0.1234567" * (count - 1) + b"]}"


BODIES: dict[str, tuple[str, bytes]] = {}


def bodies() -> dict[str, tuple[str, bytes]]:
    if not BODIES:
        BODIES["under-4MiB"] = (V2, v2_body(PROCESS_BYTES - 64))
        BODIES["over-4MiB"] = (V2, v2_body(PROCESS_BYTES + 64 * 1024))
        BODIES["dense-small"] = (V2, v2_body(3 * INLINE_VALUES))  # under 4 MiB, over the cost threshold
        BODIES["tfs-nan-8MiB"] = (TFS, tfs_nan_body(8 * 1024 * 1024))  # the slow standard parser
    return BODIES


@dataclass
class Round:
    number: int
    signal_name: str
    delay: float
    exit_seconds: float = 0.0
    code: int | None = None
    statuses: Counter[str] = field(default_factory=Counter)
    killed_worker: str = ""
    leftovers: int = 0
    dump: str = ""
    log: str = ""


def flood(server: CappedServer, stop: threading.Event, seen: Counter[str], lock: threading.Lock) -> None:
    choices = list(bodies().values())
    session = requests.Session()
    while not stop.is_set():
        path, body = random.choice(choices)
        try:
            answer = session.post(
                server.http_url + path, data=body, headers={"Content-Type": "application/json"}, timeout=120
            )
            key = f"{answer.status_code}"
            if answer.status_code >= 500:
                key += " " + answer.text[:70]
        except requests.RequestException as e:
            key = type(e).__name__
            session = requests.Session()
        with lock:
            seen[key] += 1


def slow_run(server: CappedServer, seen: Counter[str], lock: threading.Lock) -> None:
    doc = {
        "inputs": [
            {"name": "iterations", "datatype": "INT64", "shape": [], "data": [100_000]},
            {"name": "x", "datatype": "FP32", "shape": [256, 256], "data": [0.5] * 65536},
        ]
    }
    try:
        answer = requests.post(server.http_url + SLOW, json=doc, timeout=120)
        key = f"loop {answer.status_code}"
    except requests.RequestException as e:
        key = f"loop {type(e).__name__}"
    with lock:
        seen[key] += 1


def slow_sender(server: CappedServer, stop: threading.Event) -> None:
    """Announces a 4 MiB body, sends half of it, and stalls."""
    _, body = bodies()["under-4MiB"]
    head = (
        f"POST {V2} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    try:
        with socket.create_connection((server.host, server.http_port), timeout=60) as sock:
            sock.sendall(head.encode("ascii") + body[: len(body) // 2])
            stop.wait(60)
    except OSError:
        pass


def grpc_stream(server: CappedServer, stop: threading.Event) -> None:
    """A ModelStreamInfer stream that stays open, sending one small request."""
    request = pb.ModelInferRequest(model_name="total")
    request.inputs.add(name="x", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1, 2, 3])
    with contextlib.suppress(grpc.RpcError):
        for _ in held_stream(server.grpc_target, request, stop, timeout=60):
            pass


def decoding_workers(server: CappedServer) -> list[psutil.Process]:
    """The decoding workers whose CPU time grows over 0.1 s (busy parsing)."""
    candidates = []
    for process in server.workers():
        with contextlib.suppress(psutil.Error):
            if process.name() != WATCHDOG_NAME:
                candidates.append((process, cpu_seconds(process)))
    time.sleep(0.1)
    return [process for process, before in candidates if cpu_seconds(process) - before > 0.02]


def py_spy(pid: int) -> str:
    py_spy = Path(sys.executable).parent / "py-spy"
    try:
        command = [str(py_spy), "dump", "--native", "--pid", str(pid)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"py-spy failed: {e!r}"


def one_round(number: int, repo: Path, args: argparse.Namespace) -> Round:
    signum = random.choice([signal.SIGTERM, signal.SIGTERM, signal.SIGINT])
    result = Round(number, signal.Signals(signum).name, random.uniform(args.min_delay, args.max_delay))
    server = serve_capped(repo, "--drain-timeout", str(args.drain), "--request-timeout", "60")
    started = server.descendants()
    stop = threading.Event()
    lock = threading.Lock()
    threads = [threading.Thread(target=flood, args=(server, stop, result.statuses, lock)) for _ in range(args.threads)]
    threads.append(threading.Thread(target=slow_run, args=(server, result.statuses, lock)))
    threads.append(threading.Thread(target=slow_sender, args=(server, stop)))
    threads.append(threading.Thread(target=grpc_stream, args=(server, stop)))
    for thread in threads:
        thread.daemon = True
        thread.start()
    try:
        time.sleep(result.delay)
        if args.kill_worker and random.random() < 0.5:
            busy = decoding_workers(server)
            if busy:
                victim = random.choice(busy)
                victim.kill()
                result.killed_worker = str(victim.pid)
                time.sleep(random.uniform(0, 0.5))
        started = server.descendants()
        logged = len(server.log_lines)
        stopping = time.monotonic()
        server.process.send_signal(signum)
        if args.dump_at is not None:
            time.sleep(args.dump_at)
            result.dump = f"--- py-spy {args.dump_at} s after the signal ---\n" + py_spy(server.process.pid)
        try:
            result.code = server.process.wait(timeout=args.drain + args.slack)
        except subprocess.TimeoutExpired:
            result.dump += py_spy(server.process.pid)
            server.process.kill()
            result.code = server.process.wait(timeout=30)
        result.exit_seconds = time.monotonic() - stopping
        time.sleep(0.5)
        result.log = "".join(server.log_lines[logged:])
        time.sleep(1)
        result.leftovers = sum(1 for p in started if alive(p))
        for p in started:
            with contextlib.suppress(psutil.Error):
                p.kill()
    finally:
        stop.set()
        server.stop()
        for thread in threads:
            thread.join(timeout=30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--drain", type=float, default=5.0, help="--drain-timeout given to the server")
    parser.add_argument("--slack", type=float, default=15.0, help="seconds past the drain before py-spy")
    parser.add_argument("--min-delay", type=float, default=0.3)
    parser.add_argument("--max-delay", type=float, default=4.0)
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL a busy decoding worker in half the rounds")
    parser.add_argument("--show-log", action="store_true", help="print the server's log from the signal on")
    parser.add_argument("--dump-at", type=float, default=None, help="py-spy dump this long after the signal")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    random.seed(args.seed)
    bodies()
    worst = 0.0
    hangs = 0
    with tempfile.TemporaryDirectory() as folder:
        repo = Path(folder)
        models.write_version(repo, "total", 1, models.total_model())
        models.write_version(repo, "slow", 1, models.slow_model())
        for number in range(args.rounds):
            r = one_round(number, repo, args)
            worst = max(worst, r.exit_seconds)
            hangs += r.exit_seconds > args.drain + args.slack
            print(
                f"round {r.number:2d} {r.signal_name} after {r.delay:4.2f}s: exit {r.exit_seconds:5.2f}s rc={r.code} "
                f"leftover={r.leftovers} killed={r.killed_worker or '-'} answers={dict(r.statuses)}",
                flush=True,
            )
            if r.dump:
                print(r.dump, flush=True)
            if args.show_log:
                print(r.log, flush=True)
    print(f"rounds {args.rounds}: worst exit {worst:.2f}s, hangs {hangs} (pid {os.getpid()})")


if __name__ == "__main__":
    main()
