"""Shared by the benchmark scripts: start a server pinned to a core, drive it with wrk, stop it.

Each server runs in its own process group, started here, and is stopped by that group's id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

# The body sits in a level-2 long bracket: JSON of nested arrays contains "]]". A binary body
# is read from a file instead (%s is the Lua code that sets wrk.body).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "%s"
%s
%s
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
    """Pin to one core with taskset, where there is a second core for the load generator."""
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return command
    return ["taskset", "-c", str(core), *command]


def start(
    command: list[str], ready_url: str, env: dict[str, str], cwd: Path, core: int | None = 0
) -> subprocess.Popen[bytes]:
    """Start a server on `core` (None: on any) and wait (bounded) until `ready_url` answers
    200."""
    # One thread for torch: the server has one core, and more threads would fight the loop.
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    process = subprocess.Popen(
        pinned(command, core),
        cwd=cwd,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited with {process.returncode}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"{command} did not become ready in 180 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's own process group, then SIGKILL whatever of it is left.

    The group, not just the PID: a LitServe worker outlived its parent's SIGTERM here and kept
    a core busy, which slowed the next server measured on that core.
    """
    group = process.pid  # start_new_session made it the group leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _group_alive(group):
        process.poll()  # reap the leader so it stops counting as alive
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def tree_cpu_seconds(root: int, name: str | None = None) -> float:
    """User plus system CPU seconds of a process and all its descendants (Linux /proc); with
    `name`, of those among them whose name (/proc/PID/comm) it is."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = _cpu_seconds(fields)
        names[pid] = text[text.index("(") + 1 : text.rindex(")")]
    total = 0.0
    for pid, seconds in times.items():
        if name is not None and names[pid] != name:
            continue
        walker = pid
        while walker > 1 and walker != root:
            walker = parents.get(walker, 0)
        if walker == root:
            total += seconds
    return total


def main_thread_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process's main thread: a server's event loop."""
    return _cpu_seconds(_stat_fields(Path(f"/proc/{pid}/task/{pid}/stat")))


def _stat_fields(path: Path) -> list[str]:
    """A /proc stat file's fields after the command name, which may itself hold spaces."""
    return path.read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(fields: list[str]) -> float:
    """User plus system time (utime, stime) from a stat file's fields, in seconds."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_totals(url: str) -> tuple[float, float]:
    """(instances, batches) so far from gpuserve's batch-size histogram; zeros for a server
    without it (the peers)."""
    try:
        text = httpx.get(f"{url}/metrics").text
    except httpx.HTTPError:
        return 0.0, 0.0
    total = re.search(r"^gpuserve_batch_size_sum(?:\{[^}]*\})? (\S+)", text, re.M)
    count = re.search(r"^gpuserve_batch_size_count(?:\{[^}]*\})? (\S+)", text, re.M)
    return (float(total.group(1)), float(count.group(1))) if total and count else (0.0, 0.0)


def mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The mean batch between two `batch_totals` readings; None if no batch ran between."""
    batches = after[1] - before[1]
    return (after[0] - before[0]) / batches if batches else None


def percentile_ms(latencies: list[float], q: float) -> float:
    """The q-quantile of sorted latencies in seconds, in milliseconds; 0 for none."""
    return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0


def run_wrk(
    url: str,
    body: str | bytes,
    concurrency: int,
    duration: float,
    headers: dict[str, str] | None = None,
    threads: int = 1,
    core: int | None = 1,
) -> dict[str, Any]:
    """wrk with `threads` threads, pinned to `core` (None: not pinned); returns requests,
    duration, errors and p50/p99 in ms.

    A `str` body is sent as JSON; a `bytes` one as application/octet-stream, with `headers`
    (the binary tensor extension's Inference-Header-Content-Length, say)."""
    with contextlib.ExitStack() as cleanup:
        if isinstance(body, bytes):
            with tempfile.NamedTemporaryFile("wb", suffix=".bin", delete=False) as data:
                data.write(body)
            cleanup.callback(os.unlink, data.name)
            media_type = "application/octet-stream"
            set_body = f'local f = io.open("{data.name}", "rb")\nwrk.body = f:read("*a")\nf:close()'
        else:
            media_type, set_body = "application/json", f"wrk.body = [==[{body}]==]"
        extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(WRK_SCRIPT % (media_type, set_body, extra))
        cleanup.callback(os.unlink, script.name)
        command = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{int(duration)}s"]
        command += ["--timeout", "10s", "-s", script.name, url]
        out = subprocess.run(
            pinned(command, core), capture_output=True, text=True, timeout=duration + 60
        ).stdout
    return load_result(out)


def load_result(out: str) -> dict[str, Any]:
    """A load generator's RESULT line (wrk's script, `_grpc_load.py`), with req/s added."""
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    result["req_per_s"] = result["requests"] / result["duration_s"]
    return result


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per configuration, its repeats' median run by req/s, with every repeat's req/s and
    CPU per request beside it."""
    rows = []
    for results in runs:
        middle = sorted(results, key=lambda r: r["req_per_s"])[len(results) // 2]
        middle["req_per_s_runs"] = [round(r["req_per_s"]) for r in results]
        middle["cpu_us_runs"] = [round(r["cpu_us_per_request"]) for r in results]
        rows.append(middle)
    return rows
