"""A real `gpuserve serve` process on a real port, with real concurrent clients."""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sklearn.datasets import load_digits

from .conftest import ServerProcess

pytestmark = pytest.mark.anyio


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


def batch_counts(metrics_text: str) -> tuple[float, float]:
    """(batches of size 1, all batches) from the gpuserve_batch_size histogram."""
    ones = re.search(r'gpuserve_batch_size_bucket\{le="1.0"\} (\S+)', metrics_text)
    total = re.search(r"gpuserve_batch_size_count (\S+)", metrics_text)
    assert ones and total
    return float(ones.group(1)), float(total.group(1))


def burst(url: str, images: list[list[float]]) -> list[dict[str, Any]]:
    """Each image on its own connection; every request is sent before any answer is read.

    A Python client that sends and awaits in turn is slower than this server, so its requests
    may never overlap; this way they reach the server together, as many clients' would.
    """
    address = urlsplit(url)
    connections = [
        http.client.HTTPConnection(address.hostname or "", address.port, timeout=30) for _ in images
    ]
    try:
        for connection in connections:
            connection.connect()
        for connection, image in zip(connections, images, strict=True):
            body = json.dumps({"inputs": image})
            connection.request("POST", "/predict", body, {"content-type": "application/json"})
        outputs = []
        for connection in connections:
            response = connection.getresponse()
            assert response.status == 200
            outputs.append(json.loads(response.read())["outputs"])
        return outputs
    finally:
        for connection in connections:
            connection.close()


async def test_64_concurrent_clients_get_their_own_answers_batched(demo_model: Path) -> None:
    digits = load_digits()
    images: list[list[float]] = digits.data[:64].tolist()
    args = ("--device", "cpu")
    env = {"GPUSERVE_MODEL__PATH": str(demo_model), "GPUSERVE_MODEL__MAX_WAIT_MS": "5"}
    with ServerProcess(*args, env=env) as server:
        wait_ready(server.url)
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            alone: list[dict[str, Any]] = []
            for image in images:
                response = await client.post("/predict", json={"inputs": image})
                assert response.status_code == 200
                alone.append(response.json()["outputs"])
            ones_before, total_before = batch_counts((await client.get("/metrics")).text)
            assert ones_before == total_before  # sequential requests never share a batch

            # Bounded retries: a burst on a loaded machine could, rarely, arrive one by one.
            for _ in range(5):
                together = burst(server.url, images)
                for out, solo in zip(together, alone, strict=True):
                    assert out["label"] == solo["label"]
                    assert out["probabilities"] == pytest.approx(solo["probabilities"], abs=1e-5)
                ones, total = batch_counts((await client.get("/metrics")).text)
                if total - ones > total_before - ones_before:
                    break
            else:
                pytest.fail("no batch larger than 1 in five bursts of 64 concurrent requests")

        accuracy = sum(
            out["label"] == str(target)
            for out, target in zip(alone, digits.target[:64], strict=True)
        ) / len(images)
        assert accuracy >= 0.9
        assert server.stop() == 0
