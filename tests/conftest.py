"""Shared fixtures: the anyio backend, the demo model, and a small fake model for HTTP tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpuserve.config import ModelSettings
from gpuserve.model.device import DeviceInfo
from gpuserve.spec import ModelSpec, TensorSpec

from . import tiers

ROOT = Path(__file__).resolve().parent.parent

CPU = DeviceInfo(device="cpu", kind="cpu", name="test cpu", reason="test")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test gets its module's tier as a marker (`pytest -m unit`: the fast tier), unless
    it is marked integration itself."""
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(tiers.tier(item.module.__name__ if item.module else ""))


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A unit test that reaches for the network or a process fails, saying so."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    with tiers.guard(monkeypatch):
        yield


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo model file; `make test` builds it first, this builds it if run bare."""
    path = ROOT / "models" / "digits.pt2"
    if not path.exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_demo_model.py"),
                "--out",
                str(path.parent),
            ],
            check=True,
        )
    return path


class FakeModel:
    """Sums each instance times `scale`; records every batch it sees. No torch involved."""

    def __init__(self, spec: ModelSpec, scale: float = 1.0) -> None:
        self.spec = spec
        self.scale = scale
        self.batches: list[int] = []
        self.error: Exception | None = None
        self.delay_s = 0.0

    def __call__(self, instances: list[np.ndarray[Any, Any]]) -> list[Any]:
        self.batches.append(len(instances))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return [float(x.sum()) * self.scale for x in instances]


FAKE_SPEC = ModelSpec(
    name="fake",
    input=TensorSpec(name="x", shape=(4,), dtype="float32", min=-100, max=100),
    output=TensorSpec(name="y", shape=(1,), dtype="float32"),
)


@pytest.fixture
def fake_model() -> FakeModel:
    return FakeModel(FAKE_SPEC)


def predict_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a POST /predict with `headers`, for calling an app directly."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def fake_loader(model: FakeModel) -> Any:
    def load(settings: ModelSettings, device: DeviceInfo) -> FakeModel:
        return model

    return load


class ServerProcess:
    """`gpuserve serve` in a subprocess on a port the OS picks; stopped by its own PID.

    `command` replaces `gpuserve serve --port 0` (a script serving through the Python API,
    with GPUSERVE_PORT=0), and `cwd` the repository root.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.args = args
        self.env = env
        self.command = command
        self.cwd = cwd
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.log: list[str] = []
        self._bound = threading.Event()
        self._grpc_url = ""
        self._grpc_bound = threading.Event()

    def __enter__(self) -> ServerProcess:
        command = self.command or [sys.executable, "-m", "gpuserve", "serve", "--port", "0"]
        self.process = subprocess.Popen(
            [*command, *self.args],
            cwd=self.cwd or ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # gRPC on a port the OS picks too, so servers never contend for 8001.
            env={
                **os.environ,
                "PYTHONUNBUFFERED": "1",
                "GPUSERVE_GRPC_PORT": "0",
                **(self.env or {}),
            },
        )
        # A thread drains the output (so the server never blocks on a full pipe) and spots the
        # address uvicorn bound; the wait for it is bounded.
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        if not self._bound.wait(timeout=60):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        return self

    def _drain(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line)
            grpc = re.search(r"gRPC running on (\S+)", line)
            if grpc:
                self._grpc_url = grpc.group(1)
                self._grpc_bound.set()
            found = re.search(r"(?:Uvicorn running on|workers serving) (http://[^\s,]+)", line)
            if found:
                self.url = found.group(1)
                self._bound.set()

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint, which starts listening just after HTTP's."""
        if not self._grpc_bound.wait(timeout=30):
            raise RuntimeError("gRPC did not start:\n" + "".join(self.log))
        return self._grpc_url

    def stop(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._drainer.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SlowNet(torch.nn.Module):
    """Each batch costs a fixed chain of 1024x1024 matmuls, whatever its size (about 0.1-0.3 s
    on one core), so a test can hold the worker busy with real compute and no sleep."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rounds = rounds
        self.square = torch.nn.Parameter(torch.randn(1024, 1024) / 32)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.square
        for _ in range(self.rounds):
            m = torch.tanh(m @ self.square)
        return self.head(x) + m.mean() * 0


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "slow.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        SlowNet(rounds=5).eval(), (torch.zeros(2, 64),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    ModelSpec(
        name="slow",
        input=TensorSpec(shape=(64,), dtype="float32"),
        output=TensorSpec(shape=(10,), dtype="float32"),
    ).to_file(path.with_suffix(".json"))
    return path
