"""Start-up and shutdown: load every model, then listen; refuse to start half-configured.

HTTP (uvicorn) and gRPC (grpc.aio) share one event loop. On SIGINT/SIGTERM uvicorn stops accepting
and finishes open HTTP requests; then gRPC gets a grace period for its open calls; then the process
exits with status 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from onnxserve.config import ServerConfig, ServerSettings
from onnxserve.core.observe import Observers
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import InferenceService
from onnxserve.server.app import create_app
from onnxserve.server.grpc_server import create_grpc_server

log = logging.getLogger(__name__)

GRPC_GRACE_SECONDS = 10.0

EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
"""KServe V2 extensions every protocol front end implements; advertised in server metadata."""


def build_service(
    config: ServerConfig, settings: ServerSettings, observers: Observers | None = None
) -> InferenceService:
    """Load every model in ``config`` (raising ConfigError if any fails) and wrap them in a service."""
    registry = ModelRegistry.load(config, observers)
    return InferenceService(registry, threads=settings.inference_threads, extensions=EXTENSIONS)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(service: InferenceService, settings: ServerSettings) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(service),
        loop="none",  # the loop is ours: uvloop, shared with gRPC
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return uvicorn.Server(config)


async def _serve(
    service: InferenceService,
    settings: ServerSettings,
    http: uvicorn.Server,
    http_socket: socket.socket,
    on_started: Callable[[int, int], None],
) -> None:
    grpc_server, grpc_port = create_grpc_server(service, settings)
    await grpc_server.start()
    try:
        task = asyncio.create_task(http.serve(sockets=[http_socket]))
        while not http.started and not task.done():
            await asyncio.sleep(0.01)
        if not task.done():
            on_started(http_socket.getsockname()[1], grpc_port)
        await task
    finally:
        await grpc_server.stop(GRPC_GRACE_SECONDS)
        await service.registry.stop()


def _new_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def serve(config: ServerConfig, settings: ServerSettings) -> None:
    """Load the models, then serve HTTP and gRPC until SIGINT or SIGTERM."""
    service = build_service(config, settings)
    http_socket = bind(settings.host, settings.http_port)
    http = _uvicorn_server(service, settings)

    def announce(http_port: int, grpc_port: int) -> None:
        for model in service.registry:
            log.info("serving model %s versions %s", model.name, ", ".join(map(str, model.version_numbers())))
        log.info("HTTP (KServe V2 REST, TF Serving REST) on http://%s:%d", settings.host, http_port)
        log.info("gRPC (KServe V2) on %s:%d", settings.host, grpc_port)

    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal through the handler that was in
    # place before it started; a no-op handler there makes a drained shutdown exit with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    loop = _new_loop()
    try:
        loop.run_until_complete(_serve(service, settings, http, http_socket, announce))
    finally:
        loop.close()
        service.close()


@dataclass
class RunningServer:
    """A server running on a background thread (for tests and embedding)."""

    service: InferenceService
    host: str
    http_port: int
    grpc_port: int
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self.service.close()


def start_in_background(config: ServerConfig, settings: ServerSettings) -> RunningServer:
    """Load the models and serve on a background thread; returns once both listeners accept requests."""
    service = build_service(config, settings)
    sock = bind(settings.host, settings.http_port)
    http = _uvicorn_server(service, settings)
    started = threading.Event()
    ports: list[int] = []
    failure: list[BaseException] = []

    def on_started(http_port: int, grpc_port: int) -> None:
        ports.extend((http_port, grpc_port))
        started.set()

    def run() -> None:
        loop = _new_loop()
        try:
            loop.run_until_complete(_serve(service, settings, http, sock, on_started))
        except BaseException as e:
            failure.append(e)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="onnxserve-server", daemon=True)
    thread.start()
    if not started.wait(timeout=60) or failure:
        service.close()
        raise RuntimeError(f"the server did not start: {failure[0] if failure else 'timed out'}")
    return RunningServer(service, settings.host, ports[0], ports[1], http, thread)
