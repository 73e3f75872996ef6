"""Where gpuserve's CPU per request goes, stage by stage, on a real socket.

    python scripts/cpu_stages.py [--seconds 10] [--concurrency 1 32] [--model light]
    python scripts/cpu_stages.py --counters [--concurrency 32]

The setting of `scripts/bench.py`: the benchmark's model exported, `gpuserve serve` pinned to
core 0 with one torch thread, wrk on core 1. For each concurrency, wrk runs while py-spy
(also on core 1) samples the server's threads; the server's CPU over the run (/proc) divided
by the requests answered is the CPU per request, and each stage's share of py-spy's samples
splits it. A sample counts for the first stage in `STAGES` that one of its frames belongs to,
so the model's forward pass counts as "forward" wherever it is called from.

With `--counters`, no profiler: the server starts with `_stage_timers.py` loaded, which
counts the event loop thread's CPU time in each step of a request (inclusive, per call), and
the table gives each step's µs per request beside the loop's whole CPU per request.

Needs wrk (apt-get install wrk) and py-spy (pip install py-spy), and root or ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _stage_timers
from _loadgen import (
    main_thread_cpu_seconds,
    pinned,
    run_wrk,
    start,
    stop,
    tree_cpu_seconds,
)
from bench import MODELS, ROOT, export_models, server_command

# (stage, the frames that belong to it: "file.py" or "file.py:function" fragments). A sample
# counts for the innermost of its frames that some stage names, so that work is charged to
# the step that asked for it (the torch calls under the handler's forward to the forward pass, the
# task a route creates to that route's step); the generic frames of GENERIC count only when
# no other frame is named.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("forward (the model)", ("handler.py:forward", "handler.py:call_module", "runner.py:forward")),
    ("collate and copy", ("handler.py:collate", "handler.py:_pad", "runner.py:prepare")),
    ("split and NaN check", ("handler.py:split", "runner.py:_non_finite", "runner.py:run")),
    ("postprocess", ("handler.py:postprocess", "handler.py:softmax")),
    ("metrics", ("metrics.py", "prometheus_client/")),
    ("logs", ("logs.py", "logging/")),
    ("read the body", ("http/responses.py:read_body", "starlette/requests.py")),
    ("parse and check", ("decoding.py", "spec.py", "schemas.py", "oip.py", "pydantic")),
    ("hang-up watch", ("http/responses.py:unless_disconnected", "http/responses.py:_disconnect")),
    ("encode", ("http/responses.py:json_response", "http/responses.py:error_response")),
    ("batcher: submit, collect, resolve", ("batcher.py",)),
    ("service: hooks, deadline, release", ("service.py",)),
    ("app: lane, context, routes", ("lane.py", "context.py", "routes.py", "v2.py")),
    ("response object (starlette)", ("starlette/responses.py", "starlette/datastructures.py")),
    ("HTTP (uvicorn)", ("uvicorn/", "httptools", "connections.py")),
]
GENERIC: list[tuple[str, tuple[str, ...]]] = [
    ("event loop (asyncio)", ("asyncio/", "uvloop")),
    ("thread hand-off", ("threading.py", "concurrent/", "queue.py")),
]


def _names(frame: str, marks: tuple[str, ...]) -> bool:
    # py-spy frames read "function (path/file.py:line)", e.g. "Handler.forward (...)".
    function, _, where = frame.partition(" (")
    location = where.rsplit(":", 1)[0]
    for mark in marks:
        file, _, name = mark.partition(":")
        in_file = location.endswith(file) or (file.endswith("/") and file in location)
        if in_file and (not name or function.rsplit(".", 1)[-1].startswith(name)):
            return True
    return False


def stage_of(frames: list[str]) -> str:
    for rules in (STAGES, GENERIC):
        for frame in reversed(frames):
            for stage, marks in rules:
                if _names(frame, marks):
                    return stage
    return "other"


RATE_HZ = 100


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on the server: only samples of the thread holding the GIL (Python at work), each
    with its thread, at RATE_HZ; blocking mode, as without it idle waits counted as work."""
    beside = Path(sys.executable).parent / "py-spy"  # a virtual environment's, unactivated
    spy = str(beside) if beside.exists() else "py-spy"
    command = [spy, "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw"]
    command += ["--gil", "--threads", "--duration", str(int(seconds)), "--output", str(out)]
    return subprocess.Popen(pinned(command, 1), stdout=subprocess.DEVNULL)


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of the server's main thread (the event loop) and of its others."""
    main = main_thread_cpu_seconds(pid)
    return main, tree_cpu_seconds(pid) - main


def python_seconds(raw: Path) -> tuple[dict[str, float], float, float]:
    """Seconds with the GIL per stage, and in all, on the main thread and on the others."""
    per_stage: collections.Counter[str] = collections.Counter()
    main = others = 0.0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        seconds = int(count) / RATE_HZ
        frames = stack.split(";")
        per_stage[stage_of(frames)] += seconds
        if any("Thread._bootstrap" in frame for frame in frames):
            others += seconds
        else:
            main += seconds
    return dict(per_stage), main, others


def split_cpu(
    raw: Path, main_cpu: float, other_cpu: float, requests: int, per_request_us: float
) -> dict[str, float]:
    """µs per request by stage: Python stages from py-spy's GIL samples; what each thread's
    CPU has beyond its Python (C code that released the GIL) as two stages of its own; all
    scaled to `per_request_us`, the CPU per request measured without the profiler."""
    python, main_py, other_py = python_seconds(raw)
    stages_s = dict(python)
    stages_s["event loop's C side (uvloop, httptools, socket calls)"] = max(0.0, main_cpu - main_py)
    stages_s["worker, GIL released (torch kernels, copies)"] = max(0.0, other_cpu - other_py)
    total = sum(stages_s.values()) or 1.0
    return {
        stage: per_request_us * seconds / total
        for stage, seconds in sorted(stages_s.items(), key=lambda kv: -kv[1])
    }


SCRIPTS = Path(__file__).resolve().parent


def counted_env(work: Path) -> tuple[dict[str, str], Path]:
    """The environment that loads `_stage_timers` into the server, and its counters' file."""
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import _stage_timers  # noqa: F401\n")
    counters = work / "counters.json"
    # The tree's root too: sitecustomize runs before `python -m` puts the working directory
    # on the path, and would find an installed gpuserve rather than this tree's.
    path = os.pathsep.join(map(str, (site, ROOT, SCRIPTS)))
    env = {"PYTHONPATH": path, "GPUSERVE_STAGE_COUNTERS": str(counters)}
    return env, counters


def read_counters(pid: int, counters: Path) -> dict[str, list[int]]:
    """The counters since the last reading (the server dumps and resets them on SIGUSR1)."""
    counters.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if counters.exists():  # renamed into place whole
            found: dict[str, list[int]] = json.loads(counters.read_text())
            return found
        time.sleep(0.05)
    raise RuntimeError("the server wrote no counters (is _stage_timers loaded?)")


def counted_run(
    pid: int, counters: Path, url: str, body: str, concurrency: int, seconds: float
) -> dict[str, Any]:
    """One wrk run with the counters reset before it: the loop's CPU per request and each
    step's µs per request."""
    read_counters(pid, counters)
    loop0, _ = thread_cpu(pid)
    result = run_wrk(url, body, concurrency, seconds)
    loop1, _ = thread_cpu(pid)
    totals = read_counters(pid, counters)
    requests = max(1, result["requests"])
    order = [stage for *_, stage in _stage_timers.STAGES]
    order += [stage for _, stage in _stage_timers.PROTOCOL_STAGES]
    steps = {
        stage: {
            "calls_per_request": totals[stage][0] / requests,
            "us_per_request": totals[stage][1] / 1e3 / requests,
        }
        for stage in order
        if stage in totals
    }
    return {
        "concurrency": concurrency,
        "req_per_s": result["req_per_s"],
        "p50_ms": result["p50_ms"],
        "event_loop_us_per_request": (loop1 - loop0) / requests * 1e6,
        "steps": steps,
    }


def print_counted(row: dict[str, Any]) -> None:
    loop = row["event_loop_us_per_request"]
    print(
        f"\nc={row['concurrency']}: {row['req_per_s']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, "
        f"{loop:.0f} µs of the event loop's CPU per request, of which (inclusive):"
    )
    print("| step | calls per request | µs per request |\n| --- | ---: | ---: |")
    for stage, step in row["steps"].items():
        name = stage.lstrip()
        indent = "· " * (len(stage) - len(name))
        print(
            f"| {indent}{name} | {step['calls_per_request']:.2f} | {step['us_per_request']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--model", choices=sorted(MODELS), default="light")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--counters",
        action="store_true",
        help="count each step's CPU in the server (_stage_timers.py) instead of sampling",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        help="the server's log level: info turns its access log on (one line per request)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu-stages-"))
    path = export_models(work)[args.model]
    port = 8000 + int(time.time()) % 1000
    command, ready, env = server_command("gpuserve", path, port, args.model == "encoder")
    env["GPUSERVE_LOG_LEVEL"] = args.log_level
    counters = None
    if args.counters:
        extra, counters = counted_env(work)
        env.update(extra)
    body = json.dumps({"inputs": MODELS[args.model]["body"]()})
    url = f"http://127.0.0.1:{port}/predict"
    server = start(command, ready, env, ROOT)
    results = []
    try:
        run_wrk(url, body, 8, 2)  # warm-up
        for concurrency in args.concurrency:
            if counters is not None:
                row = counted_run(server.pid, counters, url, body, concurrency, args.seconds)
                results.append(row)
                print_counted(row)
                continue
            # First without the profiler, for the figures; then with it, for the shares.
            loop0, rest0 = thread_cpu(server.pid)
            result = run_wrk(url, body, concurrency, args.seconds)
            loop1, rest1 = thread_cpu(server.pid)
            requests = max(1, result["requests"])
            per_request_us = (loop1 - loop0 + rest1 - rest0) / requests * 1e6
            raw = work / f"c{concurrency}.txt"
            spy = profile(server.pid, args.seconds + 1, raw)
            time.sleep(0.5)  # py-spy attaches
            main0, other0 = thread_cpu(server.pid)
            profiled = run_wrk(url, body, concurrency, args.seconds)
            main1, other1 = thread_cpu(server.pid)
            spy.wait(timeout=120)
            stages_us = split_cpu(
                raw, main1 - main0, other1 - other0, profiled["requests"], per_request_us
            )
            row = {
                "concurrency": concurrency,
                "req_per_s": result["req_per_s"],
                "p50_ms": result["p50_ms"],
                "p99_ms": result["p99_ms"],
                "cpu_us_per_request": per_request_us,
                "event_loop_us_per_request": (loop1 - loop0) / requests * 1e6,
                "stages_us": stages_us,
            }
            results.append(row)
            print(
                f"\nc={concurrency}: {row['req_per_s']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, "
                f"p99 {row['p99_ms']:.2f} ms, {per_request_us:.0f} µs CPU per request "
                f"({row['event_loop_us_per_request']:.0f} on the event loop); profiled run: "
                f"{profiled['req_per_s']:.0f} req/s"
            )
            print("| stage | µs per request | share |\n| --- | ---: | ---: |")
            for stage, us in stages_us.items():
                print(f"| {stage} | {us:.1f} | {us / per_request_us:.0%} |")
    finally:
        stop(server)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
