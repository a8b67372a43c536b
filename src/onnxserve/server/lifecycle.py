"""Start-up and shutdown: load every model, then listen; refuse to start half-configured.

HTTP (uvicorn) and gRPC (grpc.aio) share one event loop. On SIGTERM (or SIGINT) the server drains:
readiness turns false at once, new inference requests are refused with 503 / UNAVAILABLE, the
requests already accepted (queued or running) finish, up to ``drain_timeout``; those still open then
are answered 503 / UNAVAILABLE (running executions stopped), the listeners close and the process exits
with status 0. A second signal stops at once. SIGHUP re-reads the config
file (or rescans the repository) and applies it, one reload at a time (under explicit model control, to
the models loaded now only: ``ModelManager.reload``); ``poll`` mode does the same every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

import uvicorn

from onnxserve.config import ServerConfig
from onnxserve.core.manager import Catalog, ControlMode, ModelManager
from onnxserve.core.memory import fix_mmap_threshold, limit_malloc_arenas
from onnxserve.core.observe import Observers
from onnxserve.core.registry import ModelRegistry
from onnxserve.core.service import InferenceService
from onnxserve.errors import ConfigError, UnavailableError
from onnxserve.protocols import offload
from onnxserve.protocols.inflight import InflightBytes
from onnxserve.server.app import create_app
from onnxserve.server.connections import ConnectionLimits, GuardedHttpProtocol, guarded_http_protocol
from onnxserve.server.exposure import Exposure
from onnxserve.server.grpc_server import create_grpc_server
from onnxserve.server.listen import bind
from onnxserve.server.metrics import Metrics
from onnxserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

GRPC_GRACE_SECONDS = 10.0
REFUSALS_SENT_SECONDS = 0.2
"""How long a timed-out drain lets the refusals of requests still open go out before closing."""
CUT_BEFORE_CANCEL_SECONDS = 0.5
"""How long before uvicorn cancels the answers still being written (its graceful-shutdown timeout, which
starts a little after the drain ends) their connections are cut."""

EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics", "model_repository")
"""KServe V2 extensions every protocol front end implements; advertised in server metadata."""


def build_service(
    config: ServerConfig,
    settings: ServerSettings,
    observers: Observers | None = None,
    catalog: Catalog | None = None,
) -> InferenceService:
    """Load the models to start with (raising ConfigError if any fails) and wrap them in a service.

    Under explicit model control only ``settings.load_models`` are loaded (``*``: all).
    """
    mode = ControlMode(settings.model_control_mode)
    if mode is ControlMode.EXPLICIT and "*" not in settings.load_models:
        unknown = set(settings.load_models) - {m.name for m in config.model_config_list}
        if unknown:
            raise ConfigError(f"--load-model names models that are not in the repository: {', '.join(sorted(unknown))}")
        config = ServerConfig(model_config_list=[m for m in config.model_config_list if m.name in settings.load_models])
    registry = ModelRegistry.load(config, observers)
    manager = (
        ModelManager(
            registry,
            catalog,
            mode,
            drain_seconds=settings.drain_timeout,
            wait_for_stable_folders=mode is ControlMode.POLL,
        )
        if catalog is not None
        else None
    )
    return InferenceService(
        registry,
        threads=settings.inference_threads,
        extensions=EXTENSIONS,
        manager=manager,
        strict_readiness=settings.strict_readiness,
        request_timeout=settings.request_timeout,
        max_response_bytes=settings.max_response_bytes,
    )


class _DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the service before the listeners close."""

    def __init__(self, config: uvicorn.Config, service: InferenceService, drain_timeout: float) -> None:
        super().__init__(config)
        self.service = service
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stopping: list[asyncio.Task[None]] = []  # schedulers stopping once the drain timed out
        self.drain_deadline: float | None = None  # the loop's time by which a drain ends

    def grpc_grace(self) -> float:
        """How long gRPC's stop lets the calls still open finish: what is left of the drain (its streams are
        open requests too), so that the whole shutdown stays within ``--drain-timeout``; none after a
        second signal; :data:`GRPC_GRACE_SECONDS` when the server stops without a drain."""
        if self.force_exit:
            return 0
        if self.drain_deadline is None or self.loop is None:
            return GRPC_GRACE_SECONDS
        left = self.drain_deadline - self.loop.time()
        return min(GRPC_GRACE_SECONDS, max(REFUSALS_SENT_SECONDS, left))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.service.draining or self.loop is None:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self.service.draining = True
        self.loop.call_soon_threadsafe(lambda: self.loop and self.loop.create_task(self.drain()))

    async def _refuse_open(self) -> None:
        """Answer the requests still open with 503 / UNAVAILABLE rather than leaving them to be cut when the
        listeners close (uvicorn's plain-text 500, a CancelledError traceback in the log): those waiting (for
        the server-wide text budget, a model's text room or instance) at once, and so those being tokenized,
        at their next slice (``core.text_slices``); running executions are stopped (ONNX Runtime's terminate
        flag, at the run's next node) and their callers answered at once."""
        error = UnavailableError(
            "the server is shutting down and this request was still waiting when its drain ended "
            "(--drain-timeout); send it again"
        )
        cut = UnavailableError(
            "the server is shutting down and this request was still running when its drain ended "
            "(--drain-timeout); its run was stopped; send it again"
        )
        self.service.text_budget.close(lambda: error)  # those waiting to be tokenized
        for version in self.service.registry.versions():
            version.text_room.close(lambda: error)
            self._stopping.append(asyncio.get_running_loop().create_task(version.scheduler.stop(error, cut)))
        await asyncio.sleep(REFUSALS_SENT_SECONDS)  # their answers go out before the connections close

    async def drain(self) -> None:
        log.info("draining: not ready, refusing new requests, waiting for %d open ones", self.service.in_flight)
        deadline = asyncio.get_running_loop().time() + self.drain_timeout
        self.drain_deadline = deadline
        # Bodies still being decoded, or waiting for a worker, belong to requests the service now refuses:
        # refused at once (a JSON worker stopped with SIGSTOP would otherwise keep its connection, and the
        # exit, waiting), and so are those arriving from now on (no new worker starts).
        offload.drain()
        await asyncio.get_running_loop().run_in_executor(None, offload.shutdown)
        # Bodies still arriving belong to requests the service refuses once they are in: refused now (left to
        # the listeners' close, uvicorn would cancel them with a plain 500 and a traceback in the log).
        for connection in list(self.server_state.connections):
            if isinstance(connection, GuardedHttpProtocol):
                connection.refuse_unreceived(
                    "the server is shutting down and refuses new requests; this one's body was still arriving; "
                    "send it again"
                )
        while self.service.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self.service.in_flight:
            log.warning("drain timeout: stopping with %d requests still open", self.service.in_flight)
            await self._refuse_open()
        # uvicorn then waits for its connections' tasks: only for what is left of the drain timeout, so
        # that the whole shutdown stays within it (a client that never reads its answer must not double it)
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        self.config.timeout_graceful_shutdown = max(1, math.ceil(left))
        # answers still being written just before uvicorn would cancel them are cut instead (they are dropped
        # either way; cancelled, each logged an ERROR traceback)
        loop.call_later(max(0.0, self.config.timeout_graceful_shutdown - CUT_BEFORE_CANCEL_SECONDS), self._cut_answers)
        self.should_exit = True

    def _cut_answers(self) -> None:
        cut = sum(
            connection.cut_unfinished_answer()
            for connection in list(self.server_state.connections)
            if isinstance(connection, GuardedHttpProtocol)
        )
        if cut:
            log.warning("drain timeout: cut %d connection(s) whose answers their clients had not read", cut)


def _metered_service(
    config: ServerConfig, settings: ServerSettings, catalog: Catalog | None
) -> tuple[InferenceService, Metrics]:
    """``build_service`` with Prometheus metrics observing it."""
    metrics = Metrics()
    observers = Observers()
    observers.add(metrics)
    service = build_service(config, settings, observers, catalog=catalog)
    metrics.watch(service.registry)
    return service, metrics


def _uvicorn_server(
    service: InferenceService, settings: ServerSettings, metrics: Metrics, exposure: Exposure, budget: InflightBytes
) -> _DrainingServer:
    tls = exposure.tls
    config = uvicorn.Config(
        create_app(
            service,
            metrics,
            exposure.tokens,
            max_request_bytes=settings.max_request_bytes,
            budget=budget,
            web_document_memory=settings.web_document_memory,
            hosts=exposure.hosts,
        ),
        log_config=None,  # logging is the process's (``onnxserve.server.logs`` for ``onnxserve serve``)
        loop="none",  # the loop is ours: uvloop, shared with gRPC
        # httptools + our limits; TLS is ours too (after the connection is admitted), not the listener's
        http=guarded_http_protocol(ConnectionLimits.from_settings(settings), None if tls is None else tls.context),  # type: ignore[arg-type]
        ws="none",  # no WebSocket routes; upgrades are refused by the protocol (``connections``)
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),
        # Forwarded headers are believed only from the peers named (uvicorn's default trusts 127.0.0.1,
        # which lets any local process pose as any number of clients in the fair queue).
        proxy_headers=bool(settings.forwarded_allow_ips.strip()),
        forwarded_allow_ips=settings.forwarded_allow_ips.strip() or None,
        lifespan="off",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout)),
    )
    return _DrainingServer(config, service, settings.drain_timeout)


class _SighupReloads:
    """SIGHUP's reloads of the catalog, one at a time: signals that come while one runs make one more reload
    after it (which reads the config as it is then), not one task each kept for good (outside attack rt25 F5)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def signalled(self) -> None:
        if self.task is not None and not self.task.done():
            self.again = True
            return
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.again = False
            try:
                await self.manager.reload()
            except Exception:  # the next SIGHUP tries again
                log.exception("SIGHUP: the reload failed")
            if not self.again:
                return

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def _serve(
    service: InferenceService,
    settings: ServerSettings,
    http: _DrainingServer,
    http_socket: socket.socket,
    on_started: Callable[[int, int], None],
    metrics: Metrics,
    exposure: Exposure,
    budget: InflightBytes,
) -> None:
    http.loop = asyncio.get_running_loop()
    exposure.warn_if_exposed(http_socket.getsockname()[0])
    grpc_server = create_grpc_server(service, settings, exposure=exposure, budget=budget)
    grpc_port = grpc_server.port
    await grpc_server.start()
    background: list[asyncio.Task[None]] = []
    manager = service.manager
    if manager is not None and manager.mode is ControlMode.POLL:
        background.append(
            asyncio.create_task(
                manager.poll(settings.repository_poll_secs, lambda: http.should_exit or service.draining)
            )
        )
    reloads = _SighupReloads(manager) if manager is not None else None
    if reloads is not None and threading.current_thread() is threading.main_thread():
        http.loop.add_signal_handler(signal.SIGHUP, reloads.signalled)
    try:
        task = asyncio.create_task(http.serve(sockets=[http_socket]))
        while not http.started and not task.done():
            await asyncio.sleep(0.01)
        if not task.done():
            on_started(http_socket.getsockname()[1], grpc_port)
        await task
    finally:
        for job in background:
            job.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if reloads is not None:
            await reloads.stop()
        await grpc_server.stop(http.grpc_grace())
        offload.shutdown()  # the JSON decoding workers, if a large body ever started them
        if manager is not None:
            await manager.close()
        await service.registry.stop()


def _new_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


def serve(config: ServerConfig, settings: ServerSettings, catalog: Catalog | None = None) -> None:
    """Load the models, then serve HTTP and gRPC until SIGINT or SIGTERM (see the module docstring)."""
    limit_malloc_arenas()  # before any thread pool starts: each thread's arena reserves address space
    fix_mmap_threshold()  # large blocks mapped and returned, not left fragmenting the heaps (core.memory)
    exposure = Exposure.from_settings(settings)  # before loading models: a bad token or TLS file fails fast
    service, metrics = _metered_service(config, settings, catalog)
    http_socket = bind(settings.host, settings.http_port)
    # Request and answer bytes in flight, HTTP and gRPC together; answers leave room for one gRPC message.
    budget = InflightBytes(settings.max_inflight_bytes, settings.grpc_max_message_bytes)
    http = _uvicorn_server(service, settings, metrics, exposure, budget)

    def announce(http_port: int, grpc_port: int) -> None:
        for model in service.registry:
            log.info("serving model %s versions %s", model.name, ", ".join(map(str, model.version_numbers())))
        log.info("HTTP (KServe V2 REST, TF Serving REST) on %s://%s:%d", exposure.scheme, settings.host, http_port)
        log.info("gRPC (KServe V2) on %s:%d", settings.host, grpc_port)
        log.info("access: %s", exposure.describe())

    # uvicorn re-raises the signal it stopped for through the handler that was in place before it
    # started; a no-op handler there makes a drained shutdown exit with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    loop = _new_loop()
    try:
        loop.run_until_complete(_serve(service, settings, http, http_socket, announce, metrics, exposure, budget))
    finally:
        loop.close()
        service.close()


def end_process(status: int = 0) -> NoReturn:
    """End the process once the server has drained and stopped: logs flushed, then ``os._exit``.

    The interpreter's own finalization can take long after a served process: its final garbage
    collection of a large heap took up to 21 s once the answers were out, and it joins the default
    executor's threads, which a run stuck in ONNX Runtime never leaves. Nothing is left to finish by
    then (the decoding workers are stopped, the listeners closed)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


@dataclass
class RunningServer:
    """A server running on a background thread (for tests and embedding)."""

    service: InferenceService
    host: str
    http_port: int
    grpc_port: int
    _server: _DrainingServer
    _thread: threading.Thread
    scheme: str = "http"  # "https" with TLS

    @property
    def http_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self.service.close()

    def drain(self) -> None:
        """What SIGTERM does to a server in its own process: drain, then stop (returns at once)."""
        self._server.handle_exit(signal.SIGTERM, None)


def start_in_background(
    config: ServerConfig, settings: ServerSettings, catalog: Catalog | None = None
) -> RunningServer:
    """Load the models and serve on a background thread; returns once both listeners accept requests."""
    exposure = Exposure.from_settings(settings)
    service, metrics = _metered_service(config, settings, catalog)
    sock = bind(settings.host, settings.http_port)
    budget = InflightBytes(settings.max_inflight_bytes, settings.grpc_max_message_bytes)
    http = _uvicorn_server(service, settings, metrics, exposure, budget)
    started = threading.Event()
    ports: list[int] = []
    failure: list[BaseException] = []

    def on_started(http_port: int, grpc_port: int) -> None:
        ports.extend((http_port, grpc_port))
        started.set()

    def run() -> None:
        loop = _new_loop()
        try:
            loop.run_until_complete(_serve(service, settings, http, sock, on_started, metrics, exposure, budget))
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
    return RunningServer(service, settings.host, ports[0], ports[1], http, thread, exposure.scheme)
