"""The test tiers. `unit`: no sockets on the network, no processes; `integration`: real
sockets, processes and clients; `gpu`: needs a CUDA GPU (skipped without one). A module's
tier is listed here; a unit test that binds or
connects a network socket, or starts a process, fails with the reason (see `guard`)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from typing import Any

import pytest

# Modules whose tests start servers, processes or real clients on loopback.
INTEGRATION = frozenset(
    {
        "test_ab",
        "test_api",
        "test_chaos",
        "test_cli",
        "test_config",
        "test_connections",
        "test_decoding",
        "test_dockerfile",
        "test_examples",
        "test_fuzz",
        "test_gpu_check",
        "test_grpc_health",
        "test_grpc_limits",
        "test_handler",
        "test_k8s",
        "test_kserve_runtime",
        "test_logs",
        "test_perf_analyzer",
        "test_protocols",
        "test_quickstart",
        "test_ray_serve",
        "test_repository",
        "test_socket",
        "test_spec",
        "test_stage_timers",
        "test_tensors",
        "test_v1",
        "test_v2",
        "test_v2_grpc",
        "test_workers",
    }
)
# Modules that need a CUDA GPU: they skip where there is none.
GPU = frozenset({"test_gpu"})
_NETWORK = (socket.AF_INET, socket.AF_INET6)


def tier(module: str) -> str:
    """A test module's tier, by its name (`tests.test_app` or `test_app`)."""
    name = module.rsplit(".", 1)[-1]
    if name in GPU:
        return "gpu"
    return "integration" if name in INTEGRATION else "unit"


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"a unit test {what}: mark its module integration (tests/tiers.py)")

    return refused


@contextmanager
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within it, binding or connecting a network socket or starting a process fails.
    Unix sockets stay open: the event loop wakes itself through a socket pair."""
    original_bind, original_connect = socket.socket.bind, socket.socket.connect

    def bind(self: socket.socket, address: Any) -> None:
        if self.family in _NETWORK:
            _refuse("bound a network socket")()
        original_bind(self, address)

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in _NETWORK:
            _refuse("connected a network socket")()
        original_connect(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("started a process"))
    monkeypatch.setattr(BaseProcess, "start", _refuse("started a process"))
    yield
