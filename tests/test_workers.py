"""Several worker processes behind one port: the same answers, one readiness, one /metrics,
restarts, and a drain across processes. Real processes, real sockets."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from prometheus_client import multiprocess
from sklearn.datasets import load_digits

from gpuserve.config import ModelSettings, Settings, available_cores
from gpuserve.core.metrics import Metrics
from gpuserve.http import create_app
from gpuserve.server import run
from gpuserve.workers import restart_pause, worker_settings

from .helpers import (
    DEMO,
    ONE,
    ServerProcess,
    metric,
    read_all,
    send_all,
    serving,
    sigterm_with_requests_in_flight,
    slow_server,
    wait_ready,
)

pytestmark = pytest.mark.anyio


def test_a_worker_holds_its_share_of_each_queue_and_of_the_connections() -> None:
    models = [
        ModelSettings(path=DEMO, name="a", max_queue_size=100),
        ModelSettings(path=DEMO, name="b", max_queue_size=3),
    ]
    settings = Settings(models=models, default_model="b", max_connections=2049, workers=2)
    share = worker_settings(settings, 2, 9001)
    assert [(m.key, m.max_queue_size) for m in share.served_models] == [("b", 1), ("a", 50)]
    assert (share.workers, share.grpc_port, share.max_connections) == (1, 9001, 1025)
    assert share.served_models[0].key == "b"  # still the default


def test_a_worker_that_keeps_dying_soon_after_start_waits_longer_each_time() -> None:
    pause, failures = restart_pause(lived_s=2.0, failures=0)
    assert (pause, failures) == (1.0, 1)
    pauses = []
    for _ in range(8):
        pause, failures = restart_pause(lived_s=2.0, failures=failures)
        pauses.append(pause)
    assert pauses == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert restart_pause(lived_s=3600.0, failures=failures) == (1.0, 1)  # served an hour


def test_workers_is_a_count_or_auto_the_cores_a_cgroup_quota_leaves(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert Settings(workers="auto").worker_count == available_cores()
    assert available_cores(tmp_path) == cores  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: one worker
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: one core
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path) == 1
    assert Settings(workers=3).worker_count == 3
    with pytest.raises(ValueError, match="workers must be between 1 and 256"):
        Settings(workers=0)
    with pytest.raises(ValueError, match="repository_api needs workers = 1"):
        Settings(workers=2, repository_api=True)
    with pytest.raises(SystemExit, match="workers > 1 serves models from the settings only"):
        run(Settings(workers=2), loader=lambda model, device: None)  # type: ignore[arg-type,return-value]


_RECORD = """
import sys
from gpuserve.core.metrics import Metrics
metrics = Metrics(sys.argv[1])
requests, depth, ready = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for _ in range(requests):
    metrics.observe_request("/predict", 200, 0.001, "m", "http", "1")
metrics.observe_batch("m", "1", requests, 0.0, 0.001, 0, 0)
metrics.track_queue_depth("m", "1", lambda: depth)
metrics.ready.labels("m", "1").set(ready)
metrics.refresh()
"""


def test_the_metrics_of_every_worker_are_summed(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for args in (("3", "5", "1"), ("4", "2", "0")):
        done = subprocess.run(
            [sys.executable, "-c", _RECORD, str(tmp_path), *args], env=env, check=True
        )
        assert done.returncode == 0
    pids = sorted({int(m) for m in re.findall(r"_(\d+)\.db", " ".join(os.listdir(tmp_path)))})
    text = Metrics(str(tmp_path)).render().decode()
    route = 'protocol="http",route="/predict",version="1"'
    assert f'gpuserve_requests_total{{code="200",model="m",{route}}} 7.0' in text
    assert 'gpuserve_batch_size_sum{model="m",version="1"} 7.0' in text
    assert 'gpuserve_queue_depth{model="m",version="1"} 7.0' in text
    assert 'gpuserve_ready{model="m",version="1"} 0.0' in text  # ready only where all are
    # The protocol's statistics add up the same way.
    (summed,) = Metrics(str(tmp_path)).summed_stats([("m", "1")])
    assert summed.inference_count == 7
    assert summed.success.count == 7
    # One entry per key asked for, in order, a key asked twice included.
    counts = Metrics(str(tmp_path)).summed_stats([("m", "1"), ("other", "1"), ("m", "1")])
    assert [stats.inference_count for stats in counts] == [7, 0, 7]
    multiprocess.mark_process_dead(
        pids[0], str(tmp_path)
    )  # what the parent does when a worker dies
    text = Metrics(str(tmp_path)).render().decode()
    assert f'gpuserve_requests_total{{code="200",model="m",{route}}} 7.0' in text  # counted
    assert 'gpuserve_queue_depth{model="m",version="1"} 2.0' in text  # the live one only


def test_the_process_series_of_several_workers_are_their_sums(tmp_path: Path) -> None:
    """Every live worker's memory, CPU and open files added up; a dead one's left out."""
    from prometheus_client import ProcessCollector

    def read(pid: int) -> dict[str, float]:
        families = ProcessCollector(pid=lambda: pid, registry=None).collect()
        return {f.samples[0].name: f.samples[0].value for f in families}

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (os.getpid(), other.pid, int(gone.stdout)):
            (tmp_path / f"protocol_stats_{pid}.json").write_text("[]")
        metrics = Metrics(str(tmp_path))
        assert metrics._worker_pids() == sorted([os.getpid(), other.pid])
        text = metrics.render().decode()
        mine, theirs = read(os.getpid()), read(other.pid)
    finally:
        other.kill()
        other.wait()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("process_")
    }
    assert values["process_start_time_seconds"] == min(
        mine["process_start_time_seconds"], theirs["process_start_time_seconds"]
    )
    fds = values["process_open_fds"]
    assert fds >= theirs["process_open_fds"] + 3 and fds > mine["process_open_fds"]
    assert values["process_resident_memory_bytes"] > theirs["process_resident_memory_bytes"]
    assert values["process_resident_memory_bytes"] > 2**20 + theirs["process_resident_memory_bytes"]


def _workers(model: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    env = {"GPUSERVE_MODEL__PATH": str(model), "GPUSERVE_MODEL__FREEZE_GC": "false", **(env or {})}
    return ServerProcess("--device", "cpu", "--workers", "2", *extra, env=env)


def _pids(server: ServerProcess) -> dict[int, list[int]]:
    """Each worker slot's processes, in the order they were started."""
    found: dict[int, list[int]] = {}
    for line in server.log:
        started = re.search(r"worker (\d+) started \(pid (\d+)\)", line)
        if started:
            found.setdefault(int(started.group(1)), []).append(int(started.group(2)))
    return found


def _prefixes(server: ServerProcess) -> set[str]:
    """The request-id prefixes of the /predict answers: each process has its own."""
    return set(re.findall(r"POST /predict 200 \S+ id=([0-9a-f]{16})", "".join(server.log)))


@pytest.mark.parametrize("engine", [False, True], ids=["own copies", "engine"])
async def test_two_workers_answer_as_one_process_and_count_as_one_server(
    demo_model: Path, engine: bool
) -> None:
    images = load_digits().data[:48].astype(np.float32)
    one = create_app(Settings(device="cpu", model=ModelSettings(path=demo_model, freeze_gc=False)))
    async with serving(one) as client:
        response = await client.post("/predict", json={"instances": images.tolist()})
        expected = np.array([out["probabilities"] for out in response.json()["outputs"]])
    with _workers(demo_model, env={"GPUSERVE_ENGINE": str(engine).lower()}) as server:
        wait_ready(server.url)
        assert set(_pids(server)) == {0, 1}
        # With an engine, the model is loaded once, there.
        loads = [line for line in server.log if "loaded digits from" in line]
        assert len(loads) == (1 if engine else 2), loads
        assert all("[engine]" in line for line in loads) == engine
        bodies = [json.dumps({"inputs": image}).encode() for image in images.tolist()]
        sent = 0
        for _ in range(5):  # bounded: until both processes have answered some
            answers = read_all(send_all(server.url, bodies))
            sent += len(bodies)
            failed = [(status, body) for status, body in answers if status != 200]
            assert not failed, (failed[:3], server.log[-10:])
            got = np.array([body["outputs"]["probabilities"] for _, body in answers])
            np.testing.assert_allclose(got, expected, atol=1e-6)
            if len(_prefixes(server)) == 2:
                break
        assert len(_prefixes(server)) == 2, "one worker answered everything"
        route = 'protocol="http",route="/predict",version="1"'
        assert (
            metric(server.url, f'gpuserve_requests_total{{code="200",model="digits",{route}}}')
            == sent
        )
        assert metric(server.url, 'gpuserve_batch_size_sum{model="digits",version="1"}') == sent
        assert metric(server.url, 'gpuserve_ready{model="digits",version="1"}') == 1.0
        grpc = triton_grpc.InferenceServerClient(server.grpc_url)
        try:
            pixels = triton_grpc.InferInput("pixels", [4, 64], "FP32")
            pixels.set_data_from_numpy(images[:4])
            logits = grpc.infer("digits", [pixels]).as_numpy("logits")
            probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            np.testing.assert_allclose(probabilities, expected[:4], atol=1e-5)
        finally:
            grpc.close()
        # Triton's statistics are the server's too: each worker shares its own within 0.1 s.
        deadline = time.monotonic() + 10
        while True:
            stats = httpx.get(f"{server.url}/v2/models/digits/stats").json()["model_stats"][0]
            counted = (stats["inference_count"], stats["inference_stats"]["success"]["count"])
            if counted == (sent + 4, sent + 1) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert counted == (sent + 4, sent + 1)
        assert server.stop() == 0


def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(demo_model: Path) -> None:
    with _workers(demo_model) as server:
        wait_ready(server.url)
        victim = _pids(server)[0][0]
        outcomes: list[int | str] = []
        stop_at = time.monotonic() + 20

        def traffic() -> None:  # a new connection per request, bounded in count and time
            for _ in range(400):
                if time.monotonic() > stop_at or len(outcomes) > 600:
                    return
                try:
                    response = httpx.post(f"{server.url}/predict", content=ONE, timeout=10)
                    outcomes.append(response.status_code)
                except httpx.TransportError as exc:  # a connection the killed worker held
                    outcomes.append(type(exc).__name__)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(traffic) for _ in range(4)]
            while len(outcomes) < 40:
                assert time.monotonic() < stop_at
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            killed_at = len(outcomes)
            # The whole server is not ready while a worker is missing, and alive throughout.
            saw_not_ready = False
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                assert httpx.get(f"{server.url}/health/live").status_code == 200
                ready = httpx.get(f"{server.url}/health/ready")
                if ready.status_code != 200:
                    saw_not_ready = True
                elif saw_not_ready:
                    break
                time.sleep(0.05)
            for client in clients:
                client.result()
        assert saw_not_ready and len(_pids(server)[0]) == 2, server.log[-20:]
        replacement = _pids(server)[0][1]
        assert replacement != victim
        failures = [o for o in outcomes if o != 200]
        # At most the requests the killed worker held (one per client), none an HTTP error.
        assert len(failures) <= 4 and all(isinstance(o, str) for o in failures), failures
        assert len(outcomes) > killed_at + 20
        wait_ready(server.url)
        answers = read_all(send_all(server.url, [ONE] * 24))
        assert [status for status, _ in answers] == [200] * 24
        assert server.stop() == 0


def test_a_killed_engine_is_restarted_and_the_workers_answer_503_meanwhile(
    demo_model: Path,
) -> None:
    with _workers(demo_model, env={"GPUSERVE_ENGINE": "true"}) as server:
        wait_ready(server.url)
        engine = int(re.findall(r"engine started \(pid (\d+)\)", "".join(server.log))[0])
        workers = _pids(server)
        # Named for ps and top, as the workers are.
        assert Path(f"/proc/{engine}/comm").read_text().strip() == "gpuserve-engine"
        assert Path(f"/proc/{workers[1][0]}/comm").read_text().strip() == "gpuserve-w1"
        os.kill(engine, signal.SIGKILL)  # a process of the server this test started
        statuses: set[int] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the new engine serves
            assert httpx.get(f"{server.url}/health/live").status_code == 200
            response = httpx.post(f"{server.url}/predict", content=ONE, timeout=10)
            statuses.add(response.status_code)
            if response.status_code == 200 and 503 in statuses:
                break
            assert response.status_code in (200, 503), response.text
            time.sleep(0.05)
        assert statuses == {200, 503}, server.log[-20:]
        log = "".join(server.log)
        assert f"engine (pid {engine}) died" in log
        assert len(re.findall(r"engine started \(pid (\d+)\)", log)) == 2
        assert _pids(server) == workers  # the workers lived on
        answers = read_all(send_all(server.url, [ONE] * 24))
        assert [status for status, _ in answers] == [200] * 24
        assert server.stop() == 0


CRASHY = """
import os

from gpuserve.handler import Handler


class Crashy(Handler):
    def preprocess(self, instance):
        if float(instance[0]) == 13.0:
            os._exit(STATUS)  # 1: as an unhandled exception ends a process; or any other
        return super().preprocess(instance)
"""


# 3 was once how a worker said it gave up: model code exiting with it stopped the server.
@pytest.mark.parametrize("status", [1, 3])
def test_a_worker_that_crashes_is_restarted_not_taken_for_one_that_gave_up(
    demo_model: Path, tmp_path: Path, status: int
) -> None:
    (tmp_path / "crashy.py").write_text(CRASHY.replace("STATUS", str(status)))
    env = {
        "GPUSERVE_MODEL__PATH": str(demo_model),
        "GPUSERVE_MODEL__FREEZE_GC": "false",
        "GPUSERVE_MODEL__HANDLER": "crashy:Crashy",
        "GPUSERVE_MODEL__CODE_DIR": str(tmp_path),
    }
    with ServerProcess("--device", "cpu", "--workers", "2", env=env) as server:
        wait_ready(server.url)
        crash = json.dumps({"inputs": [13.0] + [0.0] * 63}).encode()
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{server.url}/predict", content=crash, timeout=10)
        deadline = time.monotonic() + 60
        while sum(len(pids) for pids in _pids(server).values()) < 3:
            assert time.monotonic() < deadline and server.process.poll() is None, server.log[-20:]
            time.sleep(0.1)
        assert any(f"died (exit {status})" in line for line in server.log)
        wait_ready(server.url)
        answers = read_all(send_all(server.url, [ONE] * 8))
        assert [status for status, _ in answers] == [200] * 8
        assert server.stop() == 0


def test_workers_that_cannot_load_their_model_stop_the_server_with_status_1(
    tmp_path: Path,
) -> None:
    with _workers(tmp_path / "nope.pt2") as server:
        assert server.process is not None
        assert server.process.wait(timeout=120) == 1
        log = "".join(server.log)
        assert "gave up" in log and "no model can serve" in log and "nope.pt2" in log
        assert "restarting worker" not in log


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def test_sigterm_with_bodies_in_parse_processes_exits_0_and_leaves_no_process(
    slow_model: Path,
) -> None:
    """Every body parsed in a parse process: after the drain, the workers stop their parse
    processes rather than wait on them, and nothing of the server outlives it."""
    with slow_server(
        slow_model, model__max_batch_size="8", workers="2", parse_offload_bytes="64"
    ) as server:
        wait_ready(server.url)
        assert server.process is not None
        for _ in range(4):  # bodies through both workers, so each starts its parse process
            assert httpx.post(f"{server.url}/predict", content=ONE).status_code == 200
        sigterm_with_requests_in_flight(server, 40)
        family = descendants(server.process.pid)
        assert server.process.wait(timeout=60) == 0, "".join(server.log[-30:])
    deadline = time.monotonic() + 10
    while (left := {pid for pid in family if Path(f"/proc/{pid}").exists()}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not left, f"processes outlived the server: {sorted(left)}"


@pytest.mark.parametrize("engine", ["false", "true"], ids=["own copies", "engine"])
def test_sigterm_drains_every_worker_then_the_parent_exits_0(slow_model: Path, engine: str) -> None:
    with slow_server(slow_model, model__max_batch_size="8", workers="2", engine=engine) as server:
        # In flight across both workers, summed in /metrics.
        sigterm_with_requests_in_flight(server, 40)
        assert server.process is not None
        assert server.process.wait(timeout=60) == 0
        log = "".join(server.log)
        assert log.count("stopped on signal 15 after draining") == 2
        # The engine stops last, once the workers have their answers.
        stopped = log.index("every worker has stopped")
        assert ("engine stopped" in log[stopped:]) == (engine == "true")


def test_the_metrics_files_go_where_a_full_disk_cannot_reach_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A memory-backed folder with room first (/dev/shm), else the temporary folder, said."""
    from gpuserve import workers

    assert workers.metrics_parent((tmp_path / "missing", tmp_path)) == str(tmp_path)
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        assert workers.metrics_parent() == "/dev/shm"
    monkeypatch.setattr(workers, "_METRICS_ROOM", 2**62)  # no folder has this much room
    assert workers.metrics_parent((tmp_path,)) is None
    assert "where a full disk would stop the workers" in caplog.text


@contextlib.contextmanager
def full_filesystem(folder: Path, left: int) -> Iterator[Path]:
    """A small tmpfs at `folder`, filled but for `left` bytes; skips where mounting is not
    allowed."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    try:
        (folder / "filler").write_bytes(b"\0" * (shutil.disk_usage(folder).free - left))
        assert shutil.disk_usage(folder).free == left
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_workers_serve_on_when_the_temporary_disk_is_full(demo_model: Path, tmp_path: Path) -> None:
    """The workers' metrics files, written through memory maps, are not on the temporary
    folder's disk: with two pages left there (so that it is still taken as the temporary
    folder), both workers load, serve and count, and none dies of SIGBUS."""
    with full_filesystem(tmp_path / "full", left=8192) as full:
        env = {
            "GPUSERVE_MODEL__PATH": str(demo_model),
            "GPUSERVE_MODEL__FREEZE_GC": "false",
            "TMPDIR": str(full),
        }
        with ServerProcess("--device", "cpu", "--workers", "2", env=env) as server:
            wait_ready(server.url)
            # A new connection each, so that both workers take some.
            statuses = [
                httpx.post(f"{server.url}/predict", content=ONE, timeout=10).status_code
                for _ in range(61)
            ]
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            log = "".join(server.log)
            assert server.stop() == 0
    assert statuses == [200] * 61
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('gpuserve_requests_total{code="200"') and 'route="/predict"' in line
    )
    assert counted == 61
    assert "restarting worker" not in log and "Bus error" not in log
