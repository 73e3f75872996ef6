"""The engine process: every model's one copy set and batcher, fed by the fronts.

It loads the configured models as one server process would (a `ModelService` each), binds
a ZeroMQ ROUTER socket, and for each request a front sends runs the model's `predict`:
hooks, batching, deadlines and statistics happen here, where the batch runs. Answers go
back to their front once per event-loop turn. Model states go to every front when they
change, and to a front that says hello.

The supervisor stops the engine last, once every front has drained: what a front still
waits for is answered first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from gpuserve.config import Settings
from gpuserve.core.batcher import Trace
from gpuserve.core.errors import GpuserveError
from gpuserve.core.metrics import Metrics
from gpuserve.core.service import Loader, ModelService
from gpuserve.engine import wire

logger = logging.getLogger("gpuserve.engine")

_STATE_POLL_S = 0.05  # how soon a front learns a model changed state (loads are rare)
_METRICS_REFRESH_S = 0.1  # as often as a worker shares its statistics


class Engine:
    """The models and the socket the fronts reach them on."""

    def __init__(self, settings: Settings, address: str, loader: Loader, metrics: Metrics) -> None:
        self._settings, self._address, self.metrics = settings, address, metrics
        self.services = {
            (model.key, str(model.version)): ModelService(model, settings.device, loader, metrics)
            for model in settings.served_models
        }
        self._fronts: set[bytes] = set()
        self._answers: dict[bytes, list[wire.Answer]] = {}
        self._calls: dict[tuple[bytes, int], asyncio.Future[list[Any]]] = {}
        self._flush_due = False
        self._sent: dict[tuple[str, str], tuple[str, str | None]] = {}
        self.router: zmq.asyncio.Socket | None = None
        self.lost: str | None = None  # why the engine ended itself, if it did
        self._stopped = asyncio.Event()

    async def run(self, stopped: asyncio.Event) -> None:
        """Serve the fronts until `stopped` is set, then answer what is left and stop; or
        until a model is `lost`, when the process must end to be replaced."""
        self._stopped = stopped
        # The batches' spans are written here, where they run; the calls' by the fronts.
        if self._settings.traces:
            from gpuserve.core.tracing import Tracing  # an extra: imported only when on

            self.metrics.traces = Tracing.over_otlp()
        context = zmq.asyncio.Context()
        sock = self.router = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.bind(self._address)
        for service in self.services.values():
            await service.start()
        tasks = [
            asyncio.create_task(self._receive(sock), name="gpuserve-engine-receive"),
            asyncio.create_task(self._publish_states(), name="gpuserve-engine-states"),
            asyncio.create_task(self._refresh_metrics(), name="gpuserve-engine-metrics"),
        ]
        try:
            await stopped.wait()
        finally:
            timeout_s = self._settings.shutdown_timeout_s
            await asyncio.gather(*(s.stop(timeout_s) for s in self.services.values()))
            # Every call has its answer now (the stops answered what was queued).
            if self._calls:
                await asyncio.wait(list(self._calls.values()), timeout=1.0)
            self._flush()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.refresh()
            if self.metrics.traces is not None:
                self.metrics.traces.close()
            sock.close()
            context.term()

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            front, *frames = await sock.recv_multipart(copy=False)
            identity = front.bytes
            try:
                kind, payload = wire.unpack(frames)
            except Exception:  # only our own processes reach this socket: a bug, logged
                logger.exception("a message from a front could not be read")
                continue
            if kind == wire.INFER:
                for request in payload:
                    self._start_call(identity, request)
            elif kind == wire.ABORT:
                for call_id in payload:
                    call = self._calls.get((identity, call_id))
                    if call is not None:
                        call.cancel()
            elif kind == wire.HELLO:
                self._fronts.add(identity)
                await sock.send_multipart([identity, *wire.pack(wire.STATES, self._states())])

    def _start_call(self, front: bytes, request: wire.Request) -> None:
        service = self.services.get(request.model)
        answer = wire.Answer(request.id)
        if service is None:  # the fronts serve the same settings: a bug if it happens
            answer.error = ("ModelNotFound", "no such model", None)
            self._answer(front, answer)
            return
        trace = Trace(request_id=request.request_id)
        try:
            rows = service.submit(
                request.instances,
                max(0.0, request.deadline - time.monotonic()),
                postprocess=request.postprocess,
                trace=trace,
                level=request.level,
            )
        except Exception as exc:  # not ready, or the queue is full
            answer.error = wire.error_of(exc)
            self._answer(front, answer)
            return
        key = (front, request.id)
        self._calls[key] = rows
        rows.add_done_callback(functools.partial(self._answered, front, answer, trace))

    def _answered(
        self, front: bytes, answer: wire.Answer, trace: Trace, rows: asyncio.Future[list[Any]]
    ) -> None:
        self._calls.pop((front, answer.id), None)
        if rows.cancelled():  # its caller is gone: nobody to answer
            return
        error = rows.exception()
        if error is None:
            answer.rows = rows.result()
        else:
            # The traceback stays here, where it happened: the front gets the message only.
            if not isinstance(error, GpuserveError) or error.__cause__ is not None:
                logger.error("request %s failed in the engine", trace.request_id, exc_info=error)
            answer.error = wire.error_of(error)
        answer.trace = wire.trace_fields(trace)
        self._answer(front, answer)

    def _answer(self, front: bytes, answer: wire.Answer) -> None:
        self._answers.setdefault(front, []).append(answer)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send each front the answers this event-loop turn produced, in one message."""
        self._flush_due = False
        answers, self._answers = self._answers, {}
        assert self.router is not None
        for front, batch in answers.items():
            self._send(front, wire.pack(wire.ANSWERS, batch))

    def _send(self, front: bytes, frames: list[Any]) -> None:
        """Send without waiting; a front that is gone loses its answers with it."""
        assert self.router is not None
        try:
            sending = wire.send_now(self.router, [front, *frames])
        except zmq.ZMQError:  # the socket is closed: the engine is stopping
            return
        sending.add_done_callback(wire.ignore_failure)

    def _states(self) -> list[wire.ModelState]:
        return [self._state_of(key, service) for key, service in self.services.items()]

    def _state_of(self, key: tuple[str, str], service: ModelService) -> wire.ModelState:
        state = wire.ModelState(key, service.state, service.reason)
        if service.model is not None:
            state.spec = service.model.spec
            state.devices = service.devices
            state.max_batch_size = service.max_batch_size
            state.copies = service.batcher.workers if service.batcher is not None else 0
        if service.state == "loading":
            state.progress = service.progress.to_dict()
        return state

    async def _publish_states(self) -> None:
        """Tell every front when a model's state changes (loaded, failed, stalled)."""
        assert self.router is not None
        while True:
            await asyncio.sleep(_STATE_POLL_S)
            for service in self.services.values():
                if self.lost is None and service.batcher is not None and service.batcher.lost:
                    # A sticky device error: this process's CUDA context is gone for good.
                    self.lost = f"{service.title}: {service.reason}"
                    logger.critical("no copy of %s can serve; the engine ends", self.lost)
                    self._stopped.set()
            current: dict[tuple[str, str], tuple[str, str | None]] = {
                key: (s.state, s.reason) for key, s in self.services.items()
            }
            if current == self._sent:
                continue
            self._sent = current
            message = wire.pack(wire.STATES, self._states())
            for front in list(self._fronts):
                self._send(front, message)

    async def _refresh_metrics(self) -> None:
        while True:
            await asyncio.sleep(_METRICS_REFRESH_S)
            self.metrics.refresh()


def run_engine(
    settings: Settings,
    address: str,
    metrics_dir: str | None,
    loader: Callable[..., Any] | None = None,
) -> None:
    """The engine process's main: serve until SIGTERM (the supervisor's, once the fronts
    are gone), then drain and return."""
    if loader is None:
        from gpuserve.model.loading import build_model

        loader = build_model

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        # A terminal's Ctrl-C is the supervisor's to pass on, as SIGTERM, once fronts drain.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        engine = Engine(settings, address, loader, Metrics(metrics_dir))
        logger.info("engine serving %d model(s) on %s", len(engine.services), address)
        await engine.run(stopped)
        if engine.lost is not None:
            raise SystemExit(1)  # the supervisor starts a new engine
        logger.info("engine stopped")

    asyncio.run(main())
