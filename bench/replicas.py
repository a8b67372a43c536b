"""Three onnxserve replicas behind HAProxy, on loopback: throughput with one replica versus three, then a
replica drained with SIGTERM and another killed with SIGKILL under steady load.

    .venv/bin/python bench/replicas.py [--seconds 10] [--clients 8] [--json out.json]

HAProxy (Debian's ``haproxy``; ``make deploy-deps`` installs it when root) checks ``/v2/health/ready``
on every replica every 200 ms and retries inference requests (idempotent: the same inputs give the
same outputs) on another replica when a connection fails, an answer is empty, or a replica answers 503
(what a draining replica answers new requests). Other paths are never retried. The whole run takes
about ``5 x --seconds`` plus start-up (under two minutes with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from typing import Any

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 1024
DEPTH = 32  # chained MatMuls: several milliseconds of one core per request


def compute_model() -> onnx.ModelProto:
    """y = tanh(x W) applied DEPTH times: a model whose run time is mostly ONNX Runtime's."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), "w")
    nodes = []
    previous = "x"
    for i in range(DEPTH):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"m{i}"]))
        out = "y" if i == DEPTH - 1 else f"t{i}"
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [out]))
        previous = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Replica:
    name: str
    http_port: int
    grpc_port: int
    process: subprocess.Popen[bytes]

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False


def cpu_seconds(replicas: list[Replica]) -> float:
    """CPU time (user + system) the replicas have used so far, from /proc."""
    total = 0.0
    for r in replicas:
        try:
            fields = Path(f"/proc/{r.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def start_replica(name: str, config: Path, onnxserve: str, log: Path) -> Replica:
    http_port, grpc_port = free_port(), free_port()
    command = [
        onnxserve,
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--inference-threads",
        "2",
        "--drain-timeout",
        "10",
        "--log-level",
        "warning",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    return Replica(name, http_port, grpc_port, process)


HAPROXY_CONFIG = """\
global
    maxconn 2048
    stats socket {socket} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout queue 10s
    # Retries: on another replica (redispatch) when the connection fails, the answer is empty (a killed
    # replica) or 503 (a draining one refuses new requests). Only inference requests (idempotent) are
    # retried at layer 7; their bodies are buffered so they can be sent again. Six tries, not three: in the
    # 200 ms before the health check marks them down, round robin can send a retry to the drained and the
    # killed replica in turn, and when the last retry also ends empty HAProxy closes the client's
    # connection without an answer (seen once in eight runs here with 3).
    retries 6
    option redispatch 1
    retry-on conn-failure empty-response 503
    option http-buffer-request

frontend inference
    bind 127.0.0.1:{port}
    default_backend onnxserve

backend onnxserve
    balance roundrobin
    http-request disable-l7-retry unless {{ path_end /infer }}
    option httpchk GET /v2/health/ready
    http-check expect status 200
    default-server inter 200ms fastinter 200ms downinter 500ms fall 1 rise 2
{servers}
"""


class Balancer:
    def __init__(self, work: Path, replicas: list[Replica]) -> None:
        self.port = free_port()
        self.socket = work / "haproxy.sock"
        servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.http_port} check maxconn 16" for r in replicas)
        config = work / f"haproxy-{len(replicas)}.cfg"
        config.write_text(HAPROXY_CONFIG.format(socket=self.socket, port=self.port, servers=servers))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.log = (work / f"haproxy-{len(replicas)}.log").open("wb")
        self.process = subprocess.Popen([haproxy, "-db", "-f", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.names = [r.name for r in replicas]
        deadline = time.monotonic() + 10
        while not self.all_up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not come up; see {self.log.name}")
            time.sleep(0.1)

    def stats(self) -> dict[str, dict[str, str]]:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows if row["pxname"] == "onnxserve"}

    def all_up(self) -> bool:
        stats = self.stats()
        return bool(stats) and all(stats.get(n, {}).get("status") == "UP" for n in self.names)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


@dataclass
class Load:
    """Closed-loop clients: each sends the next request when the previous one is answered."""

    url: str
    clients: int
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failure_times: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self, seconds: float, during: list[tuple[float, Any]] | None = None) -> float:
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.01] * WIDTH}]}
        ).encode()
        threads = [threading.Thread(target=self._client, args=(body,)) for _ in range(self.clients)]
        started = time.monotonic()
        self.started = started
        for t in threads:
            t.start()
        for at, action in sorted(during or [], key=lambda p: p[0]):
            time.sleep(max(0.0, started + at - time.monotonic()))
            action()
        time.sleep(max(0.0, started + seconds - time.monotonic()))
        self._stop.set()
        for t in threads:
            t.join()
        return time.monotonic() - started

    def _client(self, body: bytes) -> None:
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/v2/models/chain/infer", content=body, headers=headers)
                    outcome = "ok" if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.TransportError as e:
                    outcome = type(e).__name__
                with self._lock:
                    if outcome == "ok":
                        self.ok += 1
                    else:
                        self.failures[outcome] += 1
                        self.failure_times.append(time.monotonic() - self.started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not shutil.which("haproxy") and not Path("/usr/sbin/haproxy").exists():
        print("haproxy is not installed (make deploy-deps installs it with apt when root)", file=sys.stderr)
        return 2
    onnxserve = str(Path(sys.executable).parent / "onnxserve")

    work = Path(tempfile.mkdtemp(prefix="onnxserve-replicas-"))
    version = work / "models" / "chain" / "1"
    version.mkdir(parents=True)
    onnx.save(compute_model(), version / "model.onnx")
    config = work / "models" / "config.json"
    # One ONNX Runtime thread per replica: replicas, not threads, are what this run scales.
    entry = {"name": "chain", "base_path": "chain", "session_options": {"intra_op_num_threads": 1}}
    config.write_text(json.dumps({"model_config_list": [entry]}))

    replicas = [start_replica(f"r{i}", config, onnxserve, work / f"r{i}.log") for i in range(3)]
    balancers: list[Balancer] = []
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "clients": args.clients,
        "seconds": args.seconds,
        "load_before": round(os.getloadavg()[0], 2),  # other work on the machine skews every number
    }
    try:
        deadline = time.monotonic() + 60
        while not all(r.ready() for r in replicas):
            for r in replicas:
                if r.process.poll() is not None:
                    raise RuntimeError(f"replica {r.name} exited; see {work / (r.name + '.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError("replicas did not become ready")
            time.sleep(0.1)

        for count in (1, 3):
            balancer = Balancer(work, replicas[:count])
            balancers.append(balancer)
            Load(balancer.url, args.clients).run(2.0)  # warm-up, not counted
            load = Load(balancer.url, args.clients)
            cpu_before = cpu_seconds(replicas)
            elapsed = load.run(args.seconds)
            results[f"throughput_{count}"] = {
                "ok": load.ok,
                "failed": sum(load.failures.values()),
                "per_second": round(load.ok / elapsed, 1),
                "replica_cores_used": round((cpu_seconds(replicas) - cpu_before) / elapsed, 2),
            }
            balancer.stop()
            balancers.remove(balancer)

        balancer = Balancer(work, replicas)
        balancers.append(balancer)
        events: list[str] = []
        drained, killed = replicas[1], replicas[2]

        def drain() -> None:
            events.append(f"{time.monotonic() - load.started:.1f}s SIGTERM {drained.name}")
            drained.process.send_signal(signal.SIGTERM)

        def kill() -> None:
            events.append(f"{time.monotonic() - load.started:.1f}s SIGKILL {killed.name}")
            killed.process.kill()

        failover_seconds = 2 * args.seconds
        load = Load(balancer.url, args.clients)
        elapsed = load.run(failover_seconds, during=[(0.25 * failover_seconds, drain), (0.5 * failover_seconds, kill)])
        stats = balancer.stats()
        drained_exit = drained.process.wait(timeout=30)
        results["failover"] = {
            "ok": load.ok,
            "failed": dict(load.failures),
            "failure_times_s": [round(t, 2) for t in load.failure_times[:20]],
            "per_second": round(load.ok / elapsed, 1),
            "events": events,
            "drained_exit_status": drained_exit,
            "haproxy": {
                name: {
                    "status": row.get("status"),
                    "answered": int(row.get("stot") or 0),
                    "retries": int(row.get("wretr") or 0),
                    "redispatches": int(row.get("wredis") or 0),
                    "errors_response": int(row.get("eresp") or 0),
                    "errors_connect": int(row.get("econ") or 0),
                }
                for name, row in stats.items()
            },
        }
    finally:
        for b in balancers:
            b.stop()
        for r in replicas:
            if r.process.poll() is None:
                r.process.kill()
                r.process.wait()
        shutil.rmtree(work, ignore_errors=True)

    one, three, failover = results["throughput_1"], results["throughput_3"], results["failover"]
    print(f"CPUs: {results['cpus']}, clients: {args.clients}, {args.seconds:g} s per phase")
    for label, row in (("1 replica ", one), ("3 replicas", three)):
        print(
            f"{label}: {row['per_second']} infer/s ({row['ok']} ok, {row['failed']} failed), "
            f"replicas used {row['replica_cores_used']} cores"
        )
    print(f"load average before / after: {results['load_before']} / {os.getloadavg()[0]:.2f}")
    print(
        f"failover  : {failover['ok']} ok, failed {failover['failed'] or 'none'}; {'; '.join(failover['events'])}; "
        f"drained replica exited {failover['drained_exit_status']}"
    )
    for name, row in failover["haproxy"].items():
        print(f"  haproxy {name}: {row}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    lost = sum(failover["failed"].values()) if isinstance(failover["failed"], dict) else 0
    return 0 if lost == 0 and failover["drained_exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
