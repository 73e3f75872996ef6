"""The runtime: one server process's lifecycle, or the supervisor of several.

`run` serves until SIGTERM or SIGINT, then drains. One process runs uvicorn (HTTP) and the gRPC
endpoint on one event loop, beside the models the app's lifespan loads; with `workers` above
1 the supervisor (`gpuserve.workers`) runs `serve_worker` in each worker process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from gpuserve.config import Settings
from gpuserve.core.errors import DeviceError
from gpuserve.workers import Peers, listen, supervise

if TYPE_CHECKING:
    from gpuserve.core.calls import RequestPath
    from gpuserve.core.metrics import Metrics
    from gpuserve.core.registry import ModelRegistry
    from gpuserve.core.service import Loader
    from gpuserve.grpc.server import GrpcServer

logger = logging.getLogger("gpuserve")

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# How long past shutdown_timeout_s uvicorn waits for connections to close: the drain answers
# what is left at shutdown_timeout_s with 503, and those answers need a moment to be written.
_WRITE_MARGIN_S = 0.5


def _drained(signum: int, frame: FrameType | None) -> None:
    logger.info("stopped on signal %d after draining", signum)


def run(settings: Settings, loader: Loader | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain; exits 1 when every model failed to load.

    `loader` replaces how models are loaded (the Python API serves modules in memory so).
    With `workers` above 1, a parent process supervises that many worker processes.
    """
    count = settings.worker_count
    if count > 1 and loader is not None:
        sys.exit(
            "gpuserve: workers > 1 serves models from the settings only (each worker "
            "process loads its own copy); serve this one with workers = 1"
        )
    _warn_if_exposed(settings)
    if count == 1:
        if settings.engine:
            logger.info(
                "engine = true changes nothing with one worker: the model runs in this process"
            )
        serve_one(settings, loader)
        return
    status = supervise(settings, count, serve_worker)
    if status:
        sys.exit(status)


def serve_worker(
    settings: Settings, sockets: list[socket.socket], peers: Peers, wait_for_models: bool
) -> None:
    """One worker among several: the one-process server on the supervisor's socket."""
    serve_one(settings, sockets=sockets, peers=peers, wait_for_models=wait_for_models)


def serve_one(
    settings: Settings,
    loader: Loader | None = None,
    sockets: list[socket.socket] | None = None,
    peers: Peers | None = None,
    wait_for_models: bool = False,
) -> None:
    """One server process: on its own port, or (a worker) on `sockets` with `peers`; with
    `wait_for_models` it accepts connections only once its models have loaded."""
    from gpuserve.http import create_app
    from gpuserve.model.device import probe

    try:
        # Fail fast on a device that cannot be had; the load thread reuses this cached answer.
        # A worker in front of an engine uses no device: the engine probes, and only it
        # touches CUDA.
        if peers is None or peers.engine_address is None:
            probe(settings.device)
    except DeviceError as exc:
        sys.exit(f"gpuserve: {exc.message}")
    own_socket = sockets is None
    if sockets is None:
        # Bound before the model starts loading: a port in use stops the server at once, with
        # status 1 as every other start-up failure, not after a load it cannot serve.
        sockets = [listen(settings.host, settings.port)]
        host, port = sockets[0].getsockname()[:2]
        logger.info("serving http://%s:%d", f"[{host}]" if ":" in host else host, port)
    from gpuserve.http.connections import (
        HeadLimits,
        connection_cap,
        guarded_protocol,
        raise_fd_limit,
    )

    listeners = 2 if settings.grpc else 1
    max_connections = connection_cap(settings.max_connections, raise_fd_limit(), listeners)
    no_model: list[bool] = []

    def stop_without_models() -> None:
        no_model.append(True)
        server.stop()

    app = create_app(
        settings,
        loader=loader,
        on_no_model=stop_without_models,
        peers=peers,
        wait_for_models=wait_for_models,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # uvicorn would otherwise replace our logging set-up with its own.
        log_config=None,
        http=guarded_protocol(
            settings.header_timeout_s,
            max_connections,
            HeadLimits(
                settings.max_header_bytes,
                settings.max_headers,
                settings.max_url_bytes,
                settings.body_timeout_s,
            ),
        ),
        # Floats, though typed int: uvicorn passes both to asyncio, and int(0.9) would be 0.
        timeout_graceful_shutdown=settings.shutdown_timeout_s + _WRITE_MARGIN_S,  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
    )
    # uvicorn re-raises the stop signal at the end of its graceful shutdown, under the handler
    # that was in place before it started. By then every accepted request has been answered,
    # so a drained SIGTERM or SIGINT ends the process with status 0, as Kubernetes and
    # `docker stop` expect, rather than 143, or 130 with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGTERM, _drained)
    signal.signal(signal.SIGINT, _drained)
    server = _DrainingServer(
        config,
        app.state.models,
        settings,
        app.state.metrics,
        app.state.path,
        share_grpc_port=peers is not None,
        max_connections=max_connections,
    )
    try:
        server.run(sockets)
    finally:
        if own_socket:
            sockets[0].close()
    if no_model or server.failed:
        sys.exit(1)


def _warn_if_exposed(settings: Settings) -> None:
    if settings.host not in _LOOPBACK and not settings.api_keys:
        logger.warning(
            "listening on %s without API keys: anyone who can reach it can use the model "
            "(set api_keys or GPUSERVE_API_KEYS)",
            settings.host,
        )


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server, with gpuserve's stop: the first SIGTERM or SIGINT turns readiness
    503 and starts the models' drain at once, bounded by `drain_s`; a second one answers
    every request still waiting with 503, so the process goes at once, still having
    answered everyone."""

    def __init__(
        self,
        config: uvicorn.Config,
        models: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
        path: RequestPath,
        share_grpc_port: bool = False,
        max_connections: int | None = None,
    ) -> None:
        super().__init__(config)
        self._max_connections = max_connections
        self._path = path
        self._share_grpc_port = share_grpc_port
        self._models = models
        self._settings = settings
        self._metrics = metrics
        self._drain_s = settings.shutdown_timeout_s
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc: GrpcServer | None = None
        self.failed = False  # a listener could not start

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start, then gRPC's listener on the same loop, once HTTP's is bound."""
        await super().startup(sockets)
        settings = self._settings
        if not self.started or not settings.grpc:
            return
        from gpuserve.grpc.server import GrpcServer

        grpc_server = GrpcServer(
            settings,
            self._models,
            self._metrics,
            path=self._path,
            share_port=self._share_grpc_port,
            max_connections=self._max_connections,
        )
        try:
            port = await grpc_server.start(settings.host, settings.grpc_port)
        except OSError as exc:
            logger.error("%s (set grpc_port, or grpc = false to serve HTTP only)", exc)
            self.failed = True
            self.should_exit = True
            return
        self._grpc = grpc_server
        logger.info("gRPC running on %s:%d", settings.host, port)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """gRPC and HTTP drain side by side: neither takes new calls, and the calls each
        accepted are answered as the models drain (in uvicorn's shutdown, by the lifespan)."""
        grpc_stop = None
        if self._grpc is not None:
            grpc_stop = asyncio.ensure_future(self._grpc.stop(self._drain_s + _WRITE_MARGIN_S))
        try:
            await super().shutdown(sockets)
        finally:
            if grpc_stop is not None:
                await grpc_stop

    def stop(self) -> None:
        """Stop as on a signal, from the event loop (every model failed to load)."""
        self._models.begin_shutdown()
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler may run in the middle of the event loop's own code: only flags are
        # set here, and the work is handed to the loop the thread-safe way.
        self._signals += 1
        loop = self._loop
        if self._signals == 1:
            logger.info("signal %d: draining for up to %gs", sig, self._drain_s)
            if loop is not None:
                loop.call_soon_threadsafe(self._models.begin_shutdown, self._drain_s)
            else:  # not serving yet: the lifespan's stop drains
                self._models.begin_shutdown()
            super().handle_exit(sig, frame)
        elif self._signals == 2:
            logger.warning("signal %d again: answering what is left with 503 and stopping", sig)
            if loop is not None:
                loop.call_soon_threadsafe(self._models.abort)
