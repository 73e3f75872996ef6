"""A real `gpuserve serve` process on a real port, with real concurrent clients."""

from __future__ import annotations

import http.client
import json
import re
import signal
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
    ones = re.search(r'gpuserve_batch_size_bucket\{le="1.0"[^}]*\} (\S+)', metrics_text)
    total = re.search(r"gpuserve_batch_size_count(?:\{[^}]*\})? (\S+)", metrics_text)
    assert ones and total
    return float(ones.group(1)), float(total.group(1))


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


def burst(url: str, images: list[list[float]]) -> list[dict[str, Any]]:
    bodies = [json.dumps({"inputs": image}).encode() for image in images]
    answers = read_all(send_all(url, bodies))
    assert [status for status, _ in answers] == [200] * len(images)
    return [body["outputs"] for _, body in answers]


def metric(url: str, name: str) -> float:
    """One sample from /metrics, by its full name with labels; 0 if absent."""
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


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


ONE = json.dumps({"inputs": [1.0] * 64}).encode()
SLOW_ENV = {"OMP_NUM_THREADS": "1", "GPUSERVE_MODEL__MAX_WAIT_MS": "1"}


def slow_server(model: Path, **settings: str) -> ServerProcess:
    env = {**SLOW_ENV, "GPUSERVE_MODEL__PATH": str(model)}
    env.update({f"GPUSERVE_{key.upper()}": value for key, value in settings.items()})
    return ServerProcess("--device", "cpu", env=env)


def test_a_flood_of_10x_the_queue_gets_200_or_503_and_the_server_stays_healthy(
    slow_model: Path,
) -> None:
    with slow_server(slow_model, model__max_queue_size="8", model__max_batch_size="4") as server:
        wait_ready(server.url)
        answers = read_all(send_all(server.url, [ONE] * 80))
        codes = [status for status, _ in answers]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(200) >= 8 and codes.count(503) >= 1
        for status, body in answers:
            if status == 503:
                assert "queue is full" in body["error"]
        assert metric(server.url, 'gpuserve_refused_total{model="slow"}') == codes.count(503)
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        good = httpx.post(f"{server.url}/predict", content=ONE, timeout=30)
        assert good.status_code == 200
        assert server.stop() == 0


def test_sigterm_answers_every_request_in_flight_then_exits_0(slow_model: Path) -> None:
    with slow_server(slow_model, model__max_batch_size="16") as server:
        wait_ready(server.url)
        connections = send_all(server.url, [ONE] * 100)
        deadline = time.monotonic() + 30
        # The metrics request itself is in flight too, hence 101.
        while metric(server.url, "gpuserve_requests_in_flight") < 101:
            assert time.monotonic() < deadline, "the requests never all arrived"
            time.sleep(0.01)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        answers = read_all(connections)
        assert [status for status, _ in answers] == [200] * 100
        assert server.process.wait(timeout=30) == 0
        assert any("stopped on signal" in line or "Shutting down" in line for line in server.log)


def test_a_client_that_hangs_up_while_queued_costs_no_forward_pass(slow_model: Path) -> None:
    with slow_server(slow_model) as server:
        wait_ready(server.url)
        (busy,) = send_all(server.url, [ONE])  # holds the worker for a whole slow batch
        while metric(server.url, "gpuserve_requests_in_flight") < 2:
            time.sleep(0.005)
        quitters = send_all(server.url, [ONE] * 5)
        for connection in quitters:
            connection.close()
        assert read_all([busy])[0][0] == 200
        assert httpx.post(f"{server.url}/predict", content=ONE, timeout=30).status_code == 200
        deadline = time.monotonic() + 10
        while (
            metric(server.url, 'gpuserve_requests_total{code="499",model="slow",route="/predict"}')
            < 5
        ):
            assert time.monotonic() < deadline, "the hang-ups were never noticed"
            time.sleep(0.01)
        # Only the two requests whose clients stayed reached the model.
        assert metric(server.url, 'gpuserve_batch_size_sum{model="slow"}') == 2
