"""`bench.py --workers N ...`: one gpuserve server per worker count, the demo model over
/predict JSON at one concurrency, driven by wrk on core 1.

With `--engine`, each count above 1 is measured twice: each worker with its own copy and
batches, and fronts feeding one engine (`engine = true`); the mean batch is read from
/metrics. With `--gil-free`, the model spends 2 ms a batch with the GIL released, as a
GPU's kernels do (`_gil_free_model.py`).

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

from _loadgen import (
    batch_totals,
    free_port,
    mean_batch,
    median_rows,
    run_wrk,
    start,
    stop,
    tree_cpu_seconds,
)
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
    engine: bool = False,
    gil_free: bool = False,
) -> list[dict[str, Any]]:
    """Each worker count (and with `engine`, each layout) in turn, `repeats` times; the
    median row of each."""
    payload = bodies()["predict JSON"]
    layouts = [
        (count, with_engine)
        for count in counts
        for with_engine in ([False, True] if engine and count > 1 else [False])
    ]
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {layout: [] for layout in layouts}
    for _ in range(repeats):
        for count, with_engine in layouts:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "gpuserve", "serve", str(model), "--device", device]
            command += ["--port", str(port), "--workers", str(count)]
            env = {
                "GPUSERVE_LOG_LEVEL": "warning",
                "GPUSERVE_GRPC": "false",
                "GPUSERVE_MODEL__MAX_QUEUE_SIZE": "100000",
                "GPUSERVE_ENGINE": str(with_engine).lower(),
            }
            if gil_free:
                env["GPUSERVE_MODEL__HANDLER"] = "_gil_free_model:GilFreeDigits"
                env["GPUSERVE_MODEL__CODE_DIR"] = str(SCRIPTS)
            server = start(command, f"{url}/health/ready", env, ROOT, None if spread else 0)
            try:
                run_wrk(f"{url}/predict", payload, 8, 2)  # warm-up, not recorded
                tree_before = tree_cpu_seconds(server.pid)
                engine_before = tree_cpu_seconds(server.pid, "gpuserve-engine")
                parent_before = _own_cpu_seconds(server.pid)
                batches_before = batch_totals(url)
                result = run_wrk(f"{url}/predict", payload, concurrency, seconds)
                tree = tree_cpu_seconds(server.pid) - tree_before
                engine_cpu = tree_cpu_seconds(server.pid, "gpuserve-engine") - engine_before
                parent = _own_cpu_seconds(server.pid) - parent_before
                batch = mean_batch(batches_before, batch_totals(url))
            finally:
                stop(server)
            answered = max(1, result["requests"] - result["non_2xx"])
            result.update(
                workers=count,
                engine=with_engine,
                mean_batch=batch or 0.0,
                cpu_us_per_request=tree / answered * 1e6,
                # The workers' (fronts') share: the whole server less the parent and engine.
                workers_us_per_request=(tree - (parent if count > 1 else 0) - engine_cpu)
                / answered
                * 1e6,
                engine_us_per_request=engine_cpu / answered * 1e6,
                parent_us_per_request=parent / answered * 1e6 if count > 1 else 0.0,
            )
            runs[(count, with_engine)].append(result)
            print(json.dumps(result), flush=True)
    return median_rows(list(runs.values()))


def workers_report(
    rows: list[dict[str, Any]], concurrency: int, spread: bool, gil_free: bool = False
) -> str:
    where = "on every core (wrk shares core 1)" if spread else "on core 0 alone"
    model = "Demo model with 2 ms of GIL-free device time a batch" if gil_free else "Demo model"
    lines = [
        f"{model}, /predict JSON, c={concurrency}, server {where}, wrk on core 1 "
        "(median of repeats)",
        "",
        "| workers | layout | req/s | mean batch | p50 ms | p99 ms | server CPU µs/request "
        "(all processes) | of which workers' | engine's | parent's | req/s per repeat "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        layout = "engine" if row["engine"] else ("own copies" if row["workers"] > 1 else "-")
        lines.append(
            f"| {row['workers']} | {layout} | {row['req_per_s']:.0f} | {row['mean_batch']:.1f} | "
            f"{row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['cpu_us_per_request']:.0f} | "
            f"{row['workers_us_per_request']:.0f} | {row['engine_us_per_request']:.0f} | "
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
