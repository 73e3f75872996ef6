"""ModelService: one model's life in the server, from background load to drained shutdown.

It owns the load thread, the batcher, and the readiness state the health checks report. It knows
nothing of HTTP: `app` turns its answers and errors into responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

from gpuserve.config import ModelSettings, available_cores
from gpuserve.core.batcher import BatchStats, MicroBatcher, Trace
from gpuserve.core.deadlines import DeadlinePassed, Deadlines
from gpuserve.core.errors import (
    DeadlineExceeded,
    GpuserveError,
    InferenceError,
    InvalidInput,
    NotReady,
    Overloaded,
)
from gpuserve.core.isolation import is_memory_error, never_fatal
from gpuserve.core.metrics import Metrics
from gpuserve.core.progress import LoadProgress, tracking
from gpuserve.model.device import DeviceInfo, passes_share_cores, probe
from gpuserve.spec import Instance, ModelSpec

logger = logging.getLogger("gpuserve.core.service")

State = Literal["loading", "ready", "failed", "stopping"]


class BatchModel(Protocol):
    """What a loader returns: a spec, and a batch function of validated instances.

    It may also have a Runner's `preprocess`, `postprocess`, `bucket` and `is_oom`; those
    it lacks default to doing nothing.
    """

    spec: ModelSpec

    def __call__(self, items: list[Any], /) -> list[Any]: ...


Loader = Callable[[ModelSettings, DeviceInfo], BatchModel]


class ModelService:
    """Loads a model in a background thread and serves it through a MicroBatcher."""

    def __init__(
        self,
        settings: ModelSettings,
        device: str,
        loader: Loader,
        metrics: Metrics,
        prober: Callable[[str], DeviceInfo] = probe,
    ) -> None:
        self.settings = settings
        self.name = settings.key
        self.version = str(settings.version)
        self.title = settings.title  # for logs: the name, and the version past 1
        self.key_labels = (self.name, self.version)  # (name, version): metric labels and log fields
        # The queue level of a request that names no priority (0, the highest, without levels).
        levels = settings.priority_levels
        self.default_level = (settings.default_priority_level or levels) - 1 if levels else 0
        # Set by the registry once this copy has left its table (replaced, or unloaded).
        self.retired = False
        self._device_request = settings.device or device
        self._loader = loader
        self._prober = prober
        self._metrics = metrics
        self._state: State = "loading"
        self._reason: str | None = None
        self._load_task: asyncio.Task[None] | None = None
        self.model: BatchModel | None = None
        self.device: DeviceInfo | None = None
        self.devices: list[DeviceInfo] = []
        self.batcher: MicroBatcher[Any, Any] | None = None
        self._deadlines = Deadlines()
        # Calls admitted (their spec read) and not yet answered: a drain waits for them before
        # it closes the batcher, so that one still being received or decoded at a stop
        # signal is answered, not refused.
        self._admitted = 0
        self._none_admitted = asyncio.Event()
        self._none_admitted.set()
        self._preprocess: Callable[[Instance], Any] | None = None
        self._postprocess: Callable[[Any], Any] | None = None
        self.progress = LoadProgress(self.title)
        metrics.track_queue_depth(
            self.name, self.version, lambda: self.batcher.queue_depth if self.batcher else 0
        )

    @property
    def state(self) -> State:
        if self._state == "ready" and self.batcher is not None and self.batcher.error is not None:
            return "failed"
        return self._state

    @property
    def reason(self) -> str | None:
        """Why the service is not ready, in words a client can act on."""
        if self.batcher is not None and self.batcher.error is not None:
            return self.batcher.error
        return self._reason

    @property
    def max_batch_size(self) -> int:
        """The configured cap, or the loader's measured one where that is smaller."""
        preferred = getattr(self.model, "preferred_batch_size", None)
        configured = self.settings.max_batch_size
        return min(configured, preferred) if preferred else configured

    @property
    def spec(self) -> ModelSpec:
        """The model's spec; raises NotReady until the model has loaded."""
        if self.model is None or self.state != "ready":
            raise self._not_ready()
        return self.model.spec

    def admit(self) -> ModelSpec:
        """Admit a call: its spec (NotReady unless the model is ready). Until `leave`, a
        stop waits for it, within its drain time, before it closes the batcher."""
        model = self.model
        if model is None or self.state != "ready":
            raise self._not_ready()
        self._admitted += 1
        self._none_admitted.clear()
        return model.spec

    def leave(self) -> None:
        """An admitted call has its answer, or has failed."""
        self._admitted -= 1
        if not self._admitted:
            self._none_admitted.set()

    async def start(self) -> None:
        """Start loading in the background and return at once."""
        self._load_task = asyncio.create_task(self._load(), name="gpuserve-load")

    async def loaded(self) -> None:
        """Wait until the load has finished, whether it succeeded or failed."""
        if self._load_task is not None:
            await asyncio.gather(asyncio.shield(self._load_task), return_exceptions=True)

    def level_of(self, priority: int) -> int:
        """The queue level of a request's priority (1 the highest; 0 the default); InvalidInput
        for one this model does not have."""
        levels = self.settings.priority_levels
        if priority == 0:
            return self.default_level
        if not levels:
            raise InvalidInput(
                f"priority {priority}: model {self.title!r} has no priority levels "
                "(set priority_levels)"
            )
        if not 1 <= priority <= levels:
            raise InvalidInput(f"priority must be from 1 (the highest) to {levels}, not {priority}")
        return priority - 1

    async def predict(
        self,
        instances: list[Instance],
        timeout_s: float,
        *,
        postprocess: bool = True,
        trace: Trace | None = None,
        level: int = 0,
    ) -> list[Any]:
        """Run validated instances through the batcher; one result per instance, in order.

        Each instance goes through the model's `preprocess` first, and each result through its
        `postprocess` unless `postprocess` is False (protocols that return raw tensors).
        Past `timeout_s` the request fails with DeadlineExceeded, and its instances are dropped
        from the queue (or their results from the forward pass already under way). `level`
        is the request's queue level (`level_of`).
        """
        batcher = self.batcher
        # While stopping, calls admitted before the stop still reach the batcher, which
        # takes them until its drain begins.
        if batcher is None or self.state not in ("ready", "stopping"):
            raise self._not_ready()
        if self._preprocess is not None:
            if self.settings.offload_hooks:
                instances = await asyncio.to_thread(self._run_preprocess, instances)
            else:
                instances = self._run_preprocess(instances)
        try:
            futures = batcher.submit_many(instances, trace, level)
        except Overloaded:
            self._metrics.refused.labels(self.name, self.version).inc()
            raise
        deadline = self._deadlines.add(timeout_s, lambda: batcher.fail(futures, DeadlinePassed))
        try:
            # One instance, the common case, needs no gathering future of its own.
            if len(futures) == 1:
                results = [await futures[0]]
            else:
                results = list(await asyncio.gather(*futures))
        except Exception as exc:
            failure = self._failure(exc, timeout_s)
            if failure is exc:
                raise
            raise failure from (None if isinstance(failure, DeadlineExceeded) else exc)
        finally:
            self._deadlines.discard(deadline)
            # Cancelled futures are skipped when batches form, and leave the queue's count.
            batcher.release(futures)
        if postprocess and self._postprocess is not None:
            if self.settings.offload_hooks:
                return await asyncio.to_thread(
                    _run_hook, self._postprocess, results, "postprocessing failed"
                )
            return _run_hook(self._postprocess, results, "postprocessing failed")
        return results

    def submit(
        self,
        instances: list[Instance],
        timeout_s: float,
        *,
        postprocess: bool = True,
        trace: Trace | None = None,
        level: int = 0,
    ) -> asyncio.Future[list[Any]]:
        """`predict` as a future rather than a coroutine: the same rows or error, with no task
        of its own, for a caller with many calls in hand at once (the engine). Cancelling the
        future takes the instances out of the queue. NotReady and Overloaded raise at once."""
        hooked = self._preprocess is not None or (self._postprocess is not None and postprocess)
        if hooked and self.settings.offload_hooks:  # a thread hand-off needs a coroutine
            return asyncio.ensure_future(
                self.predict(
                    instances, timeout_s, postprocess=postprocess, trace=trace, level=level
                )
            )
        batcher = self.batcher
        if batcher is None or self.state not in ("ready", "stopping"):
            raise self._not_ready()
        if self._preprocess is not None:
            instances = self._run_preprocess(instances)
        try:
            futures = batcher.submit_many(instances, trace, level)
        except Overloaded:
            self._metrics.refused.labels(self.name, self.version).inc()
            raise
        rows: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        deadline = self._deadlines.add(timeout_s, lambda: batcher.fail(futures, DeadlinePassed))
        waiting = len(futures)
        hook = self._postprocess if postprocess else None

        def settle(done: asyncio.Future[Any]) -> None:
            nonlocal waiting
            waiting -= 1
            if done.cancelled():  # only a release cancels one: the call is over
                if not rows.done():
                    rows.cancel()
                return
            failed = done.exception() is not None
            if rows.done() or (waiting and not failed):
                return
            self._deadlines.discard(deadline)
            batcher.release(futures)
            if failed:  # the first failure answers, as gather's would
                exc = done.exception()
                assert exc is not None
                failure = self._failure(exc, timeout_s)
                if failure is not exc and not isinstance(failure, DeadlineExceeded):
                    failure.__cause__ = exc
                rows.set_exception(failure)
                return
            results = [future.result() for future in futures]
            try:
                rows.set_result(
                    results if hook is None else _run_hook(hook, results, "postprocessing failed")
                )
            except GpuserveError as error:
                rows.set_exception(error)

        def abandoned(done: asyncio.Future[list[Any]]) -> None:
            if done.cancelled():
                self._deadlines.discard(deadline)
                batcher.release(futures)

        for future in futures:
            future.add_done_callback(settle)
        rows.add_done_callback(abandoned)
        return rows

    def _failure(self, exc: BaseException, timeout_s: float) -> BaseException:
        """What a call answers for an error of its instances (a deadline counted)."""
        if isinstance(exc, DeadlinePassed):
            self._metrics.timed_out.labels(self.name, self.version).inc()
            return DeadlineExceeded(f"no result within the request's {timeout_s:g}s deadline")
        if isinstance(exc, GpuserveError) or not isinstance(exc, Exception):
            return exc
        return InferenceError("inference failed")

    def _run_preprocess(self, instances: list[Instance]) -> list[Any]:
        assert self._preprocess is not None
        return _run_hook(self._preprocess, instances, "preprocessing failed")

    def publish_ready(self) -> None:
        """Set this model's readiness gauge from its state (after a replaced copy's stop)."""
        self._metrics.ready.labels(self.name, self.version).set(1 if self.state == "ready" else 0)

    def release(self) -> None:
        """Drop the model and its batcher, once stopped, so their memory can be freed."""
        self.model = None
        self.batcher = None
        self._preprocess = self._postprocess = None

    def begin_shutdown(self) -> None:
        """Refuse new requests and report not ready, while accepted requests finish."""
        self._state = "stopping"
        self._reason = "the server is shutting down"
        self._metrics.ready.labels(self.name, self.version).set(0)

    def abort(self) -> None:
        """Answer every accepted request now (503), for a forced stop."""
        self.begin_shutdown()
        if self.batcher is not None:
            self.batcher.abort("the server is stopping")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, answer what was accepted, and release the worker."""
        self.begin_shutdown()
        if self._load_task is not None and not self._load_task.done():
            # A load thread cannot be interrupted; it is a daemon and dies with the process.
            self._load_task.cancel()
        if self._load_task is not None:
            await asyncio.gather(self._load_task, return_exceptions=True)
        began = time.monotonic()
        if self._admitted:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_admitted.wait(), timeout_s)
        if self.batcher is not None:
            await self.batcher.stop(max(0.0, timeout_s - (time.monotonic() - began)))
        self._deadlines.close()  # every accepted request is answered by now

    def readiness(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.state}
        if self.reason is not None and self.state != "ready":
            body["reason"] = self.reason
        if self.state == "loading":
            body["progress"] = self.progress.to_dict()
        return body

    async def _load(self) -> None:
        try:
            copies, devices = await _in_daemon_thread(self._load_blocking)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            return
        if self._state == "stopping":
            return
        model, device = copies[0], devices[0]
        self.model, self.device, self.devices = model, device, devices
        self._preprocess = _hook(model, "preprocess")
        self._postprocess = _hook(model, "postprocess")
        self.batcher = MicroBatcher(
            copies,
            max_batch_size=self.max_batch_size,
            max_wait_s=self.settings.max_wait_ms / 1000.0,
            hold_for_callers=self.settings.hold_for_callers,
            overlap=not passes_share_cores(devices, len(copies), available_cores()),
            max_queue_size=self.settings.max_queue_size,
            forward_timeout_s=self.settings.forward_timeout_s,
            oom_cooldown_s=self.settings.oom_cooldown_s,
            is_oom=getattr(model, "is_oom", is_memory_error),
            is_fatal=getattr(model, "is_fatal", never_fatal),
            name=self.title,
            on_batch=self._observe_batch,
            bucket_of=_hook(model, "bucket") if self.settings.length_buckets else None,
        )
        await self.batcher.start()
        # A compiled model compiles its graphs now, at warm-up: the long part of its start.
        self.progress.enter("warming up" if self.settings.compile == "off" else "compiling")
        try:
            # Warm-up, tuning and CUDA graph capture happen in each copy's own worker thread,
            # the thread that will serve it (see Runner.warm).
            await self.batcher.on_each_worker(_warm)
        except Exception as exc:
            await self.batcher.stop(0)
            self._failed(exc)
            return
        # The batch cap the copies measured while warming up.
        self.batcher.max_batch_size = self.max_batch_size
        if self.settings.freeze_gc:
            freeze_gc()
        self._state = "ready"
        self._metrics.ready.labels(self.name, self.version).set(1)
        logger.info(
            "%s is ready: %d cop%s on %s (%s); %s",
            self.title,
            len(copies),
            "y" if len(copies) == 1 else "ies",
            ", ".join(d.device for d in devices),
            device.reason,
            "the next batch is handed over while a pass runs"
            if self.batcher.overlap
            else "its passes fill the cores the event loop runs on, so batches grow until a "
            "copy is free",
        )

    def _failed(self, exc: Exception) -> None:
        self._state = "failed"
        self._reason = f"model failed to load: {exc}"
        if isinstance(exc, GpuserveError):
            # The user's own mistake (a missing file, a spec that does not fit): one clear
            # line; the traceback only at debug level.
            logger.error("%s: %s", self.title, self._reason)
            logger.debug("%s: where the load failed", self.title, exc_info=exc)
        else:  # a bug, ours or in a user's code: the traceback belongs in the log
            logger.error("%s: %s", self.title, self._reason, exc_info=exc)

    def _load_blocking(self) -> tuple[list[BatchModel], list[DeviceInfo]]:
        """One copy per device and instance; the first is the one readiness and /info report."""
        with tracking(self.progress):
            return self._load_copies()

    def _load_copies(self) -> tuple[list[BatchModel], list[DeviceInfo]]:
        self.progress.enter("finding the device")
        devices = self._placement()
        copies = []
        for device in devices:
            count = self.settings.instances_per_device
            logger.info(
                "loading %s: %d cop%s on %s (%s), chosen because %s",
                self.title,
                count,
                "y" if count == 1 else "ies",
                device.device,
                device.name,
                device.reason,
            )
            self.progress.enter("loading")
            copies += [
                self._loader(self.settings, device)
                for _ in range(self.settings.instances_per_device)
            ]
        return copies, devices

    def _placement(self) -> list[DeviceInfo]:
        """The devices to hold a copy: the one probed, or with `all` every visible GPU."""
        best = self._prober(self._device_request)
        if self._device_request != "all" or best.kind != "cuda":
            return [best]
        return [self._prober(f"cuda:{index}") for index in range(best.visible_devices)]

    def _observe_batch(self, stats: BatchStats) -> object:
        """Count a finished batch; where traces are on, write its span and return its
        context, for its calls' spans to link to."""
        self._metrics.observe_batch(
            self.name,
            self.version,
            stats.size,
            stats.queue_wait_s,
            stats.forward_s,
            stats.failed_items,
            stats.oom_splits,
            stats.queue_wait_total_s,
        )
        traces = self._metrics.traces
        if traces is None:
            return None
        device = self.devices[stats.worker].device if stats.worker < len(self.devices) else ""
        return traces.batch(self.name, self.version, device, stats)

    def _not_ready(self) -> NotReady:
        state = self.state
        if state == "loading":
            return NotReady("the model is still loading", retry_after_s=2)
        if state == "stopping":
            return NotReady("the server is shutting down", retry_after_s=5)
        return NotReady(f"the model is unavailable: {self.reason}", retry_after_s=30)


def _run_hook(hook: Callable[[Any], Any], values: list[Any], failure: str) -> list[Any]:
    """A user's hook on each value. Whatever it raises is this request's 500, never the
    server's: on the event loop even SystemExit from a hook is a bug in the hook, not a
    request to stop (InvalidInput and the other GpuserveErrors keep their status)."""
    try:
        return [hook(value) for value in values]
    except GpuserveError:
        raise
    except BaseException as exc:
        raise InferenceError(failure) from exc


def _warm(model: Any) -> None:
    """A copy's own warm-up, where it has one (a Handler does)."""
    warm = getattr(model, "warm", None)
    if callable(warm):
        warm()


def _hook(model: BatchModel, name: str) -> Callable[[Any], Any] | None:
    hook: Callable[[Any], Any] | None = getattr(model, name, None)
    return hook


def freeze_gc() -> None:
    """Move everything alive now (torch, the model, the app) out of the collector's sight.

    With torch loaded, a full collection walks millions of objects and stalls the event loop
    for 100-200 ms; under load that was the whole p99 (186 ms against 11 ms frozen, measured
    with scripts/load_test.py). Objects made later are still collected as usual.
    """
    gc.collect()
    gc.freeze()


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Like asyncio.to_thread, but on a daemon thread, so a slow load never blocks exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:
            result, exc = None, error
        # A closed loop means the server stopped while we loaded: nobody is waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name="gpuserve-load", daemon=True).start()
    return await future
