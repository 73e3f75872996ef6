"""The `gpuserve` command: `serve` and `probe`. Builds the settings once and passes them down."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

from gpuserve.config import Settings, describe_error
from gpuserve.core.errors import DeviceError
from gpuserve.logs import configure as configure_logging
from gpuserve.model.device import DeviceInfo, GpuSample
from gpuserve.version import __version__

if TYPE_CHECKING:
    from gpuserve.core.metrics import Metrics
    from gpuserve.core.registry import ModelRegistry
    from gpuserve.core.service import Loader
    from gpuserve.grpc.server import GrpcServer
    from gpuserve.workers import Peers

logger = logging.getLogger("gpuserve")

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; exits 1 with a message on a bad setting or an unusable device."""
    args = _parser().parse_args(argv)
    if args.command == "init":
        _init(args.model_file, args.init_config)
        return
    if getattr(args, "model_path", None) and getattr(args, "model_file", None):
        sys.exit("gpuserve: give the model file once: as MODEL or as --model")
    flags = _flags(args)
    try:
        settings = Settings(**flags)
    except ValidationError as exc:
        sys.exit(f"gpuserve: invalid settings:\n{describe_error(exc, flags, os.environ)}")
    except ValueError as exc:  # the config file is missing or not TOML
        sys.exit(f"gpuserve: {exc}")
    if "model" in flags and settings.models:
        sys.exit(
            "gpuserve: a model file on the command line serves that one model, but the config "
            "file lists several ([[models]]); serve it without --config, or add it to the list"
        )
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "probe":
        _probe(settings, args.json)
    else:
        run(settings)


_EXAMPLES = """examples:
  gpuserve serve model.pt2                   serve a torch.export file (spec inferred if no .json)
  gpuserve serve --config configs/default.toml --port 9000
  gpuserve init model.pt2                    write gpuserve.toml (and model.json) to edit
  GPUSERVE_DEVICE=cpu gpuserve serve         environment variables: GPUSERVE_<SETTING>
  gpuserve probe --json                      which device would be used, and why
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuserve",
        description="Serve PyTorch models over HTTP with dynamic batching, on the best GPU "
        "or on the CPU.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gpuserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    # Defaults are None so an absent flag leaves the file and environment in charge.
    common.add_argument(
        "--config",
        dest="config_file",
        type=Path,
        metavar="FILE",
        help=_setting("config_file", "TOML settings file; its paths are relative to it"),
    )
    common.add_argument("--device", help=_setting("device", "auto, all, cpu, cuda or cuda:N"))
    common.add_argument(
        "--log-level", dest="log_level", help=_setting("log_level", "debug, info, warning, error")
    )
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve a model file, or the models of a config file",
        description="Serve a model file, or the models a config file lists. The settings come "
        "from the config file, then GPUSERVE_* environment variables, then these flags.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "model_file",
        nargs="?",
        type=Path,
        metavar="MODEL",
        help="a .pt2 or TorchScript file to serve (same as --model)",
    )
    serve.add_argument(
        "--model",
        dest="model_path",
        type=Path,
        metavar="PATH",
        help="the model file (replaces model.path; the config's other model settings apply). "
        "environment: GPUSERVE_MODEL__PATH",
    )
    serve.add_argument("--host", help=_setting("host", "address to listen on"))
    serve.add_argument("--port", type=int, help=_setting("port", "port to listen on"))
    serve.add_argument(
        "--grpc-port", dest="grpc_port", type=int, help=_setting("grpc_port", "gRPC port")
    )
    serve.add_argument(
        "--workers", help=_setting("workers", "server processes behind the port (N or auto)")
    )
    probe = commands.add_parser(
        "probe",
        parents=[common],
        help="print which device would be used and why, and every GPU NVML sees",
        description="Print which device gpuserve would use and why, then every GPU NVML sees.",
    )
    probe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    init = commands.add_parser(
        "init",
        help="write a starter config (and spec) for a model file",
        description="Write a starter config for MODEL, listing every model setting at its "
        "default, and MODEL's spec beside it when there is none (inferred from a .pt2 "
        "program; a template to fill in for TorchScript). Never overwrites a file.",
    )
    init.add_argument("model_file", type=Path, metavar="MODEL", help="a .pt2 or TorchScript file")
    init.add_argument(
        "--config",
        dest="init_config",
        type=Path,
        default=Path("gpuserve.toml"),
        metavar="FILE",
        help="the config file to write (default: gpuserve.toml)",
    )
    return parser


def _setting(name: str, text: str) -> str:
    """A flag's help: what it is, its default and its environment variable."""
    default = Settings.model_fields[name].default
    shown = "" if default is None else f"default: {default}; "
    return f"{text} ({shown}environment: GPUSERVE_{name.upper()})"


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "json", "model_file", "model_path", "init_config") and v is not None
    }
    model = getattr(args, "model_path", None) or getattr(args, "model_file", None)
    if model is not None:
        flags["model"] = {"path": model}
    return flags


def _init(model: Path, config: Path) -> None:
    from gpuserve.core.errors import ModelLoadError
    from gpuserve.model.starter import write_starter

    try:
        started = write_starter(model, config)
    except (FileExistsError, ModelLoadError) as exc:
        sys.exit(f"gpuserve: {exc}")
    print(f"wrote {config}" + (f" and {started.spec}" if started.spec else ""))
    for step in started.todo:
        print(f"  next: {step}")
    print(f"  then: gpuserve serve --config {config}")


def _probe(settings: Settings, as_json: bool) -> None:
    from gpuserve.model.device import GpuMonitor, probe

    try:
        info = probe(settings.device)
    except DeviceError as exc:
        if as_json:
            print(json.dumps({"device": settings.device, "error": exc.message}, indent=2))
        else:
            print(f"gpuserve: {exc.message}", file=sys.stderr)
        sys.exit(2)
    monitor = GpuMonitor()
    try:
        gpus = monitor.sample()
    finally:
        monitor.close()
    if as_json:
        body = {**info.to_dict(), "gpus": [asdict(gpu) for gpu in gpus]}
        if monitor.problem is not None:
            body["nvml"] = monitor.problem
        print(json.dumps(body, indent=2))
    else:
        print(probe_table(info, gpus, monitor.problem))


def probe_table(info: DeviceInfo, gpus: list[GpuSample], nvml_problem: str | None) -> str:
    """What the probe found, for a person: the choice and its reason, then every GPU seen."""
    memory = info.total_memory_bytes
    lines = [
        f"device   {info.device}  ({info.name})",
        f"reason   {info.reason}",
        f"torch    {info.torch_version}, CUDA {info.cuda_version or 'none'}",
    ]
    if memory is not None:
        free = "" if info.free_memory_bytes is None else f"{_gib(info.free_memory_bytes)} free of "
        lines.append(f"memory   {free}{_gib(memory)}")
    if not gpus:
        lines.append(f"GPUs     none seen by NVML{f' ({nvml_problem})' if nvml_problem else ''}")
        return "\n".join(lines)
    rows = [("GPU", "name", "memory used / total", "util", "temp", "power")]
    for gpu in gpus:
        used, total = gpu.memory_used_bytes, gpu.memory_total_bytes
        rows.append(
            (
                str(gpu.index),
                gpu.name,
                "-" if used is None or total is None else f"{_gib(used)} / {_gib(total)}",
                "-" if gpu.utilization is None else f"{gpu.utilization:.0%}",
                "-" if gpu.temperature_celsius is None else f"{gpu.temperature_celsius:.0f} C",
                "-" if gpu.power_watts is None else f"{gpu.power_watts:.0f} W",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


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
        serve_one(settings, loader)
        return
    from gpuserve.workers import supervise

    status = supervise(settings, count)
    if status:
        sys.exit(status)


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
        probe(settings.device)
    except DeviceError as exc:
        sys.exit(f"gpuserve: {exc.message}")
    from gpuserve.http.connections import connection_cap, guarded_protocol, raise_fd_limit

    max_connections = connection_cap(settings.max_connections, raise_fd_limit())
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
        http=guarded_protocol(settings.header_timeout_s, max_connections),
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
        config, app.state.models, settings, app.state.metrics, share_grpc_port=peers is not None
    )
    server.run(sockets)
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
        share_grpc_port: bool = False,
    ) -> None:
        super().__init__(config)
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
            settings, self._models, self._metrics, share_port=self._share_grpc_port
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
