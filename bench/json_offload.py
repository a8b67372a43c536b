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
size threshold, decoded in a worker for their container count); with ``--dense-kind numbers``, bodies of
about two million numbers (``0,0,...``), half V2 and half TF Serving rows (decoded in a worker for their
value count).

``--costs`` measures instead what decides between the server and a worker (``offload.decodes_in_worker``):
for bodies of 1 MiB and 4 MiB - 1 dense with each kind of value (numbers short and long, as perf_analyzer
sends them, strings, empty lists, TF Serving rows), the decode time per MiB and per value (comma) in a codec
thread and the loop's longest stall meanwhile, the time in a worker, and the cost of the counting; then the
round trip of a tiny body through a worker (the hand-off) against decoding it inline.
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


def dense_v2_body(size: int, item: bytes, datatype: str = "FP32", row: bool = False) -> bytes:
    """A V2 body of exactly ``size`` bytes whose tensor data is ``item`` repeated (padded with spaces), of
    shape ``[count]`` (``row``: ``[1, count]``)."""
    count = (size - 100) // (len(item) + 1)
    shape = b"1,%d" % count if row else b"%d" % count
    head = b'{"inputs":[{"name":"x","datatype":"%s","shape":[%s],"data":[' % (datatype.encode(), shape)
    body = head + b",".join([item] * count) + b"]}]}"
    return body + b" " * (size - len(body))


def dense_tfs_body(size: int, item: bytes) -> bytes:
    """A TF Serving body of exactly ``size`` bytes, ``{"instances":[[item,item,...]]}``."""
    count = (size - 30) // (len(item) + 1)
    body = b'{"instances":[[' + b",".join([item] * count) + b"]]}"
    return body + b" " * (size - len(body))


def perf_v2_body(size: int) -> bytes:
    """A V2 FP32 body as perf_analyzer sends it (random floats of about 10 characters), ``size`` bytes."""
    values = np.random.default_rng(1).random((size - 200) // 11).astype(np.float32)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [values.size], "data": values}]}
    body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return body + b" " * (size - len(body))


COST_KINDS: dict[str, Callable[[int], bytes]] = {
    "FP32 (perf)": perf_v2_body,
    "ints 0": lambda size: dense_v2_body(size, b"0"),
    "floats 1.5e-3": lambda size: dense_v2_body(size, b"1.5e-3"),
    "long floats": lambda size: dense_v2_body(size, b"0.12345678901234567"),
    'strings "ab"': lambda size: dense_v2_body(size, b'"ab"', "BYTES"),
    "empty lists": lambda size: dense_v2_body(size, b"[]"),
    "TFS ints 0": lambda size: dense_tfs_body(size, b"0"),
}
"""What a body dense with each kind of JSON value looks like (``--costs``)."""

SMALL_BODIES: dict[str, bytes] = {
    "[1,16] FP32": orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.25 * i for i in range(16)]}]}
    ),
    "12-word text": orjson.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [" ".join(["word"] * 12)]}]}
    ),
}


def _decode(kind: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The codec function that decodes a body of ``kind`` and its arguments after the body."""
    if kind.startswith("TFS"):
        from onnxserve.core.datatypes import from_v2
        from onnxserve.core.types import ModelMetadata, TensorSpec
        from onnxserve.protocols.tfserving_rest import codec as tfs

        spec = TensorSpec("x", from_v2("FP32"), (-1, -1))
        meta = ModelMetadata("m", "1", ("1",), "onnxruntime_onnx", (spec,), (spec,))
        return tfs.decode_predict_body, (meta, "1")
    from onnxserve.protocols.v2_rest import codec as v2

    return v2.decode_infer_request, ("m", None, None)


def _cpu_ms(run: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median CPU milliseconds this process spent in ``run()`` (all its threads: time a box loaded by other
    work does not inflate) and median wall milliseconds."""
    from onnxserve.errors import OnnxServeError

    cpu, wall = [], []
    for _ in range(repeat):
        started, clock = time.process_time(), time.perf_counter()
        with contextlib.suppress(OnnxServeError):  # a refusal after the parse costs the parse all the same
            run()
        cpu.append((time.process_time() - started) * 1e3)
        wall.append((time.perf_counter() - clock) * 1e3)
    return statistics.median(cpu), statistics.median(wall)


def costs(sizes: list[int], repeat: int) -> None:
    """Decode cost by kind of body, in CPU time of the server's process (the time it holds the interpreter):
    inline (ms, per MiB, per value: a comma), and when a worker process decodes it (the hand-off: writing
    the body to the memory file, reading the arrays back), with the worker round trip's wall time; and what
    the counting of ``,`` ``[`` ``{`` ``"`` that decides between them costs. Then a tiny body's round trip."""
    from onnxserve.protocols import offload

    loop = asyncio.new_event_loop()

    def worker(body: bytes, work: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], Any]:
        return lambda: loop.run_until_complete(offload._pool.run(work, body, args, {}))

    work, args = _decode("ints 0")
    warm = dense_v2_body(offload.PROCESS_BYTES, b"0")
    _cpu_ms(worker(warm, work, args), 1)  # workers started
    print(
        f"{'body':>14} {'MiB':>5} {'values':>8} {'count ms':>8} {'inline ms':>9} {'ms/MiB':>7} {'ns/value':>8} "
        f"{'hand-off ms':>11} {'hand-off/inline':>15} {'worker wall ms':>14} {'in worker':>9}"
    )
    for size_bytes in sizes:
        for kind, build in COST_KINDS.items():
            body = build(size_bytes)
            work, args = _decode(kind)
            count_ms, _ = _cpu_ms(lambda body=body: [body.count(c) for c in (b",", b"[", b"{", b'"')], repeat * 3)
            inline_ms, _ = _cpu_ms(lambda body=body, work=work, args=args: work(body, *args), repeat)
            hand_off_ms, wall_ms = _cpu_ms(worker(body, work, args), repeat)
            values = body.count(b",") + 1
            size = len(body) / MIB
            print(
                f"{kind:>14} {size:>5.2f} {values:>8} {count_ms:>8.2f} {inline_ms:>9.1f} {inline_ms / size:>7.1f} "
                f"{inline_ms * 1e6 / values:>8.0f} {hand_off_ms:>11.1f} {hand_off_ms / inline_ms:>15.2f} "
                f"{wall_ms:>14.1f} {offload.decodes_in_worker(len(body), body)!s:>9}"
            )
    for name, body in SMALL_BODIES.items():
        work, args = _decode(name)
        inline_ms, inline_wall = _cpu_ms(lambda body=body, work=work, args=args: work(body, *args), repeat * 10)
        hand_off_ms, wall_ms = _cpu_ms(worker(body, work, args), repeat * 10)
        print(
            f"{name:>14}: {len(body)} bytes, inline {inline_ms * 1e3:.0f} us CPU; through a worker "
            f"{hand_off_ms * 1e3:.0f} us CPU of the server, {wall_ms * 1e3:.0f} us wall "
            f"({wall_ms / inline_wall:.0f} x); "
            f"in a worker by the rule: {offload.decodes_in_worker(len(body), body)}"
        )
    offload.shutdown()
    loop.close()


def _tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return int(total)


def dense_number_bodies(url: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` bodies of 4 MiB - 1 bytes of about two million numbers each (an outside attack, rt9): half V2
    ``"data":[0,0,...]``, half TF Serving ``{"instances":[[0,0,...]]}``, to a model summing each row."""
    v2 = (f"{url}/v2/models/rows/infer", dense_v2_body(4 * MIB - 1, b"0", row=True))
    tfs = (f"{url}/v1/models/rows:predict", dense_tfs_body(4 * MIB - 1, b"0"))
    return [v2, tfs] * (count // 2) + [v2] * (count % 2)


def attack(name: str, src: str, mib: float, repository: Path, dense: int = 0, kind: str = "lists") -> float:
    """Serve ``repository`` from the tree ``src`` and send it the bodies; returns the slowest probe's seconds."""
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
        if dense and kind == "numbers":
            bodies = dense_number_bodies(url, dense)
            what = f"{dense} x 4 MiB-1 of 2 M numbers (V2, TF Serving)"
        elif dense:
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
        return slowest
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
    parser.add_argument(
        "--dense-kind",
        choices=["lists", "numbers"],
        default="lists",
        help="what the --dense bodies hold: 1.4 M empty lists, or 2 M numbers (half V2, half TF Serving)",
    )
    parser.add_argument(
        "--costs",
        type=int,
        nargs="*",
        help="instead, measure the decode cost of bodies of these many bytes dense with each kind of value "
        f"(default: {MIB} and {4 * MIB - 1})",
    )
    args = parser.parse_args()
    if args.costs is not None:
        costs(args.costs or [MIB, 4 * MIB - 1], args.repeat)
        return
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
            rows = onnx.parser.parse_model(
                '<ir_version: 8, opset_import: ["" : 17]> rows (float[b, n] x) => (float[b] total) '
                "{ axes = Constant <value = int64[1] {1}> () total = ReduceSum <keepdims = 0> (x, axes) }"
            )
            (repository / "rows" / "1").mkdir(parents=True)
            onnx.save(rows, repository / "rows" / "1" / "model.onnx")
            slowest = {}
            for tree in args.tree:
                name, src = tree.split("=", 1)
                slowest[name] = attack(
                    name, str(Path(src).resolve()), args.attack_mib, repository, args.dense, args.dense_kind
                )
            first, *others = slowest
            for other in others:
                print(f"slowest probe {other} / {first}: {slowest[other] / slowest[first]:.2f}")


if __name__ == "__main__":
    main()
