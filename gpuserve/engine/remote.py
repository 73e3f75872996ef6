"""A front's model: the `ModelService` contract, its batches run by the engine.

Its state follows the engine's (loading until the engine's copy is ready, failed with its
reason); `predict` sends the instances to the engine and waits for the rows. A front's own
timer backs the engine's deadline, so a request never waits past its deadline plus a
margin, whatever the engine does; a caller that goes away takes its request out of the
engine's queue.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gpuserve.config import ModelSettings
from gpuserve.core.batcher import Trace
from gpuserve.core.deadlines import DeadlinePassed
from gpuserve.core.errors import DeadlineExceeded
from gpuserve.core.metrics import Metrics
from gpuserve.core.service import ModelService, freeze_gc
from gpuserve.engine import wire
from gpuserve.engine.link import EngineLink
from gpuserve.spec import Instance, ModelSpec

_DEADLINE_MARGIN_S = 1.0  # past the request's deadline, for the engine's own answer to arrive


class _RemoteModel:
    """What a front knows of a model the engine holds."""

    def __init__(self, spec: ModelSpec, max_batch_size: int) -> None:
        self.spec = spec
        self.preferred_batch_size = max_batch_size

    def __call__(self, items: list[Any], /) -> list[Any]:  # pragma: no cover - never batched here
        raise RuntimeError("a front runs no batches; the engine does")


def _no_loader(settings: ModelSettings, device: Any) -> Any:  # pragma: no cover
    raise RuntimeError("a front loads no model; the engine does")


class RemoteService(ModelService):
    """One model of a front, served by the engine."""

    def __init__(self, settings: ModelSettings, link: EngineLink, metrics: Metrics) -> None:
        super().__init__(settings, "cpu", _no_loader, metrics)
        self._link = link
        self.copies = 0
        self._engine_progress: dict[str, Any] | None = None
        self._frozen = False

    async def start(self) -> None:
        """Follow the engine's state of this model from now on."""
        self._link.listeners.append(self._follow)
        self._follow()

    async def stop(self, timeout_s: float = 30.0) -> None:
        if self._follow in self._link.listeners:
            self._link.listeners.remove(self._follow)
        await super().stop(timeout_s)

    def _follow(self) -> None:
        if self._state == "stopping":
            return
        state = self._link.states.get(self.key_labels)
        if state is None:  # no engine yet, or it is being replaced
            self._state, self._reason = "loading", None
            self._engine_progress = None
        else:
            self._state = state.state if state.state != "stopping" else "loading"  # type: ignore[assignment]
            self._reason = state.reason
            self._engine_progress = state.progress
            if state.spec is not None:
                self.model = _RemoteModel(state.spec, state.max_batch_size)
            if state.state == "ready" and self.settings.freeze_gc and not self._frozen:
                # As a server with the model does once ready: torch is imported here too,
                # and a full collection would stall the loop for 100 ms or more.
                self._frozen = True
                freeze_gc()
                self.devices = list(state.devices)
                self.device = self.devices[0] if self.devices else None
                self.copies = state.copies
        self.publish_ready()

    async def loaded(self) -> None:
        """Until the engine's copy has loaded or failed (or this service stops)."""
        while self.state == "loading":
            await self._link.changed()

    def readiness(self) -> dict[str, Any]:
        body = super().readiness()
        if "progress" in body and self._engine_progress is not None:
            body["progress"] = self._engine_progress
        return body

    async def predict(
        self,
        instances: list[Instance],
        timeout_s: float,
        *,
        postprocess: bool = True,
        trace: Trace | None = None,
        level: int = 0,
    ) -> list[Any]:
        """The instances' rows from the engine, in order (see `ModelService.predict`)."""
        if self.state not in ("ready", "stopping"):
            raise self._not_ready()
        link = self._link
        request = wire.Request(
            link.next_id(),
            self.key_labels,
            instances,
            time.monotonic() + timeout_s,
            postprocess,
            "" if trace is None else trace.request_id,
            level,
        )
        future = link.submit(request)
        deadline = self._deadlines.add(timeout_s + _DEADLINE_MARGIN_S, lambda: _expire(future))
        try:
            answer = await future
        except DeadlinePassed:
            link.abort(request.id)
            raise DeadlineExceeded(
                f"no result within the request's {timeout_s:g}s deadline"
            ) from None
        except asyncio.CancelledError:
            link.abort(request.id)
            raise
        finally:
            self._deadlines.discard(deadline)
        if trace is not None:
            wire.fill_trace(trace, answer.trace)
        if answer.error is not None:
            raise wire.error_from(answer.error)
        assert answer.rows is not None
        return answer.rows


def _expire(future: asyncio.Future[wire.Answer]) -> None:
    if not future.done():
        future.set_exception(DeadlinePassed())
