"""The large-tensor point: what the server adds per MiB to an FP32 [8, 3, 224, 224] tensor.

An Identity model answers each request with its input, so nearly all the time beyond ONNX Runtime's own
run is the server's: receiving, decoding, encoding and sending the tensor. For each source tree given
(``--tree NAME=SRC``, e.g. the old tree and this one) it starts ``onnxserve serve`` with
``PYTHONPATH=SRC``; the servers then take turns, request by request, so the box's load falls on all
alike. Reported: the median round trip of a KServe V2 HTTP binary-extension request and of a gRPC raw
request, next to the median in-process ONNX Runtime run.
The added time is round trip minus in-process run; per MiB is per MiB of input (the output is as large).

    python -m bench.large_tensor --tree before=/work/main/src --tree after=src
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import orjson

from bench.data import write_identity_model
from bench.server import OnnxServer
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

SHAPE = (8, 3, 224, 224)
MIB = 1024 * 1024
MAX_MESSAGE = 256 * MIB
RESULTS = Path(__file__).parent / "results" / "large_tensor.json"


def interleaved(
    calls: dict[str, dict[str, Callable[[], object]]], runs: int, warmup: int = 3
) -> dict[str, dict[str, float]]:
    """Median milliseconds of each call, taking turns call by call so that the box's load falls on all alike."""
    times: dict[str, dict[str, list[float]]] = {t: {k: [] for k in c} for t, c in calls.items()}
    for round_ in range(warmup + runs):
        for tree, by_kind in calls.items():
            for kind, call in by_kind.items():
                started = time.perf_counter()
                call()
                if round_ >= warmup:
                    times[tree][kind].append(time.perf_counter() - started)
    return {t: {k: statistics.median(v) * 1000 for k, v in c.items()} for t, c in times.items()}


def http_call(client: httpx.Client, url: str, x: np.ndarray[Any, Any]) -> Callable[[], object]:
    raw = x.tobytes()
    tensor = {"name": "x", "datatype": "FP32", "shape": list(SHAPE), "parameters": {"binary_data_size": len(raw)}}
    header = orjson.dumps({"inputs": [tensor], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    body = header + raw
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}

    def call() -> object:
        response = client.post(f"{url}/v2/models/identity/infer", content=body, headers=headers)
        assert response.status_code == 200, response.text[:200]
        assert len(response.content) > len(raw)
        return response

    return call


def grpc_call(target: str, x: np.ndarray[Any, Any]) -> tuple[Callable[[], object], grpc.Channel]:
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    channel = grpc.insecure_channel(target, options=options)
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="x", datatype="FP32", shape=list(SHAPE))
    request.raw_input_contents.append(x.tobytes())

    def call() -> object:
        response = infer(request, timeout=60)
        assert len(response.raw_output_contents[0]) == x.nbytes
        return response

    return call, channel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="NAME=SRC (repeatable; default: this=src)")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", "src"]]
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    mib = x.nbytes / MIB
    results: dict[str, Any] = {"shape": list(SHAPE), "mib": round(mib, 3), "runs": args.runs, "trees": {}}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        repository = Path(tmp) / "models"
        model = write_identity_model(repository, ["n", 3, 224, 224])
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        calls: dict[str, dict[str, Callable[[], object]]] = {}
        for name, src in trees:
            running = OnnxServer(None, Path(tmp) / f"{name}.log", name, Path(src), repository=repository)
            stack.enter_context(running)
            url, target = running.http_url, running.grpc_address
            client = stack.enter_context(httpx.Client(timeout=60))
            grpc_infer, channel = grpc_call(target, x)
            stack.enter_context(channel)
            calls[name] = {"http": http_call(client, url, x), "grpc": grpc_infer}
        calls["inprocess"] = {"run": lambda: session.run(None, {"x": x})}
        times = interleaved(calls, args.runs)
        inprocess = times["inprocess"]["run"]
        results["inprocess_ms"] = round(inprocess, 3)
        for name, src in trees:
            http_ms, grpc_ms = times[name]["http"], times[name]["grpc"]
            results["trees"][name] = {
                "src": src,
                "http_binary_ms": round(http_ms, 3),
                "grpc_raw_ms": round(grpc_ms, 3),
                "http_added_ms_per_mib": round((http_ms - inprocess) / mib, 3),
                "grpc_added_ms_per_mib": round((grpc_ms - inprocess) / mib, 3),
            }
    print(f"FP32 {list(SHAPE)} ({mib:.2f} MiB in, as much out); in-process ONNX Runtime run {inprocess:.2f} ms")
    print(f"{'tree':<10}{'HTTP ms':>10}{'added/MiB':>12}{'gRPC ms':>10}{'added/MiB':>12}")
    for name, row in results["trees"].items():
        print(
            f"{name:<10}{row['http_binary_ms']:>10.2f}{row['http_added_ms_per_mib']:>12.3f}"
            f"{row['grpc_raw_ms']:>10.2f}{row['grpc_added_ms_per_mib']:>12.3f}"
        )
    names = list(results["trees"])
    if len(names) >= 2:
        first, last = results["trees"][names[0]], results["trees"][names[-1]]
        for key in ("http_added_ms_per_mib", "grpc_added_ms_per_mib"):
            if first[key] > 0:
                print(f"{key}: {names[-1]} / {names[0]} = {last[key] / first[key]:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
