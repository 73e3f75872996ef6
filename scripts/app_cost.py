"""CPU per `/predict` request through the whole ASGI app, in-process: no sockets, no HTTP
parsing, a trivial model. What is left is the app's own cost: routing, middleware, parsing,
checks, the batcher's futures, the response.

    python scripts/app_cost.py [--concurrency 32] [--rounds 200]

Prints CPU µs per request (process time, best of 5) through the fast lane, and with the lane
switched off, through FastAPI's routing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import uvloop

from gpuserve.app import create_app
from gpuserve.app.lane import GpuserveAPI
from gpuserve.config import ModelSettings, Settings
from gpuserve.device import DeviceInfo
from gpuserve.spec import ModelSpec, TensorSpec

SPEC = ModelSpec(
    name="sum",
    input=TensorSpec(name="x", shape=(4,), dtype="float32"),
    output=TensorSpec(name="y", shape=(1,), dtype="float32"),
)
BODY = b'{"inputs": [1, 2, 3, 4]}'
SCOPE: dict[str, Any] = {
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
        (b"content-length", str(len(BODY)).encode()),
    ],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


class SumModel:
    """The cheapest model there is, so that only the app's cost is measured."""

    spec = SPEC

    def __call__(self, instances: list[np.ndarray[Any, Any]]) -> list[float]:
        return [float(x.sum()) for x in instances]


def load(settings: ModelSettings, device: DeviceInfo) -> SumModel:
    return SumModel()


async def request(app: GpuserveAPI) -> None:
    sent = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Future()  # the client never hangs up
        raise AssertionError("unreachable")

    statuses = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(dict(SCOPE), receive, send)
    assert statuses == [200], statuses


async def measure(app: GpuserveAPI, concurrency: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*(request(app) for _ in range(concurrency)))
        best = min(best, (time.process_time() - started) / (rounds * concurrency))
    return best * 1e6


async def main(concurrency: int, rounds: int) -> None:
    settings = Settings(device="cpu")  # gc.freeze() after load, as served
    app = create_app(settings, loader=load)
    assert isinstance(app, GpuserveAPI)
    async with app.router.lifespan_context(app):
        while app.state.models.readiness()["status"] != "ready":
            await asyncio.sleep(0.01)
        lane = await measure(app, concurrency, rounds)
        app.lane, saved = None, app.lane
        routed = await measure(app, concurrency, rounds)
        app.lane = saved
    print(f"POST /predict, {concurrency} at a time, CPU µs per request (best of 5):")
    print(f"  through FastAPI's routing: {routed:6.1f}")
    print(f"  through the fast lane:     {lane:6.1f}  ({routed / lane:.1f}x less)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    uvloop.run(main(args.concurrency, args.rounds))
