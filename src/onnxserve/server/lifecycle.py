"""Start-up and shutdown: load every model, then listen; refuse to start half-configured."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from dataclasses import dataclass

import uvicorn

from onnxserve.config import ServerConfig, ServerSettings
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import InferenceService
from onnxserve.protocols.v2_rest.routes import EXTENSIONS
from onnxserve.server.app import create_app

log = logging.getLogger(__name__)


def build_service(config: ServerConfig, settings: ServerSettings) -> InferenceService:
    """Load every model in ``config`` (raising ConfigError if any fails) and wrap them in a service."""
    registry = ModelRegistry.load(config)
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
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return uvicorn.Server(config)


def serve(config: ServerConfig, settings: ServerSettings) -> None:
    """Load the models, then serve until SIGINT or SIGTERM."""
    service = build_service(config, settings)
    http_socket = bind(settings.host, settings.http_port)
    for model in service.registry:
        log.info("serving model %s versions %s", model.name, ", ".join(map(str, model.version_numbers())))
    log.info("HTTP (KServe V2 REST) on http://%s:%d", settings.host, http_socket.getsockname()[1])
    log.info("gRPC port %d is reserved; the gRPC protocol is not served yet", settings.grpc_port)
    server = _uvicorn_server(service, settings)
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal through the handler that was in
    # place before it started; a no-op handler there makes a drained shutdown exit with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    try:
        server.run(sockets=[http_socket])
    finally:
        service.close()


@dataclass
class RunningServer:
    """A server running on a background thread (for tests and embedding)."""

    service: InferenceService
    host: str
    http_port: int
    _server: uvicorn.Server
    _thread: threading.Thread

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.service.close()


def start_in_background(config: ServerConfig, settings: ServerSettings) -> RunningServer:
    """Load the models and serve on a background thread; returns once the server accepts requests."""
    service = build_service(config, settings)
    sock = bind(settings.host, settings.http_port)
    server = _uvicorn_server(service, settings)
    started = threading.Event()

    def run() -> None:
        async def main() -> None:
            task = asyncio.create_task(server.serve(sockets=[sock]))
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            started.set()
            await task

        asyncio.run(main())

    thread = threading.Thread(target=run, name="onnxserve-http", daemon=True)
    thread.start()
    if not started.wait(timeout=30):
        raise RuntimeError("the server did not start within 30 s")
    return RunningServer(service, settings.host, sock.getsockname()[1], server, thread)
