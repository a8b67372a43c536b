"""Large JSON bodies decoded in a worker process vs in a codec thread: their cost, and the event loop's.

Part 1, in process: a V2 JSON FP32 body of each size is decoded to the internal request through
``offload.convert`` (a codec thread, as before) and through ``offload.parse`` (a worker process from
``PROCESS_BYTES`` up), each repeated, while a ticker on the event loop measures how late it runs (the
loop's longest stall). Printed: median decode time of each and their ratio, and the longest stall.

Part 2, servers (``--tree NAME=SRC``, e.g. ``before=/work/main/src after=src``): each tree's
``onnxserve serve`` gets four ~60 MB JSON bodies at once (two V2 FP32, two TF Serving with NaN) while
``/v2/health/ready`` is probed; printed: the slowest probe, the bodies' time, and the peak RSS of the
server with its workers.

    python -m bench.json_offload --sizes 1 8 60 --tree before=/work/main/src --tree after=src

``--dense 24`` sends 24 bodies of 4 MiB - 1 bytes holding 1.4 million empty lists each instead (under the
size threshold, decoded in a worker for their container count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import requests

MIB = 1024 * 1024


def v2_body(mib: float) -> bytes:
    """A V2 JSON body of about ``mib`` MiB: FP32 values of 9 to 11 characters each."""
    values = np.random.default_rng(1).random(int(mib * MIB) // 11).astype(np.float32)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [values.size], "data": values}]}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def tfs_nan_body(mib: float) -> bytes:
    count = int(mib * MIB) // 11
    return b'{"inputs": [NaN' + b", 0.1234567" * (count - 1) + b"]}"


def dense_body() -> bytes:
    """A V2 body of 4 MiB - 1 bytes, just under ``PROCESS_BYTES``, whose data is 1.4 million empty lists."""
    count = (4 * MIB - 200) // 3
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d],"data":[%s]}]}' % (
        count,
        b",".join([b"[]"] * count),
    )
    return body + b" " * (4 * MIB - 1 - len(body))


async def _timed(run: Callable[[], Awaitable[Any]], repeat: int) -> tuple[float, float]:
    """Median seconds of ``run`` and the event loop's longest stall meanwhile."""
    stall = 0.0
    done = False

    async def ticker() -> None:
        nonlocal stall
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            stall = max(stall, time.perf_counter() - before - 0.001)

    tick = asyncio.ensure_future(ticker())
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await run()
        times.append(time.perf_counter() - started)
    done = True
    await tick
    return statistics.median(times), stall


async def in_process(sizes: list[float], repeat: int) -> None:
    from onnxserve.protocols import offload
    from onnxserve.protocols.v2_rest import codec

    warm = v2_body(offload.PROCESS_BYTES / MIB + 0.1)
    await offload.parse(len(warm), codec.decode_infer_request, warm, "m", None, None)  # workers started
    print(f"{'body':>8} {'thread s':>9} {'process s':>10} {'ratio':>6} {'stall thread s':>15} {'stall process s':>16}")
    for mib in sizes:
        body = v2_body(mib)

        def thread(body: bytes = body) -> Awaitable[Any]:
            return offload.convert(len(body), codec.decode_infer_request, body, "m", None, None)

        def process(body: bytes = body) -> Awaitable[Any]:
            return offload._pool.run(codec.decode_infer_request, body, ("m", None, None), {})

        thread_s, thread_stall = await _timed(thread, repeat)
        process_s, process_stall = await _timed(process, repeat)
        print(
            f"{len(body) / MIB:>6.1f}Mi {thread_s:>9.3f} {process_s:>10.3f} {process_s / thread_s:>6.2f} "
            f"{thread_stall:>15.3f} {process_stall:>16.3f}"
        )
    offload.shutdown()


def _tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return int(total)


def attack(name: str, src: str, mib: float, repository: Path, dense: int = 0) -> None:
    env = {**os.environ, "PYTHONPATH": src}
    command = [sys.executable, "-m", "onnxserve.cli", "serve", "--model-repository", str(repository)]
    command += ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"]
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    url = ""
    while not url:
        line = server.stderr.readline()
        if not line:
            raise RuntimeError(f"{name}: the server did not start")
        if "HTTP (" in line:
            url = "http://" + line.rsplit("//", 1)[1].strip()
    threading.Thread(target=server.stderr.read, daemon=True).start()
    try:
        if dense:
            bodies = [(f"{url}/v2/models/total/infer", dense_body())] * dense
            what = f"{dense} x 4 MiB-1 of empty lists"
        else:
            bodies = [(f"{url}/v2/models/total/infer", v2_body(mib))] * 2
            bodies += [(f"{url}/v1/models/total:predict", tfs_nan_body(mib))] * 2
            what = f"4 x {mib:.0f} MB JSON"
        rest_rss = _tree_rss(server.pid)
        statuses: list[int] = []
        started = time.perf_counter()
        posts = [
            threading.Thread(target=lambda u=u, b=b: statuses.append(requests.post(u, data=b, timeout=300).status_code))
            for u, b in bodies
        ]
        for post in posts:
            post.start()
        slowest, peak = 0.0, 0
        while any(p.is_alive() for p in posts):
            probe = time.perf_counter()
            requests.get(f"{url}/v2/health/ready", timeout=60).raise_for_status()
            slowest = max(slowest, time.perf_counter() - probe)
            peak = max(peak, _tree_rss(server.pid))
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        print(
            f"{name:>8}: {what} {sorted(set(statuses))} in {elapsed:.1f} s; slowest probe {slowest:.3f} s; "
            f"RSS at rest {rest_rss / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB (server and workers)"
        )
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 8, 60], help="body sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], help="NAME=SRC: a source tree to serve")
    parser.add_argument("--attack-mib", type=float, default=60)
    parser.add_argument(
        "--dense", type=int, default=0, help="instead, send this many 4 MiB-1 bodies of empty lists at once"
    )
    args = parser.parse_args()
    asyncio.run(in_process(args.sizes, args.repeat))
    if args.tree:
        import onnx

        with tempfile.TemporaryDirectory() as folder:
            repository = Path(folder)
            model = onnx.parser.parse_model(
                '<ir_version: 8, opset_import: ["" : 17]> total (float[n] x) => (float total) '
                "{ total = ReduceSum <keepdims = 0> (x) }"
            )
            (repository / "total" / "1").mkdir(parents=True)
            onnx.save(model, repository / "total" / "1" / "model.onnx")
            for tree in args.tree:
                name, src = tree.split("=", 1)
                attack(name, str(Path(src).resolve()), args.attack_mib, repository, args.dense)


if __name__ == "__main__":
    main()
