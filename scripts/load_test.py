"""Requests per second and latency of `/predict` at a few concurrencies, against a real server.

Starts `gpuserve serve` on a free port (pinned to one core with taskset where it exists), drives it
with wrk (Debian's `wrk`, pinned to another core) or, if wrk is missing, a Python client, and
prints a table. Each run is bounded by --duration. The server is stopped by its own PID.

    python scripts/load_test.py --concurrency 1 32 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[%s]]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_s": %%f, "errors": %%d, "non_2xx": %%d, '
    .. '"p50_ms": %%f, "p99_ms": %%f}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3))
end
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(command: list[str], core: int | None) -> list[str]:
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return command
    return ["taskset", "-c", str(core), *command]


def start_server(
    port: int, model: Path, max_batch_size: int, max_wait_ms: float
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GPUSERVE_MODEL__PATH": str(model),
        "GPUSERVE_MODEL__MAX_BATCH_SIZE": str(max_batch_size),
        "GPUSERVE_MODEL__MAX_WAIT_MS": str(max_wait_ms),
        "GPUSERVE_LOG_LEVEL": "warning",
        # One core for the server: torch's own threads would fight the event loop for it.
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "gpuserve", "serve", "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(pinned(command, 0), cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise SystemExit("server did not become ready in 120 s")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_totals(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics").text
    total = re.search(r"^gpuserve_batch_size_sum (\S+)", text, re.M)
    count = re.search(r"^gpuserve_batch_size_count (\S+)", text, re.M)
    assert total and count
    return float(total.group(1)), float(count.group(1))


def run_wrk(url: str, body: str, concurrency: int, duration: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % body)
    try:
        command = [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{int(duration)}s",
            "--timeout",
            "10s",
            "-s",
            script.name,
            f"{url}/predict",
        ]
        out = subprocess.run(
            pinned(command, 1), capture_output=True, text=True, timeout=duration + 60
        ).stdout
    finally:
        os.unlink(script.name)
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


async def run_python(url: str, body: str, concurrency: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                response = await client.post("/predict", content=body, headers=headers)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "errors": 0,
        "non_2xx": errors,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "digits.pt2")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--python-client", action="store_true", help="do not use wrk")
    args = parser.parse_args()

    body = json.dumps({"inputs": load_digits().data[0].tolist()})
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, args.model, args.max_batch_size, args.max_wait_ms)
    rows = []
    try:
        for concurrency in args.concurrency:
            before = batch_totals(url)
            cpu_before = cpu_seconds(server.pid)
            if use_wrk:
                result = run_wrk(url, body, concurrency, args.duration)
            else:
                result = asyncio.run(run_python(url, body, concurrency, args.duration))
            cpu = cpu_seconds(server.pid) - cpu_before
            after = batch_totals(url)
            batches = after[1] - before[1]
            result["concurrency"] = concurrency
            result["req_per_s"] = result["requests"] / result["duration_s"]
            result["mean_batch"] = (after[0] - before[0]) / batches if batches else 0.0
            result["cpu_us_per_req"] = cpu / result["requests"] * 1e6 if result["requests"] else 0.0
            rows.append(result)
    finally:
        server.terminate()
        server.wait(timeout=60)

    client = "wrk -t1 (pinned to core 1)" if use_wrk else "python httpx client"
    print(f"\nload generator: {client}; server pinned to core 0; {args.duration:.0f} s per row")
    print("| concurrency | req/s | p50 ms | p99 ms | mean batch | server CPU µs/req | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['mean_batch']:.1f} | {r['cpu_us_per_req']:.0f} | {r['errors'] + r['non_2xx']} |"
        )


if __name__ == "__main__":
    main()
