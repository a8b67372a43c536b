"""What grpc itself costs per request at concurrency 1, beside onnxserve's gRPC server (issue #18).

Bare gRPC servers answer ``ModelInfer`` of the add model with a fixed, pre-serialized answer (no
decode, no model, no budget): the floor that any servicer on that grpc server stands on. Each runs in
its own process; the same closed-loop ``tritonclient.grpc`` client (``bench/tiny_ab.py``) measures the
server's CPU time per request and the client's p50, request by request in turn, beside onnxserve
itself (``onnxserve serve``, this tree) on the same machine:

- ``aio+uvloop``: ``grpc.aio`` on uvloop, as onnxserve runs it (HTTP and gRPC share one loop);
- ``aio+uvloop+read``: the same, its handler a streaming-request one that reads the message itself
  (``context.read()``), as onnxserve's ``MessageReception`` does to bound the message's wait and size;
- ``aio+uvloop+hop``: ``aio+uvloop`` whose handler also hands a no-op to a thread and waits for it, as
  every model run is handed to its instance thread;
- ``aio+asyncio``: ``grpc.aio`` on the standard asyncio loop;
- ``sync``: grpc's threaded server (a thread pool runs the handler).

``--env KEY=VALUE`` sets grpc environment variables (e.g. ``GRPC_POLL_STRATEGY=poll``) for every
server; ``--option NAME=VALUE`` adds a channel option to the bare servers (e.g.
``grpc.optimization_target=latency``); ``--base-src`` adds onnxserve served from another tree.

    PYTHONPATH=src .venv/bin/python -m bench.grpc_floor [--rounds 5] [--requests 1500]
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
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.data import write_add_model
from bench.server import OnnxServer, free_port, stop_process_group
from bench.settings import ROOT
from bench.tiny_ab import Block, Side, measure_interleaved

VARIANTS = ("aio+uvloop", "aio+uvloop+read", "aio+uvloop+hop", "aio+asyncio", "sync")
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _answer() -> bytes:
    """The add model's answer as onnxserve sends it (raw output contents)."""
    from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

    message = pb.ModelInferResponse(model_name="add", model_version="1")
    message.outputs.add(name="sum", datatype="FP32", shape=[1, 16])
    message.raw_output_contents.append(np.zeros(16, np.float32).tobytes())
    return message.SerializeToString()


def _handler(answer: bytes, asynchronous: bool, variant: str = "") -> grpc.GenericRpcHandler:
    if variant.endswith("+read"):

        async def read_then_answer(requests: Any, context: Any) -> bytes:
            await context.read()
            return answer

        handler = grpc.stream_unary_rpc_method_handler(read_then_answer)
        return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler})
    if variant.endswith("+hop"):
        pool = futures.ThreadPoolExecutor(max_workers=1)

        async def hop_then_answer(request: bytes, context: Any) -> bytes:
            await asyncio.get_running_loop().run_in_executor(pool, int)
            return answer

        handler = grpc.unary_unary_rpc_method_handler(hop_then_answer)
        return grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler})
    if asynchronous:

        async def infer_async(request: bytes, context: Any) -> bytes:
            return answer

        behaviour: Any = infer_async
    else:

        def infer_sync(request: bytes, context: Any) -> bytes:
            return answer

        behaviour = infer_sync
    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(behaviour)}
    )


def serve(variant: str, port: int, options: list[tuple[str, int | str]]) -> None:
    """Run one bare server until killed (the child process's body)."""
    answer = _answer()
    address = f"127.0.0.1:{port}"
    if variant == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        server.add_generic_rpc_handlers((_handler(answer, False),))
        server.add_insecure_port(address)
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        aio_server = grpc.aio.server(options=options)
        aio_server.add_generic_rpc_handlers((_handler(answer, True, variant),))
        aio_server.add_insecure_port(address)
        await aio_server.start()
        await aio_server.wait_for_termination()

    if variant.startswith("aio+uvloop"):
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.run_until_complete(main())


class BareServer:
    """A bare grpc server in a child process; quacks like ``OnnxServer`` for ``measure``."""

    def __init__(self, variant: str, options: list[str]) -> None:
        self.name = variant
        self.port = free_port()
        self.options = options
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> BareServer:
        command = [sys.executable, "-m", "bench.grpc_floor", "--serve", self.name, "--port", str(self.port)]
        command += [a for o in self.options for a in ("--option", o)]
        self._process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
        channel = grpc.insecure_channel(self.grpc_address)
        grpc.channel_ready_future(channel).result(timeout=60)
        channel.close()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            stop_process_group(self._process, timeout_s=5)


def _options(pairs: list[str]) -> list[tuple[str, int | str]]:
    return [(k, int(v) if v.lstrip("-").isdigit() else v) for k, v in (p.split("=", 1) for p in pairs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--variants", nargs="*", default=[*VARIANTS, "onnxserve"])
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for every server")
    parser.add_argument("--option", action="append", default=[], help="NAME=VALUE channel option (bare servers)")
    parser.add_argument("--base-src", type=Path, help="also serve onnxserve from this tree (its src/)")
    parser.add_argument(
        "--tree", action="append", default=[], help="NAME=SRC: also serve onnxserve from SRC (e.g. a trimmed copy)"
    )
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, _options(args.option))
        return
    os.environ.update(dict(p.split("=", 1) for p in args.env))
    results: dict[str, list[Block]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        repository = Path(folder)
        write_add_model(repository)
        config = repository / "config.json"
        config.write_text('{"model_config_list": [{"name": "add", "base_path": "add"}]}')
        sides = []
        trees = {"onnxserve": ROOT / "src"}
        if args.base_src is not None:
            trees["onnxserve-base"] = args.base_src
        trees.update((name, Path(src)) for name, src in (t.split("=", 1) for t in args.tree))
        for name in trees:
            if name not in args.variants:
                args.variants.append(name)
                results[name] = []
        for variant in args.variants:
            if variant in trees:
                log = ROOT / "bench" / "results" / f"grpc_floor-{variant}.log"
                server: Any = OnnxServer(config, log, variant, src=trees[variant])
            else:
                server = BareServer(variant, args.option)
            sides.append(Side(variant, stack.enter_context(server)))
        for r in range(args.rounds):
            order = sides if r % 2 == 0 else sides[::-1]
            for side, block in zip(order, measure_interleaved(order, "grpc", args.requests), strict=True):
                results[side.name].append(block)
            print(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"gRPC ModelInfer, add model, concurrency 1: medians of {args.rounds} rounds x {args.requests} requests")
    if args.env or args.option:
        print(f"environment {args.env}, options {args.option}")
    first = statistics.median(b.cpu_us for b in results[args.variants[0]])
    print(f"{'server':14} {'CPU us/request':>15} {'ratio':>6} {'client p50 us':>14}")
    for variant, blocks in results.items():
        cpu = statistics.median(b.cpu_us for b in blocks)
        p50 = statistics.median(b.p50_us for b in blocks)
        print(f"{variant:14} {cpu:15.1f} {cpu / first:6.2f} {p50:14.1f}")


if __name__ == "__main__":
    main()
