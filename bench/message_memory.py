"""What a large request costs the server in memory, per source tree, side by side (issue 14, rt8 F3).

For each tree given (``--tree NAME=SRC``) a server of an Identity model (FP32 ``[1, n]``) is started
with the default limits, and its resident size is sampled every few milliseconds while:

- ``one gRPC`` / ``one HTTP``: single 60 MiB requests (raw ``raw_input_contents``; the V2 binary
  extension), one after another: the peak above the resting size, and that peak in multiples of the
  message (what one request costs at its worst);
- ``attack``: ``--callers`` threads each sending ``--calls`` such gRPC messages at once (the outside
  attack rt8 F3 was 32 x 2): the peak above rest, what stays resident 2 s after the last answer, and the
  answers (OK / RESOURCE_EXHAUSTED).

The servers run one after another (each alone on the box); only sizes are compared, not times.

    python -m bench.message_memory --tree before=/work/main/src --tree after=src [--callers 32 --calls 2]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import psutil

from bench.data import write_identity_model
from bench.server import OnnxServer, PeakRss
from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

MIB = 1024 * 1024
ELEMENTS = 15 * MIB // 4 * 4  # 60 MiB of FP32, the size the outside attack sent
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def grpc_infer(target: str, request: pb.ModelInferRequest) -> str:
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            call(request, timeout=300)
            return "OK"
        except grpc.RpcError as e:
            return str(e.code().name)


def measure(pid: int, url: str, target: str, callers: int, calls: int) -> dict[str, Any]:
    process = psutil.Process(pid)
    x = np.ones((1, ELEMENTS), dtype=np.float32)
    raw = x.tobytes()
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="x", datatype="FP32", shape=[1, ELEMENTS])
    request.raw_input_contents.append(raw)
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, ELEMENTS], "parameters": {"binary_data_size": len(raw)}}
    header = orjson.dumps({"inputs": [tensor], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    body = header + raw
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    httpx.post(f"{url}/v2/models/identity/infer", json={"inputs": [{**tensor, "shape": [1, 1], "data": [1.0]}]})
    rest = process.memory_info().rss
    row: dict[str, Any] = {"rest_mib": rest / MIB}

    def single(call: Callable[[], object]) -> float:
        peaks = []
        for _ in range(3):
            before = process.memory_info().rss
            with PeakRss(pid) as peak:
                call()
            peaks.append(peak.peak - before)
        return max(peaks) / MIB

    row["one_grpc_mib"] = single(lambda: grpc_infer(target, request))
    with httpx.Client(timeout=300) as client:
        row["one_http_mib"] = single(
            lambda: client.post(f"{url}/v2/models/identity/infer", content=body, headers=headers)
        )
    time.sleep(1)
    before = process.memory_info().rss
    answers: Counter[str] = Counter()
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(calls):
            code = grpc_infer(target, request)
            with lock:
                answers[code] += 1

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    with PeakRss(pid) as peak:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    time.sleep(2)
    row.update(
        attack_before_mib=before / MIB,
        attack_peak_mib=peak.peak / MIB,
        attack_kept_mib=process.memory_info().rss / MIB,
        answers=dict(answers),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="NAME=SRC (repeatable; default: this=src)")
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    trees = [t.split("=", 1) for t in args.tree] or [["this", "src"]]
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "models"
        write_identity_model(repository, [1, "n"])
        for name, src in trees:
            log = Path(tmp) / f"{name}.log"
            with OnnxServer(None, log, name, Path(src), repository=repository) as running:
                rows[name] = measure(running.pid, running.http_url, running.grpc_address, args.callers, args.calls)
    print(f"one request: 60 MiB FP32 to an Identity model; attack: {args.callers} gRPC callers x {args.calls}")
    print(f"{'tree':<10}{'rest':>8}{'one gRPC':>10}{'one HTTP':>10}{'attack peak':>13}{'kept':>8}  answers (MiB)")
    for name, row in rows.items():
        print(
            f"{name:<10}{row['rest_mib']:>8.0f}{row['one_grpc_mib']:>+10.0f}{row['one_http_mib']:>+10.0f}"
            f"{row['attack_peak_mib'] - row['attack_before_mib']:>+13.0f}"
            f"{row['attack_kept_mib'] - row['attack_before_mib']:>+8.0f}  {row['answers']}"
        )


if __name__ == "__main__":
    main()
