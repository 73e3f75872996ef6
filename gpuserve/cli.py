"""The `gpuserve` command: `serve` and `probe`. Builds the settings once and passes them down."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError

from gpuserve import __version__
from gpuserve.config import Settings
from gpuserve.errors import DeviceError

logger = logging.getLogger("gpuserve")

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; exits 2 on a bad setting or an unusable device."""
    args = _parser().parse_args(argv)
    try:
        settings = Settings(**_flags(args))
    except ValidationError as exc:
        sys.exit(f"gpuserve: invalid settings:\n{exc}")
    except ValueError as exc:  # the config file is missing or not TOML
        sys.exit(f"gpuserve: {exc}")
    _configure_logging(settings.log_level)
    if args.command == "probe":
        _probe(settings)
    else:
        _serve(settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpuserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    # Defaults are None so an absent flag leaves the file and environment in charge.
    common.add_argument("--config", dest="config_file", type=Path, help="TOML settings file")
    common.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    common.add_argument("--log-level", dest="log_level", help="debug, info, warning, error")
    serve = commands.add_parser("serve", parents=[common], help="serve the configured model")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    commands.add_parser("probe", parents=[common], help="print what the device probe finds")
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "command" and v is not None}


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _probe(settings: Settings) -> None:
    from gpuserve.device import probe

    try:
        info = probe(settings.device)
    except DeviceError as exc:
        print(json.dumps({"device": settings.device, "error": exc.message}, indent=2))
        sys.exit(2)
    print(json.dumps(info.to_dict(), indent=2))


def _drained(signum: int, frame: FrameType | None) -> None:
    logger.info("stopped on signal %d after draining", signum)


def _serve(settings: Settings) -> None:
    from gpuserve.app import create_app
    from gpuserve.device import probe

    try:
        # Fail fast on a device that cannot be had; the load thread reuses this cached answer.
        probe(settings.device)
    except DeviceError as exc:
        sys.exit(f"gpuserve: {exc.message}")
    _warn_if_exposed(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # uvicorn would otherwise replace our logging set-up with its own.
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        timeout_keep_alive=int(settings.keep_alive_s),
    )
    # uvicorn re-raises SIGTERM at the end of its graceful shutdown, under the handler that was
    # in place before it started. By then every accepted request has been answered, so a drained
    # SIGTERM should end the process with status 0, as Kubernetes and `docker stop` expect.
    signal.signal(signal.SIGTERM, _drained)
    _DrainingServer(config, app.state.models.begin_shutdown).run()


def _warn_if_exposed(settings: Settings) -> None:
    if settings.host not in _LOOPBACK and not settings.api_keys:
        logger.warning(
            "listening on %s without API keys: anyone who can reach it can use the model "
            "(set api_keys or GPUSERVE_API_KEYS)",
            settings.host,
        )


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server, plus: readiness turns 503 the moment a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)
