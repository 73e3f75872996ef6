"""Several worker processes behind one port (`workers = N`): the per-request CPU work (HTTP,
parsing, checks, encoding) spreads over N cores.

The parent binds the HTTP port once and hands the listening socket to N spawned workers,
each a complete server with its own copy of each model and its own batcher: the kernel gives
each new connection to whichever worker accepts first. gRPC listens in every worker on one
port shared with SO_REUSEPORT. The parent loads nothing and serves nothing; it supervises:

- a worker that dies is restarted (its open connections are lost; the others are unaffected),
  whether killed or crashed on an unhandled exception; one that gives up on its own (every
  model failed to load, a listener or the device could not be had) stops the server with
  status 1, as one process does, since another try would fail the same way;
- SIGTERM or SIGINT is passed to every worker, which drains as one process does; the parent
  exits 0 once all have, and a second signal is passed on too (answer what is left with 503);
- readiness is the whole server's: each worker publishes its own in shared memory, and a
  worker reports ready only while every worker is ready;
- `/metrics` sums every worker's series (prometheus-client's multiprocess mode);
- each model's queue bound and the connection cap are split between the workers, so the
  server as a whole holds no more than the settings say.

With `engine = true`, the workers are fronts: one more process, the engine, holds the models
and forms every batch (`gpuserve.engine`). It starts first and stops last, once every front
has drained; one that dies is restarted as a worker is, its fronts answering 503 meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from types import FrameType
from typing import Any

from gpuserve.config import Settings

logger = logging.getLogger("gpuserve.workers")

_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_RESTART_PAUSE_S = 1.0  # between a worker's death and its replacement: no tight crash loop
_MAX_PAUSE_S = 60.0
_STABLE_S = 60.0  # a worker that lived this long died of something new: the pause starts over
_EXIT_MARGIN_S = 5.0  # past the drain, for a worker to write its answers and exit
# A worker that gave up on its own (every model failed, a listener or the device could not be
# had) says so in its slot before it exits: no exit status can say it, since a user's model
# code may exit with any status, and such an exit is a crash, to be restarted.
_GAVE_UP = -1


class Peers:
    """What a worker shares with the others: readiness, one slot each in shared memory, and
    the folder of the metrics' files."""

    def __init__(
        self,
        slots: SynchronizedArray[Any],
        index: int,
        metrics_dir: str,
        engine_address: str | None = None,
    ) -> None:
        self._slots, self.index, self.metrics_dir = slots, index, metrics_dir
        self.engine_address = engine_address  # where the engine listens, if there is one

    def publish(self, ready: bool) -> None:
        self._slots[self.index] = 1 if ready else 0

    def give_up(self) -> None:
        """Tell the supervisor this worker stops for good (another try would fail the same
        way), before it exits."""
        self._slots[self.index] = _GAVE_UP

    def others_ready(self) -> bool:
        """Whether every other worker is ready."""
        return all(ready == 1 for i, ready in enumerate(self._slots[:]) if i != self.index)


def worker_settings(settings: Settings, count: int, grpc_port: int) -> Settings:
    """One worker's share: of each model's queue bound and of the connection cap, so that N
    workers hold no more than one process would. Its gRPC port is the one the parent holds."""
    models = [
        model.model_copy(update={"max_queue_size": max(1, model.max_queue_size // count)})
        for model in settings.served_models
    ]
    update: dict[str, Any] = {
        "workers": 1,
        "grpc_port": grpc_port,
        "max_connections": max(1, math.ceil(settings.max_connections / count)),
        "models": models,
        "default_model": settings.served_models[0].key,
    }
    return settings.model_copy(update=update)


# What each worker process runs: the one-process server on the supervisor's socket, given
# the worker's settings, that socket, its peers and whether to wait for its models before
# accepting connections (a replacement). A module-level function, so spawn can pickle it.
Target = Callable[[Settings, list[socket.socket], "Peers", bool], None]


def supervise(settings: Settings, count: int, target: Target) -> int:
    """Run `count` workers, each running `target`, until a stop signal, restarting any that
    dies; the exit status."""
    http = listen(settings.host, settings.port)
    grpc_holder = _hold_grpc_port(settings) if settings.grpc else None
    grpc_port = grpc_holder.getsockname()[1] if grpc_holder is not None else settings.grpc_port
    metrics_dir = tempfile.mkdtemp(prefix="gpuserve-metrics-", dir=metrics_parent())
    # Read by prometheus-client when a worker imports it (spawned workers inherit it): its
    # values then live in files there, which any worker's /metrics sums.
    previous_dir = os.environ.get(_METRICS_DIR)
    os.environ[_METRICS_DIR] = metrics_dir
    context = multiprocessing.get_context("spawn")
    slots = context.Array("b", count, lock=False)
    share = worker_settings(settings, count, grpc_port)
    engine = None
    if settings.engine:
        # A folder only this user can enter: the engine's socket trusts whoever reaches it.
        engine_dir = tempfile.mkdtemp(prefix="gpuserve-engine-")
        engine = _EngineProcess(
            context,
            settings.model_copy(update={"workers": 1}),
            f"ipc://{engine_dir}/engine.sock",
            metrics_dir,
        )
    supervisor = _Supervisor(context, share, target, http, slots, metrics_dir, engine)
    host, port = http.getsockname()[:2]
    logger.info(
        "%d workers serving http://%s:%d%s",
        count,
        f"[{host}]" if ":" in host else host,
        port,
        f", gRPC on port {grpc_port}" if grpc_holder is not None else "",
    )
    try:
        return supervisor.run(count, settings.shutdown_timeout_s)
    finally:
        http.close()
        if grpc_holder is not None:
            grpc_holder.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if engine is not None:
            shutil.rmtree(engine.folder, ignore_errors=True)
        if previous_dir is None:
            os.environ.pop(_METRICS_DIR, None)
        else:
            os.environ[_METRICS_DIR] = previous_dir


class _Supervisor:
    def __init__(
        self,
        context: Any,
        settings: Settings,
        target: Target,
        http: socket.socket,
        slots: SynchronizedArray[Any],
        metrics_dir: str,
        engine: _EngineProcess | None = None,
    ) -> None:
        self._context, self._settings, self._http = context, settings, http
        self._engine = engine
        self._target = target
        self._slots, self._metrics_dir = slots, metrics_dir
        self._workers: dict[int, Any] = {}  # slot -> multiprocessing.Process
        self._started: dict[int, float] = {}  # slot -> when its process started
        self._failures: dict[int, int] = {}  # slot -> deaths in a row, each soon after start
        self._due: dict[int, float] = {}  # slot -> when its replacement starts
        self._signals: list[int] = []

    def run(self, count: int, drain_s: float) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            if self._engine is not None:
                self._engine.start()
            for index in range(count):
                self._start(index)
            failed = self._watch()
            stopped = self._stop(drain_s)
            if self._engine is not None:  # last: what the fronts waited for is answered
                stopped = self._engine.stop(drain_s) or stopped
            return stopped if failed is None else failed
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _start(self, index: int, replacing: bool = False) -> None:
        self._slots[index] = 0
        # A replacement accepts connections only once its models are ready: until then the
        # others serve, rather than it answering 503 "loading" to its share of the traffic.
        args = (
            self._target,
            self._settings,
            self._http,
            self._slots,
            index,
            self._metrics_dir,
            replacing,
            self._engine.address if self._engine is not None else None,
        )
        process = self._context.Process(
            target=_worker_main,
            args=(*args, os.getpid()),
            name=f"gpuserve-worker-{index}",
            daemon=False,
        )
        process.start()
        self._workers[index] = process
        self._started[index] = time.monotonic()
        logger.info("worker %d started (pid %d)", index, process.pid)

    def _watch(self) -> int | None:
        """Until a stop signal (None), or a worker failing at start (its status)."""
        while not self._signals:
            now = time.monotonic()
            for index, due in list(self._due.items()):
                if due <= now:
                    del self._due[index]
                    self._start(index, replacing=True)
            sentinels = {p.sentinel: i for i, p in self._workers.items()}
            engine = self._engine.watched(now) if self._engine is not None else []
            if not sentinels and not engine:  # everything is waiting for its restart
                time.sleep(0.2)
                continue
            for sentinel in multiprocessing.connection.wait([*sentinels, *engine], timeout=0.2):
                if sentinel not in sentinels:
                    assert self._engine is not None
                    self._engine.died()
                    continue
                index = sentinels[sentinel]
                status = self._reap(index)
                if status is not None:
                    return status
                lived_s = time.monotonic() - self._started[index]
                pause, self._failures[index] = restart_pause(lived_s, self._failures.get(index, 0))
                logger.error("restarting worker %d in %.0f s", index, pause)
                self._due[index] = time.monotonic() + pause
        return None

    def _reap(self, index: int) -> int | None:
        """A worker has exited: None to restart it, or the server's exit status."""
        process = self._workers.pop(index)
        process.join()
        gave_up = self._slots[index] == _GAVE_UP
        self._slots[index] = 0
        _mark_dead(process.pid, self._metrics_dir)
        code = process.exitcode
        if gave_up:
            logger.error(
                "worker %d gave up (no model can serve, or its listener or device could not "
                "be had; its log says which); stopping",
                index,
            )
            return 1
        logger.error("worker %d (pid %d) died (exit %s)", index, process.pid, code)
        return None

    def _stop(self, drain_s: float) -> int:
        """Pass the stop signal on (each one received), and wait for every worker to drain
        and exit; past the drain and a margin, kill what is left."""
        with contextlib.suppress(OSError):
            # No new connection waits in the backlog for workers that are leaving.
            self._http.shutdown(socket.SHUT_RDWR)
        passed = 0
        deadline = time.monotonic() + drain_s + _EXIT_MARGIN_S
        failed = False
        while self._workers:
            while passed < max(1, len(self._signals)):
                for process in self._workers.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)
                passed += 1
            if time.monotonic() > deadline and not failed:
                for index, process in self._workers.items():
                    logger.error("worker %d did not stop in time; killing it", index)
                    process.kill()
                failed = True
            sentinels = {p.sentinel: i for i, p in self._workers.items()}
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.2):
                process = self._workers.pop(sentinels[sentinel])
                process.join()
                _mark_dead(process.pid, self._metrics_dir)
                failed = failed or process.exitcode != 0
        logger.info("every worker has stopped")
        return 1 if failed else 0


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def restart_pause(lived_s: float, failures: int) -> tuple[float, int]:
    """How long to wait before replacing a worker that lived `lived_s` after `failures`
    deaths in a row, and the new count: doubling from 1 s up to a minute while it keeps
    dying soon after starting, so a crash loop costs little CPU and floods no log."""
    failures = failures + 1 if lived_s < _STABLE_S else 1
    return min(_MAX_PAUSE_S, _RESTART_PAUSE_S * 2 ** (failures - 1)), failures


# The room a metrics folder must have: a few MiB of files a worker, with a margin.
_METRICS_ROOM = 64 * 2**20


def metrics_parent(candidates: tuple[Path, ...] = (Path("/dev/shm"),)) -> str | None:
    """Where the workers' metric files go: a memory-backed folder with room, when there is
    one, so that a full disk cannot reach them (they are written through memory maps, and a
    write that finds no room kills the process with SIGBUS); else None, the system's
    temporary folder."""
    for folder in candidates:
        try:
            usable = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
            if usable and shutil.disk_usage(folder).free >= _METRICS_ROOM:
                return str(folder)
        except OSError:
            continue
    logger.warning(
        "no memory-backed folder with %d MiB free for the metrics files; they go in %s, "
        "where a full disk would stop the workers",
        _METRICS_ROOM // 2**20,
        tempfile.gettempdir(),
    )
    return None


def listen(host: str, port: int) -> socket.socket:
    """The HTTP listening socket (every worker's, with several); SystemExit saying why not."""
    hint = " (set port; port 0 picks a free one)"
    sock = _bound(host, port, socket.SO_REUSEADDR, "cannot listen", hint)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _hold_grpc_port(settings: Settings) -> socket.socket:
    """Bind (without listening) the gRPC port with SO_REUSEPORT: it picks the port when 0,
    and keeps it for the workers, which listen on it side by side, restarts included."""
    return _bound(
        settings.host,
        settings.grpc_port,
        socket.SO_REUSEPORT,
        "gRPC cannot listen",
        " (set grpc_port, or grpc = false to serve HTTP only)",
    )


def _bound(host: str, port: int, option: int, failure: str, hint: str = "") -> socket.socket:
    """A TCP socket with `option` set, bound to host:port; SystemExit saying why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"gpuserve: {failure} on {host}:{port}: {exc.strerror}{hint}") from None
    return sock


def _mark_dead(pid: int | None, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges from the sums (its counters stay counted)."""
    from prometheus_client import multiprocess

    if pid is not None:
        multiprocess.mark_process_dead(pid, metrics_dir)


def _worker_main(
    target: Target,
    settings: Settings,
    http: socket.socket,
    slots: SynchronizedArray[Any],
    index: int,
    metrics_dir: str,
    replacing: bool,
    engine_address: str | None,
    parent: int,
) -> None:
    """A worker: the one-process server on the parent's socket."""
    # Its own process group: a terminal's Ctrl-C reaches the parent only, which passes it on
    # once, rather than every worker seeing it and then the parent's copy as a second one.
    os.setpgrp()
    _exit_with_parent()
    _name_process(f"gpuserve-w{index}".encode())
    if os.getppid() != parent:  # the parent died before the line above took effect
        raise SystemExit(1)
    from gpuserve.logs import configure as configure_logging

    configure_logging(settings.log_level, settings.log_format, worker=index)
    peers = Peers(slots, index, metrics_dir, engine_address)
    try:
        target(settings, [http], peers, replacing)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        if isinstance(exc.code, str):  # its message, which a plain status would not print
            print(exc.code, file=sys.stderr, flush=True)
        peers.give_up()
        raise SystemExit(1) from None


class _EngineProcess:
    """The engine: started before the fronts, restarted when it dies, stopped after them."""

    def __init__(self, context: Any, settings: Settings, address: str, metrics_dir: str) -> None:
        self._context, self._settings, self.address = context, settings, address
        self._metrics_dir = metrics_dir
        self.folder = os.path.dirname(address.removeprefix("ipc://"))
        self._process: Any = None
        self._started = 0.0
        self._failures = 0
        self._due: float | None = None

    def start(self) -> None:
        self._due = None
        process = self._context.Process(
            target=_engine_main,
            args=(self._settings, self.address, self._metrics_dir, os.getpid()),
            name="gpuserve-engine",
            daemon=False,
        )
        process.start()
        self._process, self._started = process, time.monotonic()
        logger.info("engine started (pid %d)", process.pid)

    def watched(self, now: float) -> list[Any]:
        """Its sentinel to wait on; started first if its restart is due."""
        if self._due is not None and self._due <= now:
            self.start()
        return [] if self._process is None else [self._process.sentinel]

    def died(self) -> None:
        process, self._process = self._process, None
        process.join()
        _mark_dead(process.pid, self._metrics_dir)
        lived_s = time.monotonic() - self._started
        pause, self._failures = restart_pause(lived_s, self._failures)
        logger.error(
            "engine (pid %d) died (exit %s); restarting it in %.0f s",
            process.pid,
            process.exitcode,
            pause,
        )
        self._due = time.monotonic() + pause

    def stop(self, drain_s: float) -> int:
        """Stop it once the fronts are gone; 1 if it had to be killed or failed."""
        process, self._process = self._process, None
        if process is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(drain_s + _EXIT_MARGIN_S)
        if process.exitcode is None:
            logger.error("the engine did not stop in time; killing it")
            process.kill()
            process.join()
        _mark_dead(process.pid, self._metrics_dir)
        return 0 if process.exitcode == 0 else 1


def _engine_main(settings: Settings, address: str, metrics_dir: str, parent: int) -> None:
    """The engine process (see `gpuserve.engine.process`)."""
    os.setpgrp()  # the supervisor passes a terminal's Ctrl-C on, once the fronts are done
    _exit_with_parent()
    _name_process(b"gpuserve-engine")
    if os.getppid() != parent:
        raise SystemExit(1)
    from gpuserve.engine.process import run_engine
    from gpuserve.logs import configure as configure_logging

    configure_logging(settings.log_level, settings.log_format, worker="engine")
    run_engine(settings, address, metrics_dir)


def _name_process(name: bytes) -> None:
    """The name `ps`, `top` and /proc/PID/comm show for this process (15 bytes at most)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name = 15
        libc.prctl(pr_set_name, ctypes.c_char_p(name[:15]))


def _exit_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies: no orphaned workers."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
