"""A real `gpuserve serve` process on a real port, with real concurrent clients."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sklearn.datasets import load_digits

from .helpers import (
    ONE,
    ServerProcess,
    faulty_server,
    metric,
    raw_connection,
    read_all,
    send_all,
    sigterm_with_requests_in_flight,
    slow_server,
    trickle,
    wait_ready,
)

pytestmark = pytest.mark.anyio


def batch_counts(metrics_text: str) -> tuple[float, float]:
    """(batches of size 1, all batches) from the gpuserve_batch_size histogram."""
    ones = re.search(r'gpuserve_batch_size_bucket\{le="1.0"[^}]*\} (\S+)', metrics_text)
    total = re.search(r"gpuserve_batch_size_count(?:\{[^}]*\})? (\S+)", metrics_text)
    assert ones and total
    return float(ones.group(1)), float(total.group(1))


def burst(url: str, images: list[list[float]]) -> list[dict[str, Any]]:
    bodies = [json.dumps({"inputs": image}).encode() for image in images]
    answers = read_all(send_all(url, bodies))
    assert [status for status, _ in answers] == [200] * len(images)
    return [body["outputs"] for _, body in answers]


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
        assert metric(
            server.url, 'gpuserve_refused_total{model="slow",version="1"}'
        ) == codes.count(503)
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        good = httpx.post(f"{server.url}/predict", content=ONE, timeout=30)
        assert good.status_code == 200
        assert server.stop() == 0


def test_sigterm_answers_every_request_in_flight_then_exits_0(slow_model: Path) -> None:
    with slow_server(slow_model, model__max_batch_size="16") as server:
        sigterm_with_requests_in_flight(server, 100)
        assert server.process is not None and server.process.wait(timeout=30) == 0
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
            metric(
                server.url,
                'gpuserve_requests_total{code="499",model="slow",protocol="http",route="/predict",version="1"}',
            )
            < 5
        ):
            assert time.monotonic() < deadline, "the hang-ups were never noticed"
            time.sleep(0.01)
        # Only the two requests whose clients stayed reached the model.
        assert metric(server.url, 'gpuserve_batch_size_sum{model="slow",version="1"}') == 2


HANG = json.dumps({"inputs": [21, 0, 0, 0]}).encode()


def small(value: float) -> bytes:
    return json.dumps({"inputs": [value, 0, 0, 0]}).encode()


def wait_in_flight(url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    # The metrics request itself is in flight too.
    while metric(url, "gpuserve_requests_in_flight") < count + 1:
        assert time.monotonic() < deadline, "the requests never all arrived"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("stop", "shutdown"), [(signal.SIGTERM, 2.0), (signal.SIGINT, 0.9)], ids=["term", "int"]
)
def test_a_stuck_forward_pass_cannot_hold_the_stop_past_its_timeout(
    tmp_path: Path, stop: signal.Signals, shutdown: float
) -> None:
    with faulty_server(tmp_path, shutdown=shutdown) as server:
        wait_ready(server.url)
        # One pass that never returns (the model hangs on 21), and requests queued behind it.
        connections = send_all(server.url, [HANG, *(small(i) for i in range(1, 6))])
        wait_in_flight(server.url, 6)
        assert server.process is not None
        started = time.monotonic()
        server.process.send_signal(stop)
        answers = read_all(connections)
        code = server.process.wait(timeout=60)
        took = time.monotonic() - started
    assert [status for status, _ in answers] == [503] * 6
    assert all("stopped before" in body["error"] and body["request_id"] for _, body in answers)
    assert code == 0
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in server.log)
    # The hung pass would hold the process for 600 s; the stop is bounded by the setting (a
    # fractional one is not truncated to 0), plus the moment it takes to write the answers.
    assert took < shutdown + 5


def test_a_second_signal_answers_everyone_at_once_and_exits_0(tmp_path: Path) -> None:
    with faulty_server(tmp_path, shutdown=60) as server:
        wait_ready(server.url)
        connections = send_all(server.url, [HANG, *(small(i) for i in range(1, 4))])
        wait_in_flight(server.url, 4)
        assert server.process is not None
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.process.poll() is None  # the first signal drains: it waits
        server.process.send_signal(signal.SIGTERM)
        answers = read_all(connections)
        code = server.process.wait(timeout=60)
        took = time.monotonic() - started
    assert [status for status, _ in answers] == [503] * 4
    assert code == 0
    assert took < 30  # well inside the 60 s drain the first signal allowed


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closes the socket (reads end) before our 30 s timeout."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_silent_and_slow_header_connections_are_closed(tmp_path: Path) -> None:
    with faulty_server(tmp_path, header=0.5) as server:
        wait_ready(server.url)
        with raw_connection(server.url) as silent, raw_connection(server.url) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            # A kept-alive connection idle after its answer is the keep-alive timeout's.
            with httpx.Client(base_url=server.url) as client:
                assert client.post("/predict", content=small(1)).status_code == 200
                assert closed_by_server(silent) and closed_by_server(slow)
                assert client.post("/predict", content=small(2)).status_code == 200
                assert client.get("/health/ready").status_code == 200


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and body may come in separate reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return data


def test_a_kept_alive_connection_stalling_in_its_next_headers_is_closed(tmp_path: Path) -> None:
    """The header deadline holds for the second request of a connection too, though a
    request that arrives whole is no longer timed."""
    with faulty_server(tmp_path, header=0.5) as server:
        wait_ready(server.url)
        body = small(1)
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with raw_connection(server.url) as sock:
            for _ in range(3):  # whole requests, answered on the one connection
                sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                assert read_response(sock).startswith(b"HTTP/1.1 200")
            sock.sendall(head)  # the next request's headers, never finished
            started = time.monotonic()
            assert closed_by_server(sock)
            assert time.monotonic() - started < 10  # the header deadline, not keep-alive's 75 s


def test_connections_past_the_cap_get_a_503_and_are_closed(tmp_path: Path) -> None:
    with faulty_server(tmp_path, connections=4) as server:
        wait_ready(server.url)
        held = [raw_connection(server.url) for _ in range(4)]
        time.sleep(0.2)
        answer = b""
        with raw_connection(server.url) as refused:
            while chunk := refused.recv(4096):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in head.lower()
        assert "too many open connections" in json.loads(body)["error"]
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert httpx.post(f"{server.url}/predict", content=small(1)).status_code == 200
        assert server.process is not None
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        soft, hard = re.search(r"Max open files\s+(\S+)\s+(\S+)", limits).groups()  # type: ignore[union-attr]
        assert soft == hard


def test_a_server_whose_every_model_failed_exits_1_unless_told_to_stay(tmp_path: Path) -> None:
    missing = {"GPUSERVE_MODEL__PATH": str(tmp_path / "nope.pt2")}
    with ServerProcess("--device", "cpu", env=missing) as server:
        assert server.process is not None
        assert server.process.wait(timeout=60) == 1
    assert any("no model can serve" in line and "nope.pt2" in line for line in server.log)
    stay = {**missing, "GPUSERVE_KEEP_RUNNING_WITHOUT_MODELS": "true"}
    with ServerProcess("--device", "cpu", env=stay) as server:
        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{server.url}/health/ready")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert ready.status_code == 503 and "nope.pt2" in ready.json()["reason"]
        assert server.process is not None and server.process.poll() is None
        assert server.stop() == 0


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096


def read_until_closed(sock: socket.socket, limit_s: float = 30) -> bytes:
    sock.settimeout(limit_s)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return answer


def send_until_refused(sock: socket.socket, pieces: list[bytes]) -> int:
    """Bytes sent before the server closed the connection (at most all of them)."""
    sent = 0
    try:
        for piece in pieces:
            sock.sendall(piece)
            sent += len(piece)
    except (ConnectionResetError, BrokenPipeError):
        pass
    return sent


def test_huge_urls_and_headers_are_refused_before_they_cost_memory(demo_model: Path) -> None:
    """A long request line gets 414, a flood of header fields or one huge value 431; each
    costs the server no more than the limit, and a normal client is served throughout."""
    flood = b"x: 1\r\n" * 3_000_000  # 18 MB of tiny headers
    attacks = {
        414: b"GET /" + b"a" * 20_000_000 + b" HTTP/1.1\r\n",
        431: b"POST /predict HTTP/1.1\r\nhost: x\r\n" + flood,
    }
    big_value = b"POST /predict HTTP/1.1\r\nhost: x\r\nx-big: " + b"v" * 20_000_000
    with ServerProcess("--device", "cpu") as server:
        wait_ready(server.url)
        assert server.process is not None
        before = rss_bytes(server.process.pid)
        for status, attack in [*attacks.items(), (431, big_value)]:
            with raw_connection(server.url) as sock:
                pieces = [attack[i : i + 65536] for i in range(0, len(attack), 65536)]
                sent = send_until_refused(sock, pieces)
                answer = read_until_closed(sock)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d" % status), answer[:200]
            assert json.loads(body)["request_id"]
            assert sent < len(attack)  # closed long before the end (buffers hold a few MB)
            assert httpx.post(f"{server.url}/predict", content=ONE).status_code == 200
        grown = rss_bytes(server.process.pid) - before
        assert grown < 64 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"


def test_a_trickled_body_gets_408_at_its_deadline(demo_model: Path) -> None:
    """Two bytes at a time: cut at body_timeout_s, or at the request's own deadline."""
    env = {"GPUSERVE_BODY_TIMEOUT_S": "1.5"}
    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        for extra, deadline_s in [(b"", 1.5), (b"x-request-timeout-ms: 300\r\n", 0.3)]:
            with raw_connection(server.url) as sock:
                sock.sendall(head + extra + b"content-length: 1000\r\n\r\n")
                started = time.monotonic()
                answer = trickle(sock, b"[1", every_s=0.2, limit_s=20)
                took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"did not arrive within" in answer
            assert deadline_s <= took < deadline_s + 10
        assert httpx.post(f"{server.url}/predict", content=ONE).status_code == 200
