"""Probe latency while a burst of silent connections arrives past ``--max-connections`` (issue 14). Usage:
``PYTHONPATH=src python -m bench.connection_burst [--count 3000] [--runs 3] [--tls] [--before SRC]``.

A server (``onnxserve serve``, one tiny model, the default ``--max-connections`` 1000) is started; one
thread opens ``--count`` TCP connections to its HTTP port as fast as it can and never sends a byte, while
another opens a fresh connection for ``GET /v2/health/ready`` every 50 ms (over HTTPS with ``--tls``) and
times it. Printed per run: how long the burst took to connect, the slowest and the median probe during it.
Each figure is the median of ``--runs`` runs, each on a fresh server. ``--before SRC`` runs the same on a
second source tree (``/work/main/src``: the code before) and prints the two side by side with ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

HTTP_LINE = re.compile(r"HTTP \(.*\) on https?://([\d.]+):(\d+)")
PROBE_EVERY_S = 0.05
PROBE = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@dataclass
class Run:
    burst_s: float
    worst_probe_s: float
    median_probe_s: float
    probes: int


def _repository(folder: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "add",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (folder / "repo" / "add" / "1").mkdir(parents=True)
    onnx.save(model, folder / "repo" / "add" / "1" / "model.onnx")
    return folder / "repo"


def _tls_files(folder: Path) -> tuple[list[str], ssl.SSLContext | None]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = folder / "server.pem", folder / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return ["--tls-cert", str(cert), "--tls-key", str(key)], context


def _start(src: str, repo: Path, extra: list[str]) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": src}
    command = [sys.executable, "-m", "onnxserve.cli", "serve", "--host", "127.0.0.1", "--http-port", "0"]
    command += ["--grpc-port", "0", "--model-repository", str(repo), *extra]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        if match := HTTP_LINE.search(line):
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep draining
            return process, int(match.group(2))
    process.kill()
    raise RuntimeError("the server did not start")


def _probe(port: int, context: ssl.SSLContext | None) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
        sock.sendall(PROBE)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"probe answered {answer[:80]!r}")
    return time.perf_counter() - started


def _run(src: str, repo: Path, extra: list[str], context: ssl.SSLContext | None, count: int) -> Run:
    process, port = _start(src, repo, extra)
    opened: list[socket.socket] = []
    probes: list[float] = []
    done = threading.Event()

    def probing() -> None:
        while not done.is_set():
            probes.append(_probe(port, context))
            time.sleep(PROBE_EVERY_S)

    try:
        _probe(port, context)  # warm: the first probe loads nothing more
        prober = threading.Thread(target=probing)
        started = time.perf_counter()
        prober.start()
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            opened.append(sock)
        burst = time.perf_counter() - started
        time.sleep(0.5)  # the probes right after the burst, while the server still admits what it queued
        done.set()
        prober.join()
        return Run(burst, max(probes), statistics.median(probes), len(probes))
    finally:
        for sock in opened:
            sock.close()
        process.kill()
        process.wait()


def _print(src: str, run: Run) -> None:
    print(
        f"  {src}: burst {run.burst_s:.2f} s, slowest probe {run.worst_probe_s * 1000:.0f} ms, "
        f"median {run.median_probe_s * 1000:.0f} ms ({run.probes} probes)",
        flush=True,
    )


def _median(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.burst_s for r in runs),
        statistics.median(r.worst_probe_s for r in runs),
        statistics.median(r.median_probe_s for r in runs),
        int(statistics.median(r.probes for r in runs)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--before", help="a second source tree to compare with (e.g. /work/main/src)")
    parser.add_argument("--after", default="src")
    parser.add_argument("extra", nargs="*", help="more serve options (after --)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as folder:
        repo = _repository(Path(folder))
        extra, context = _tls_files(Path(folder)) if args.tls else ([], None)
        extra += args.extra
        kind = "HTTPS" if args.tls else "HTTP"
        print(f"{args.count} silent connections, {kind} probes, median of {args.runs} runs", flush=True)
        trees = [args.after] if args.before is None else [args.before, args.after]
        runs: dict[str, list[Run]] = {tree: [] for tree in trees}
        for _ in range(args.runs):  # the trees in turn, so that both see the same load
            for tree in trees:
                runs[tree].append(_run(tree, repo, extra, context, args.count))
                _print(tree, runs[tree][-1])
        if args.before is None:
            return
        before, after = _median(runs[args.before]), _median(runs[args.after])
        print(f"{'':24}{'before':>10}{'after':>10}{'after/before':>14}")
        for name, b, a in (
            ("burst connected (s)", before.burst_s, after.burst_s),
            ("slowest probe (ms)", before.worst_probe_s * 1000, after.worst_probe_s * 1000),
            ("median probe (ms)", before.median_probe_s * 1000, after.median_probe_s * 1000),
        ):
            print(f"{name:24}{b:10.2f}{a:10.2f}{a / b if b else float('nan'):14.2f}")


if __name__ == "__main__":
    main()
