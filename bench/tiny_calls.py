"""Function calls per request on the server's event-loop thread, two trees side by side (issue #18).

CPU time per request moves by 10-20 % between identical servers when other work shares the machine;
the number of Python (and C) function calls the event-loop thread makes per request does not. Each
tree's server (``onnxserve serve``, the add model alone, as ``bench/tiny_ab.py`` serves it) is started
under a small wrapper that turns ``cProfile`` on for the main thread (the event loop: HTTP, gRPC's
handlers, the service) on SIGUSR1 and writes its statistics on SIGUSR2; after a warm-up, N closed-loop
requests over each protocol are counted, and the calls per request are printed side by side with their
ratio, with the functions whose call counts changed most.

    PYTHONPATH=src .venv/bin/python -m bench.tiny_calls --a-src /work/wt/base/src [--requests 500]

Calls are not time: a C call into grpc or protobuf counts one however long it takes. Use it beside
``bench/tiny_ab.py``'s CPU time, never alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.data import write_add_model
from bench.server import OnnxServer
from bench.settings import ROOT
from bench.tiny_ab import PROTOCOLS, WARMUP, Side, _sender

WRAPPER = """
import cProfile, signal, sys
profile = None
out = sys.argv[1]
def start(*_):
    global profile
    profile = cProfile.Profile()
    profile.enable()
def stop(*_):
    profile.disable()
    profile.dump_stats(out)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
sys.argv = ["onnxserve", *sys.argv[2:]]
from onnxserve.cli.main import main
main()
"""


class ProfiledServer(OnnxServer):
    """``onnxserve serve`` run by the wrapper above; ``stats`` is where SIGUSR2 writes the profile."""

    def __init__(self, config: Path, log: Path, name: str, src: Path, wrapper: Path, stats: Path) -> None:
        super().__init__(config, log, name, src=src)
        self.wrapper = wrapper
        self.stats = stats

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(self.wrapper), str(self.stats), *super().command[1:]]


def _label(key: tuple[str, int, str]) -> str:
    """A function by name and file (no line: the two trees' lines differ)."""
    path, _line, name = key
    return f"{name} ({'/'.join(Path(path).parts[-2:])})" if path != "~" else re.sub(r" at 0x[0-9a-f]+", "", name)


def count(side: Side, protocol: str, requests: int, save: Path | None = None) -> tuple[int, Counter[str]]:
    """Calls on the event-loop thread over ``requests`` requests, in all and by function."""
    server = side.server
    assert isinstance(server, ProfiledServer)
    send = _sender(side, protocol)
    for _ in range(WARMUP):
        send()
    server.stats.unlink(missing_ok=True)
    os.kill(server.pid, signal.SIGUSR1)
    time.sleep(0.2)
    for _ in range(requests):
        send()
    os.kill(server.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not server.stats.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # written
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        shutil.copy(server.stats, save / f"{side.name}-{protocol}.prof")
    stats = pstats.Stats(str(server.stats)).stats  # type: ignore[attr-defined]
    by_function: Counter[str] = Counter()
    for key, value in stats.items():
        by_function[_label(key)] += value[1]
    return sum(by_function.values()), by_function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-src", type=Path, required=True)
    parser.add_argument("--b-src", type=Path, default=ROOT / "src")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--protocols", nargs="*", default=list(PROTOCOLS), choices=PROTOCOLS)
    parser.add_argument("--save", type=Path, help="keep each profile here (NAME-PROTOCOL.prof, for pstats)")
    parser.add_argument("--top", type=int, default=12, help="functions whose call counts changed most")
    args = parser.parse_args()
    results: dict[str, list[tuple[int, Counter[str]]]] = {}
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        root = Path(folder)
        write_add_model(root)
        config = root / "config.json"
        config.write_text('{"model_config_list": [{"name": "add", "base_path": "add"}]}')
        wrapper = root / "profiled.py"
        wrapper.write_text(WRAPPER)
        logs = ROOT / "bench" / "results" / "tiny_calls"
        sides = []
        for name, src in (("A", args.a_src), ("B", args.b_src)):
            server = ProfiledServer(config, logs / f"{name}.log", name, src, wrapper, root / f"{name}.prof")
            sides.append(Side(name, stack.enter_context(server)))
        for protocol in args.protocols:
            results[protocol] = [count(side, protocol, args.requests, args.save) for side in sides]
    print(f"A: {args.a_src}\nB: {args.b_src}")
    print(f"calls per request on the event-loop thread ({args.requests} requests, concurrency 1)")
    for protocol, ((total_a, funcs_a), (total_b, funcs_b)) in results.items():
        a, b = total_a / args.requests, total_b / args.requests
        print(f"{protocol:8} A {a:8.1f}  B {b:8.1f}  B/A {b / a:5.2f}")
        changed = Counter({k: funcs_b.get(k, 0) - funcs_a.get(k, 0) for k in set(funcs_a) | set(funcs_b)})
        for name, delta in sorted(changed.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
            if delta:
                print(f"    {delta / args.requests:+7.2f}  {name[:100]}")


if __name__ == "__main__":
    main()
