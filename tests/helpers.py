"""Helpers the test modules share: servers in-process and on a real socket, and their clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import grpc
import httpx
import numpy as np
import torch
import tritonclient.grpc.aio as triton
from fastapi import FastAPI
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gpuserve.config import ModelSettings, Settings
from gpuserve.grpc.server import GrpcServer
from gpuserve.http import create_app
from gpuserve.model.device import DeviceInfo
from gpuserve.spec import ModelSpec, TensorSpec

ROOT = Path(__file__).resolve().parent.parent
# A model file for settings whose model is handed over directly (fakes): never opened.
DEMO = ROOT / "models" / "digits.pt2"


CPU = DeviceInfo(device="cpu", kind="cpu", name="test cpu", reason="test")


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
    with GPUSERVE_PORT=0), and `cwd` the repository root. Given neither a model nor a config
    file, it serves the demo model (through GPUSERVE_MODEL__PATH, which `env` may replace).
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

    def _demo_model(self) -> dict[str, str]:
        named = self.command is not None or any(
            arg == "--config" or arg.endswith((".pt2", ".pt", ".ts")) for arg in self.args
        )
        return {} if named else {"GPUSERVE_MODEL__PATH": str(DEMO)}

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
                **self._demo_model(),
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
            found = re.search(r"serving (http://[^\s,]+)", line)
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


SETTINGS = Settings(
    device="cpu", model=ModelSettings(path=DEMO, max_instances_per_request=8, freeze_gc=False)
)


@asynccontextmanager
async def serving(app: FastAPI, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gpuserve") as client:
            if wait_ready:
                await wait_for_status(client, "ready")
            yield client


async def wait_for_status(client: httpx.AsyncClient, status: str) -> dict[str, Any]:
    with anyio.fail_after(10):
        while True:
            body: dict[str, Any] = (await client.get("/health/ready")).json()
            if body["status"] == status:
                return body
            await asyncio.sleep(0.01)


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became ready")


def send_all(url: str, bodies: list[bytes]) -> list[http.client.HTTPConnection]:
    """Each body on its own connection, all sent before any answer is read.

    A Python client that sends and awaits in turn is slower than this server, so its requests
    may never overlap; this way they reach the server together, as many clients' would.
    """
    address = urlsplit(url)
    connections = [
        http.client.HTTPConnection(address.hostname or "", address.port, timeout=60) for _ in bodies
    ]
    for connection in connections:
        connection.connect()
    for connection, body in zip(connections, bodies, strict=True):
        connection.request("POST", "/predict", body, {"content-type": "application/json"})
    return connections


def read_all(connections: list[http.client.HTTPConnection]) -> list[tuple[int, dict[str, Any]]]:
    answers = []
    for connection in connections:
        response = connection.getresponse()
        answers.append((response.status, json.loads(response.read())))
        connection.close()
    return answers


def metric(url: str, name: str) -> float:
    """One sample from /metrics, by its full name with labels; 0 if absent."""
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port() -> int:
    """A loopback port free now, for a server that must be told its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def predicts_answered(url: str) -> float:
    """/predict requests answered so far, whatever their status."""
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gpuserve_requests_total{") and 'route="/predict"' in line
    )


ONE = json.dumps({"inputs": [1.0] * 64}).encode()


SLOW_ENV = {"OMP_NUM_THREADS": "1", "GPUSERVE_MODEL__MAX_WAIT_MS": "1"}


def slow_server(model: Path, **settings: str) -> ServerProcess:
    env = {**SLOW_ENV, "GPUSERVE_MODEL__PATH": str(model)}
    env.update({f"GPUSERVE_{key.upper()}": value for key, value in settings.items()})
    return ServerProcess("--device", "cpu", env=env)


def sigterm_with_requests_in_flight(server: ServerProcess, count: int) -> None:
    """Send `count` requests, wait until the server holds them all, SIGTERM it, and check
    every one is answered 200."""
    wait_ready(server.url)
    answered = predicts_answered(server.url)
    connections = send_all(server.url, [ONE] * count)
    deadline = time.monotonic() + 30
    # All arrived: in flight (less the metrics request itself), or answered already (on a
    # busy machine the first batches may finish before the last request is read).
    while (
        metric(server.url, "gpuserve_requests_in_flight")
        - 1
        + predicts_answered(server.url)
        - answered
        < count
    ):
        assert time.monotonic() < deadline, "the requests never all arrived"
        time.sleep(0.01)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    answers = read_all(connections)
    refused = [(status, body) for status, body in answers if status != 200]
    assert not refused and len(answers) == count, (len(answers), refused[:5], server.log[-20:])


FAULTY_CONFIG = """
device = "cpu"
shutdown_timeout_s = {shutdown}
header_timeout_s = {header}
max_connections = {connections}
[model]
name = "faulty"
factory = "faulty_model:build"
code_dir = "{code_dir}"
max_batch_size = 8
tune_batch_size = false
forward_timeout_s = 60
freeze_gc = false
spec = {{ input = {{ name = "x", shape = [4] }}, output = {{ name = "y", shape = [1] }} }}
"""


def faulty_server(
    tmp_path: Path, shutdown: float = 30, header: float = 10, connections: int = 2048
) -> ServerProcess:
    config = tmp_path / "faulty.toml"
    code_dir = Path(__file__).parent / "models"
    config.write_text(
        FAULTY_CONFIG.format(
            shutdown=shutdown, header=header, connections=connections, code_dir=code_dir
        )
    )
    return ServerProcess("--config", str(config))


def raw_connection(url: str) -> socket.socket:
    address = urlsplit(url)
    return socket.create_connection((address.hostname or "", address.port or 0), timeout=30)


def trickle(sock: socket.socket, chunk: bytes, every_s: float, limit_s: float) -> bytes:
    """Send `chunk` every `every_s` until the server answers or `limit_s` passes.

    Returns the first bytes of the answer, or b"" when none came (or the server hung up).
    """
    sock.settimeout(every_s)
    until = time.monotonic() + limit_s
    while time.monotonic() < until:
        try:
            sock.sendall(chunk)
            answer = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return b""
        if answer:
            return answer
    return b""


KEY = "grpc-test-key-0123456789"


FAKE = ModelSettings(path=DEMO, name="fake", freeze_gc=False)


@dataclass
class Both:
    """One server, reached over HTTP (in-process) and over gRPC (a real socket)."""

    http: httpx.AsyncClient
    grpc: triton.InferenceServerClient
    stub: pb_grpc.GRPCInferenceServiceStub
    url: str


@asynccontextmanager
async def both(settings: Settings, **app_args: Any) -> AsyncIterator[Both]:
    app = create_app(settings, **app_args)
    async with serving(app) as http:
        server = GrpcServer(settings, app.state.models, app.state.metrics)
        port = await server.start("127.0.0.1", 0)
        url = f"127.0.0.1:{port}"
        client = triton.InferenceServerClient(url)
        channel = grpc.aio.insecure_channel(url)
        try:
            yield Both(http, client, pb_grpc.GRPCInferenceServiceStub(channel), url)
        finally:
            await client.close()
            await channel.close()
            await server.stop(1)
