"""CPU per `/predict` request through the whole ASGI app, in-process: no sockets, no HTTP
parsing, a trivial model. What is left is the app's own cost: routing, middleware, parsing,
checks, the batcher's futures, the response.

    python scripts/app_cost.py [--concurrency 32] [--rounds 200] [--values 4] [--traces]

Prints CPU µs per request (process time, best of 5) through the fast lane, and with the lane
switched off, through FastAPI's routing. `--values` sets the numbers in each body (the
benchmark's light model takes 256). `--traces` also measures the lane with OpenTelemetry
traces on (each request sending a W3C traceparent), its spans handed to the SDK's batch
processor and an in-memory exporter: every cost but the network's.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import uvloop

from gpuserve.config import ModelSettings, Settings
from gpuserve.http import create_app
from gpuserve.http.lane import GpuserveAPI
from gpuserve.http.responses import HangUp
from gpuserve.model.device import DeviceInfo
from gpuserve.spec import ModelSpec, TensorSpec


def workload(values: int) -> tuple[ModelSpec, bytes, dict[str, Any]]:
    """A spec of `values` float32 numbers, a body that fits it, and the body's ASGI scope."""
    spec = ModelSpec(
        name="sum",
        input=TensorSpec(name="x", shape=(values,), dtype="float32"),
        output=TensorSpec(name="y", shape=(1,), dtype="float32"),
    )
    numbers = np.random.default_rng(0).standard_normal(values).round(6).tolist()
    body = orjson.dumps({"inputs": numbers})
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"gpuserve"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    return spec, body, scope


class SumModel:
    """The cheapest model there is, so that only the app's cost is measured."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    def __call__(self, instances: list[np.ndarray[Any, Any]]) -> list[float]:
        return [float(x.sum()) for x in instances]


async def request(app: GpuserveAPI, body: bytes, scope: dict[str, Any]) -> None:
    sent = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # the client never hangs up
        raise AssertionError("unreachable")

    statuses = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    # As gpuserve's HTTP protocol serves it: told of a hang-up, with no task to watch for one.
    await app({**scope, "extensions": {HangUp.KEY: HangUp()}}, receive, send)
    assert statuses == [200], statuses


async def measure(
    app: GpuserveAPI, concurrency: int, rounds: int, body: bytes, scope: dict[str, Any]
) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*(request(app, body, scope) for _ in range(concurrency)))
        best = min(best, (time.process_time() - started) / (rounds * concurrency))
    return best * 1e6


async def main(concurrency: int, rounds: int, values: int, traces: bool) -> None:
    spec, body, scope = workload(values)

    def load(settings: ModelSettings, device: DeviceInfo) -> SumModel:
        return SumModel(spec)

    # The loader stands in for the file, which is never opened; gc.freeze() after load.
    settings = Settings(device="cpu", model=ModelSettings(path=Path("sum.pt2"), name="sum"))
    app = create_app(settings, loader=load)
    assert isinstance(app, GpuserveAPI)
    async with app.router.lifespan_context(app):
        await ready(app)
        lane = await measure(app, concurrency, rounds, body, scope)
        app.lane, saved = None, app.lane
        routed = await measure(app, concurrency, rounds, body, scope)
        app.lane = saved
    print(
        f"POST /predict of {values} numbers, {concurrency} at a time, "
        "CPU µs per request (best of 5):"
    )
    print(f"  through FastAPI's routing: {routed:6.1f}")
    print(f"  through the fast lane:     {lane:6.1f}  ({routed / lane:.1f}x less)")
    if traces:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        from gpuserve.core.tracing import Tracing

        exporter = InMemorySpanExporter()
        app = create_app(settings, loader=load, traces=Tracing(exporter))
        assert isinstance(app, GpuserveAPI)
        parent = (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        traced_scope = {**scope, "headers": [*scope["headers"], parent]}
        async with app.router.lifespan_context(app):
            await ready(app)
            traced = await measure(app, concurrency, rounds, body, traced_scope)
        spans = len(exporter.get_finished_spans())
        print(
            f"  the fast lane, traces on:  {traced:6.1f}  (+{traced - lane:.1f} µs; "
            f"{spans} spans exported)"
        )


async def ready(app: GpuserveAPI) -> None:
    while app.state.models.readiness()["status"] != "ready":
        await asyncio.sleep(0.01)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--values", type=int, default=4, help="numbers in each body")
    parser.add_argument("--traces", action="store_true", help="also with traces on")
    args = parser.parse_args()
    uvloop.run(main(args.concurrency, args.rounds, args.values, args.traces))
