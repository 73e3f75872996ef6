"""`bench.py --workers N ...`: one gpuserve server per worker count, the demo model over
/predict JSON at one concurrency, driven by wrk on core 1.

Pinned (the default), every server runs on core 0 alone, so the figures show what the
multi-process mode costs per request for the same CPU: the parent's own CPU (it supervises
and serves nothing) and the workers' together against one process. With `--spread`, the
server may use every core (wrk shares core 1 with a worker): what a second core buys here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _loadgen import free_port, median_rows, run_wrk, start, stop, tree_cpu_seconds
from _protocols import bodies

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent


def _own_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def measure_workers(
    model: Path,
    counts: list[int],
    concurrency: int,
    seconds: float,
    repeats: int,
    spread: bool,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Each worker count in turn, `repeats` times; the median row of each."""
    payload = bodies()["predict JSON"]
    runs: dict[int, list[dict[str, Any]]] = {count: [] for count in counts}
    for _ in range(repeats):
        for count in counts:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "gpuserve", "serve", str(model), "--device", device]
            command += ["--port", str(port), "--workers", str(count)]
            env = {
                "GPUSERVE_LOG_LEVEL": "warning",
                "GPUSERVE_GRPC": "false",
                "GPUSERVE_MODEL__MAX_QUEUE_SIZE": "100000",
            }
            server = start(command, f"{url}/health/ready", env, ROOT, None if spread else 0)
            try:
                run_wrk(f"{url}/predict", payload, 8, 2)  # warm-up, not recorded
                tree_before = tree_cpu_seconds(server.pid)
                parent_before = _own_cpu_seconds(server.pid)
                result = run_wrk(f"{url}/predict", payload, concurrency, seconds)
                tree = tree_cpu_seconds(server.pid) - tree_before
                parent = _own_cpu_seconds(server.pid) - parent_before
            finally:
                stop(server)
            answered = max(1, result["requests"] - result["non_2xx"])
            result.update(
                workers=count,
                cpu_us_per_request=tree / answered * 1e6,
                parent_us_per_request=parent / answered * 1e6 if count > 1 else 0.0,
            )
            runs[count].append(result)
            print(json.dumps(result), flush=True)
    return median_rows(list(runs.values()))


def workers_report(rows: list[dict[str, Any]], concurrency: int, spread: bool) -> str:
    where = "on every core (wrk shares core 1)" if spread else "on core 0 alone"
    lines = [
        f"Demo model, /predict JSON, c={concurrency}, server {where}, wrk on core 1 "
        "(median of repeats)",
        "",
        "| workers | req/s | p50 ms | p99 ms | server CPU µs/request (all processes) "
        "| parent CPU µs/request | req/s per repeat | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workers']} | {row['req_per_s']:.0f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['cpu_us_per_request']:.0f} | "
            f"{row['parent_us_per_request']:.1f} | {row['req_per_s_runs']} | "
            f"{row['errors'] + row['non_2xx']} |"
        )
    return "\n".join(lines)


def demo_model() -> Path:
    model = ROOT / "models" / "digits.pt2"
    if not model.exists():
        make = [sys.executable, str(SCRIPTS / "make_demo_model.py"), "--out", str(model.parent)]
        subprocess.run(make, check=True)
    return model
