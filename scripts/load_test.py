"""Requests per second and latency of `/predict` at a few concurrencies, against a real server.

Starts `gpuserve serve` on a free port pinned to core 0, drives it with wrk (Debian's `wrk`)
pinned to core 1, and prints a table. Each row is bounded by --duration.

    python scripts/load_test.py --concurrency 1 32 --duration 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _loadgen import (
    batch_totals,
    free_port,
    mean_batch,
    run_wrk,
    start,
    stop,
    tree_cpu_seconds,
)
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "digits.pt2")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")

    body = json.dumps({"inputs": load_digits().data[0].tolist()})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "GPUSERVE_MODEL__PATH": str(args.model),
        "GPUSERVE_MODEL__MAX_BATCH_SIZE": str(args.max_batch_size),
        "GPUSERVE_MODEL__MAX_WAIT_MS": str(args.max_wait_ms),
        "GPUSERVE_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "gpuserve", "serve", "--port", str(port), "--device", "cpu"]
    command += ["--grpc-port", "0"]  # gRPC is not measured here: any free port
    server = start(command, f"{url}/health/ready", env, ROOT)
    rows = []
    try:
        for concurrency in args.concurrency:
            before, cpu_before = batch_totals(url), tree_cpu_seconds(server.pid)
            result = run_wrk(f"{url}/predict", body, concurrency, args.duration)
            cpu = tree_cpu_seconds(server.pid) - cpu_before
            after = batch_totals(url)
            assert after[1] > 0, "the server exposes no gpuserve_batch_size metric"
            result["concurrency"] = concurrency
            result["mean_batch"] = mean_batch(before, after) or 0.0
            result["cpu_us_per_req"] = cpu / max(1, result["requests"]) * 1e6
            rows.append(result)
    finally:
        stop(server)

    print(f"\nwrk -t1 on core 1, server on core 0, {args.duration:.0f} s per row")
    print("| concurrency | req/s | p50 ms | p99 ms | mean batch | server CPU µs/req | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['mean_batch']:.1f} | {r['cpu_us_per_req']:.0f} | {r['errors'] + r['non_2xx']} |"
        )


if __name__ == "__main__":
    main()
