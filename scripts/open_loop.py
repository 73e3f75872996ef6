"""Latency and batches of `/predict` under independent arrivals (an open loop), on one core.

    python scripts/open_loop.py [--rates 500 1500 2500] [--seconds 8] [--model light]

wrk keeps a fixed number of connections, each sending its next request once it has the
answer (a closed loop). Many services see independent arrivals instead: requests come at a
rate, whether or not earlier ones were answered. This script sends requests at Poisson
arrival times at each rate (`_open_loop_client.py`, pinned to core 1, over a pool of kept-alive
connections) to `gpuserve serve` on core 0 with the benchmark's model, and reports each
request's latency from its scheduled time (so a slow server cannot slow the arrivals and hide
its own delays), the mean batch, and the server's CPU per request.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _loadgen import (
    batch_totals,
    free_port,
    mean_batch,
    pinned,
    start,
    stop,
    tree_cpu_seconds,
)
from bench import MODELS, ROOT, export_models, server_command

SCRIPTS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[500.0, 1500.0, 2500.0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--model", choices=sorted(MODELS), default="light")
    args = parser.parse_args()

    path = export_models(ROOT / "bench-results" / "models")[args.model]
    port = free_port()
    command, ready, env = server_command("gpuserve", path, port, args.model == "encoder")
    body = json.dumps({"inputs": MODELS[args.model]["body"]()})
    url = f"http://127.0.0.1:{port}"
    server = start(command, ready, env, ROOT)
    print("| rate req/s | sent | answered | p50 ms | p99 ms | mean batch | server CPU ms/req |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as payload:
            payload.write(body)
            payload.flush()
            client = [sys.executable, str(SCRIPTS / "_open_loop_client.py"), str(port)]
            client.append(payload.name)
            warm_up = pinned([*client, "400", "1"], 1)
            subprocess.run(warm_up, check=True, capture_output=True, timeout=60)
            for rate in args.rates:
                before, cpu_before = batch_totals(url), tree_cpu_seconds(server.pid)
                out = subprocess.run(
                    pinned([*client, str(rate), str(args.seconds)], 1),
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=args.seconds + 120,
                ).stdout
                cpu = tree_cpu_seconds(server.pid) - cpu_before
                after = batch_totals(url)
                result = json.loads(out)
                batched = mean_batch(before, after)
                batch = f"{batched:.1f}" if batched is not None else "n/a"
                answered = max(1, result["answered"])
                print(
                    f"| {rate:.0f} | {result['sent']} | {result['answered']} | "
                    f"{result['p50_ms']:.2f} | {result['p99_ms']:.2f} | {batch} | "
                    f"{cpu / answered * 1e3:.3f} |",
                    flush=True,
                )
    finally:
        stop(server)


if __name__ == "__main__":
    main()
