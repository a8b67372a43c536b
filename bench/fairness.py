"""Fairness between clients under a gRPC flood (issue 14's attack), measured from outside. Usage:
``PYTHONPATH=src python -m bench.fairness [--connections 20] [--calls 100] [--products 20] [--batching]``

A server (``onnxserve serve`` in a subprocess, on loopback) serves ``paced``: y = x after ``x`` chained
64x64 matrix products, so every request costs the same small run. The flood: ``--connections`` HTTP/2
connections from 127.0.0.1, each with ``--calls`` concurrent gRPC ModelInfer calls. Once they are all
sent, another client, from 127.0.0.2, sends one small HTTP V2 request. Printed: how long the flood took,
how long the small request waited, and how many flood calls were answered after it. Run it on the
server before and after a change (``PYTHONPATH=/other/src``) to compare; with fair scheduling the small
request waits about one run per waiting client, without it about the whole flood.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import onnx
import onnx.parser

from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

LISTENING = re.compile(r"HTTP \(.*\) on http://([\d.]+):(\d+)")
GRPC_LINE = re.compile(r"gRPC \(KServe V2\) on ([\d.]+):(\d+)")
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
"""A connection of its own per channel; no BDP pings (the server sends GOAWAY after too many pings)."""
MODEL = """
paced (float[batch, 1] x) => (float[batch, 1] y) {
    top = ReduceMax <keepdims = 0> (x)
    count = Cast <to = 7> (top)
    cond = Constant <value = bool {1}> ()
    shape = Constant <value = int64[2] {64, 64}> ()
    start = ConstantOfShape <value = float[1] {0.001}> (shape)
    last = Loop(count, cond, start) <body = step (int64 i, bool c_in, float[64, 64] acc)
        => (bool c_out, float[64, 64] next) {
            c_out = Identity(c_in)
            prod = MatMul(acc, acc)
            eps = Constant <value = float[1] {0.0001}> ()
            next = Add(prod, eps)
        }>
    total = ReduceSum <keepdims = 0> (last)
    zero = Constant <value = float {0.0}> ()
    nothing = Mul(total, zero)
    y = Add(x, nothing)
}
"""


def write_config(root: Path, batching: bool) -> Path:
    """The paced model and a server config serving it (with dynamic batching, or the default layout)."""
    model = onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + MODEL)
    (root / "paced" / "1").mkdir(parents=True)
    onnx.save(model, root / "paced" / "1" / "model.onnx")
    entry: dict[str, object] = {"name": "paced", "base_path": str(root / "paced")}
    if batching:
        entry.update(max_batch_size=8, dynamic_batching={})
    config = root / "config.json"
    config.write_text(json.dumps({"model_config_list": [entry]}))
    return config


def start(config: Path, log: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int, int]:
    command = [sys.executable, "-m", "onnxserve.cli", "serve", "--config", str(config)]
    command += ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stderr=out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        http_found, grpc_found = LISTENING.search(text), GRPC_LINE.search(text)
        if http_found and grpc_found:
            return process, int(http_found.group(2)), int(grpc_found.group(2))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start:\n" + log.read_text(errors="replace"))


def small_request(port: int, products: int, source: str) -> float:
    """One V2 HTTP infer from ``source``; seconds until its answer."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [products]}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600, source_address=(source, 0))
    started = time.perf_counter()
    connection.request("POST", "/v2/models/paced/infer", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    took = time.perf_counter() - started
    connection.close()
    assert response.status == 200, response.status
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--products", type=int, default=20, help="64x64 products per run (its cost)")
    parser.add_argument("--batching", action="store_true", help="serve with dynamic batching (max_batch_size 8)")
    parser.add_argument("--show-log", action="store_true")
    parser.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        default=65536,
        help="the server's largest gRPC message: each call waiting to be received reserves it in the in-flight "
        "budget, so with the 64 MiB default only a few calls reach the scheduler at once",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        config = write_config(root, args.batching)
        extra = ["--grpc-max-message-bytes", str(args.grpc_max_message_bytes)]
        process, http_port, grpc_port = start(config, root / "server.log", extra)
        try:
            alone = min(small_request(http_port, args.products, "127.0.0.2") for _ in range(5))
            request = pb.ModelInferRequest(model_name="paced")
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
            tensor.contents.fp32_contents.append(float(args.products))
            channels = [
                grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=CHANNEL_OPTIONS)
                for _ in range(args.connections)
            ]
            for channel in channels:
                grpc.channel_ready_future(channel).result(timeout=30)
            answered: list[float] = []
            lock = threading.Lock()

            def done(_: object) -> None:
                with lock:
                    answered.append(time.perf_counter())

            flood_started = time.perf_counter()
            futures = []
            for channel in channels:
                call = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                for _ in range(args.calls):
                    future = call.future(request, timeout=600)
                    future.add_done_callback(done)
                    futures.append(future)
            sent = time.perf_counter()
            time.sleep(1.0)  # let the flood reach the server's queue
            if args.show_log:
                metrics = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
                metrics.request("GET", "/metrics")
                lines = metrics.getresponse().read().decode().splitlines()
                print("\n".join(line for line in lines if "queue" in line and not line.startswith("#")))
            victim_started = time.perf_counter()
            waited = small_request(http_port, args.products, "127.0.0.2")
            victim_answered = victim_started + waited
            codes = Counter(future.code() for future in futures)
            flood = max(answered) - flood_started
            after = sum(1 for t in answered if t > victim_answered)
            for channel in channels:
                channel.close()
        finally:
            if "--show-log" in sys.argv:
                print((root / "server.log").read_text(errors="replace")[-3000:])
            process.terminate()
            process.wait(timeout=60)
    calls = args.connections * args.calls
    print(f"one small request alone: {alone * 1000:.1f} ms")
    print(f"flood: {calls} gRPC calls on {args.connections} connections, sent in {sent - flood_started:.2f} s, ")
    print(f"       all answered after {flood:.2f} s")
    print(f"small request from 127.0.0.2 during the flood: waited {waited:.2f} s ({waited / flood:.1%} of the flood)")
    print(f"flood calls answered after the small request: {after} of {calls}")
    print("flood answers:", ", ".join(f"{code.name} {count}" for code, count in codes.most_common()))


if __name__ == "__main__":
    main()
