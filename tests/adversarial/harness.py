"""A real server process under a memory cap, for the adversarial suite (tests/adversarial/).

``CappedServer`` starts ``onnxserve serve`` in a subprocess whose address space is capped (``prlimit``
via ``resource.setrlimit`` in the child), learns both ports from the start-up log, and gives the attack
tests what they assert on: is it alive, how long does a probe take, how much memory does it hold.
Only loopback addresses are ever used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil
import requests

from onnxserve.protocols.v2_grpc.generated import grpc_service_pb2 as pb

ONNXSERVE = [sys.executable, "-m", "onnxserve.cli"]
HTTP_LINE = re.compile(r"HTTP \(.*\) on https?://([\d.]+):(\d+)")
GRPC_LINE = re.compile(r"gRPC \(KServe V2\) on ([\d.]+):(\d+)")
DEFAULT_CAP_BYTES = 6 * 1024**3


class CappedServer:
    """``onnxserve serve ARGS`` on ephemeral loopback ports, its address space capped at ``cap_bytes``."""

    def __init__(
        self,
        args: Sequence[str],
        cap_bytes: int = DEFAULT_CAP_BYTES,
        start_timeout: float = 90,
        data_cap_bytes: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        command = [*ONNXSERVE, "serve", "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", *args]
        environment = None if env is None else {**os.environ, **env}
        # The caps are set on the child from here, as soon as it runs (it has loaded nothing yet), not by a
        # preexec_fn between fork and exec, which is not safe in a process with threads (the tests' own,
        # pytest-xdist's).
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
        resource.prlimit(self.process.pid, resource.RLIMIT_AS, (cap_bytes, cap_bytes))
        if data_cap_bytes is not None:  # also caps the JSON decoding workers (offload.WORKER_DATA_BYTES)
            resource.prlimit(self.process.pid, resource.RLIMIT_DATA, (data_cap_bytes, data_cap_bytes))
        self.log_lines: list[str] = []
        self._reader: threading.Thread | None = None
        self.http_url = ""
        self.grpc_target = ""
        assert self.process.stderr is not None
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline and not (self.http_url and self.grpc_target):
            line = self.process.stderr.readline()
            if not line:
                break
            self.log_lines.append(line)
            if match := HTTP_LINE.search(line):
                self.http_url = f"http://{match.group(1)}:{match.group(2)}"
            if match := GRPC_LINE.search(line):
                self.grpc_target = f"{match.group(1)}:{match.group(2)}"
        if not (self.http_url and self.grpc_target):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log_lines))
        # Keep draining stderr so a chatty server never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        # ``stop`` closes the pipe when a process the server started (a JSON worker) still holds it open
        with contextlib.suppress(ValueError, OSError):
            for line in self.process.stderr:
                self.log_lines.append(line)

    @property
    def host(self) -> str:
        return self.http_url.split("//")[1].split(":")[0]

    @property
    def http_port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    @property
    def grpc_port(self) -> int:
        return int(self.grpc_target.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def descendants(self) -> list[psutil.Process]:
        """The processes the server started (the JSON decoding workers' fork server, resource tracker,
        workers and watchdogs), those still running."""
        return [p for p in psutil.Process(self.process.pid).children(recursive=True) if alive(p)]

    def workers(self) -> list[psutil.Process]:
        """The JSON decoding workers (the fork server's children) and their watchdogs."""
        found = []
        for process in self.descendants():
            with contextlib.suppress(psutil.Error):  # one that has just exited
                if process.ppid() != self.process.pid:
                    found.append(process)
        return found

    def terminate(self) -> float:
        """Sends SIGTERM (the drain begins): the ``time.monotonic()`` it was sent at."""
        stopping = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        return stopping

    def exit_code(self, timeout: float = 60, before: str = "") -> int:
        """The process's exit status once it exits; fails when it has not within ``timeout`` seconds of
        its SIGTERM (``before``: what it did before the fix, for the message)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit within {timeout:g} s of SIGTERM{before}") from None

    def terminated(self, timeout: float = 60, before: str = "") -> tuple[int, float]:
        """SIGTERM, then the exit status and the seconds the process took to exit (``exit_code``)."""
        stopping = self.terminate()
        code = self.exit_code(timeout, before)
        return code, time.monotonic() - stopping

    def probe_seconds(self, path: str = "/v2/health/ready", timeout: float = 10) -> float:
        """Seconds one fresh-connection GET of ``path`` took; raises if it did not answer 200."""
        started = time.perf_counter()
        response = requests.get(self.http_url + path, timeout=timeout)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        return elapsed

    def grpc_probe_seconds(self, timeout: float = 30) -> float:
        """Seconds one gRPC ServerReady on a fresh channel took; raises if it did not answer ready."""
        started = time.perf_counter()
        with grpc.insecure_channel(self.grpc_target) as channel:
            ready = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=pb.ServerReadyRequest.SerializeToString,
                response_deserializer=pb.ServerReadyResponse.FromString,
            )
            assert ready(pb.ServerReadyRequest(), timeout=timeout).ready
        return time.perf_counter() - started

    def log(self) -> str:
        return "".join(self.log_lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=5)  # the rest of the log, up to the pipe's end
        if self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> CappedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def alive(process: psutil.Process) -> bool:
    """Whether ``process`` still runs (not gone, not a zombie)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def cpu_seconds(process: psutil.Process) -> float:
    """The CPU time ``process`` has used (0 once it is gone)."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def serve_capped(
    repository: Path,
    *extra: str,
    cap_bytes: int = DEFAULT_CAP_BYTES,
    data_cap_bytes: int | None = None,
    env: Mapping[str, str] | None = None,
) -> CappedServer:
    """``CappedServer`` over a model repository folder (``env``: variables added to the environment)."""
    return CappedServer(
        ["--model-repository", str(repository), *extra], cap_bytes=cap_bytes, data_cap_bytes=data_cap_bytes, env=env
    )


def message_room(max_message: int, inflight: int) -> tuple[str, ...]:
    """``onnxserve serve``'s options for gRPC messages of at most ``max_message`` bytes and ``inflight``
    bytes of requests in flight: the room for arriving messages holds ``inflight // max_message``."""
    return ("--grpc-max-message-bytes", str(max_message), "--max-inflight-bytes", str(inflight))


def serve_config(
    folder: Path, entries: Sequence[dict[str, Any]], *extra: str, cap_bytes: int = DEFAULT_CAP_BYTES
) -> CappedServer:
    """``CappedServer`` over a config file, ``folder/config.json``, whose ``model_config_list`` is ``entries``."""
    config = folder / "config.json"
    config.write_text(json.dumps({"model_config_list": list(entries)}))
    return CappedServer(["--config", str(config), *extra], cap_bytes=cap_bytes)


def connect_from(server: CappedServer, address: str) -> socket.socket:
    """A blocking connection to the server's HTTP port from the loopback ``address`` (127.0.0.x: a client
    of its own, as far as the server's per-address sharing goes)."""
    return socket.create_connection((server.host, server.http_port), timeout=30, source_address=(address, 0))


def raw_request(method: str, path: str, body: bytes = b"", close: bool = False) -> bytes:
    """An HTTP/1.1 request with a JSON ``body`` as bytes, to send on a raw socket."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: [::1]\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    )
    return head.encode("ascii") + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body) from a blocking socket; fails if the server
    closes before answering."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before answering: {data[:300]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def readable(sock: socket.socket) -> bool:
    """Whether the server wrote anything on ``sock`` or closed it (without waiting)."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    try:
        return bool(selector.select(timeout=0))
    finally:
        selector.close()


def said_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server wrote on ``sock`` before closing it; fails on a reset instead of an orderly
    close, or when nothing comes for ``timeout`` seconds."""
    said = b""
    sock.settimeout(timeout)
    while chunk := sock.recv(65536):
        said += chunk
    return said


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
UNLIMITED_MESSAGES = (("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1))
"""Channel options that lift the client's own limits on message size, both ways."""


def grpc_answer(
    target: str,
    request: pb.ModelInferRequest | bytes,
    timeout: float = 60.0,
    options: Sequence[tuple[str, int]] = UNLIMITED_MESSAGES,
) -> pb.ModelInferResponse | grpc.RpcError:
    """One V2 gRPC ModelInfer call to ``target`` (``request`` serialized, or bytes sent as they are) on a
    channel of its own with ``options``: the answer, or the error the call ended with."""
    with grpc.insecure_channel(target, options=list(options)) as channel:
        call = channel.unary_unary(
            MODEL_INFER,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        try:
            response: pb.ModelInferResponse = call(request, timeout=timeout)
            return response
        except grpc.RpcError as e:
            return e


def model_infer(target: str, request: pb.ModelInferRequest, timeout: float = 60.0) -> pb.ModelInferResponse:
    """One V2 gRPC ModelInfer call to ``target`` with no client-side limit on the answer's size; raises
    the call's ``grpc.RpcError``."""
    answer = grpc_answer(target, request, timeout, options=[("grpc.max_receive_message_length", -1)])
    if isinstance(answer, grpc.RpcError):
        raise answer
    return answer


def fill_request(n: int, model: str = "fill") -> pb.ModelInferRequest:
    """A ModelInfer request asking a value-sized model (``value_sized_models``) for ``n`` elements of ``y``."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="n", datatype="INT64", shape=[1]).contents.int64_contents.append(n)
    request.outputs.add(name="y")
    return request


def held_stream(
    target: str, request: pb.ModelInferRequest, stop: threading.Event, timeout: float = 120
) -> Iterator[pb.ModelStreamInferResponse]:
    """A ModelStreamInfer stream to ``target`` that sends ``request`` and stays open until ``stop`` is set
    (or ``timeout`` passes): its answers as they come; raises the call's ``grpc.RpcError``. The channel
    closes when the stream ends or its caller stops reading."""

    def messages() -> Iterator[pb.ModelInferRequest]:
        yield request
        stop.wait(timeout)

    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            MODEL_STREAM_INFER,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        yield from call(messages(), timeout=timeout)


def probed_while(
    server: CappedServer,
    attackers: list[threading.Thread],
    stop: threading.Event,
    seconds: float = 4.0,
    ready: threading.Event | None = None,
) -> list[float]:
    """Run ``attackers`` for ``seconds`` (from when they are ``ready``) while a client calls ServerReady on a
    fresh channel every 0.1 s; the seconds each call took (a call slower than 15 s, or not answered ready,
    CANCELLED for one, fails the test)."""
    for thread in attackers:
        thread.start()
    probes: list[float] = []
    try:
        if ready is not None:
            assert ready.wait(60), "the attackers never got ready"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            probes.append(server.grpc_probe_seconds(timeout=15))
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=30)
    return probes
