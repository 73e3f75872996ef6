"""ModelRegistry: the models a server serves, each its own ModelService, by name.

Each model loads, batches and fails on its own: one that fails to load leaves the others
serving. The server is ready when no model is still loading and at least one is ready;
readiness lists every model, so an operator sees which one failed and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from gpuserve.config import Settings
from gpuserve.device import DeviceInfo, probe
from gpuserve.errors import ModelNotFound
from gpuserve.metrics import Metrics
from gpuserve.service import Loader, ModelService


class ModelRegistry:
    """The served models; the first one is the default, served at `/predict`."""

    def __init__(
        self,
        settings: Settings,
        loader: Loader,
        metrics: Metrics,
        prober: Callable[[str], DeviceInfo] = probe,
    ) -> None:
        self._services = {
            model.key: ModelService(model, settings.device, loader, metrics, prober)
            for model in settings.served_models
        }
        self.default = next(iter(self._services.values()))
        self._drain: asyncio.Future[Any] | None = None

    def __iter__(self) -> Iterator[ModelService]:
        return iter(self._services.values())

    def __len__(self) -> int:
        return len(self._services)

    def get(self, name: str) -> ModelService:
        """The named model's service, or ModelNotFound (404)."""
        try:
            return self._services[name]
        except KeyError:
            known = ", ".join(self._services)
            raise ModelNotFound(f"no model named {name!r}; this server has: {known}") from None

    async def start(self) -> None:
        """Start every model loading in the background; returns at once."""
        for service in self:
            await service.start()

    async def loaded(self) -> None:
        """Wait until every model has finished loading, or failed to."""
        await asyncio.gather(*(service.loaded() for service in self))

    def begin_shutdown(self, drain_s: float | None = None) -> None:
        """Refuse new requests and report not ready; with `drain_s`, start draining now.

        Called when a stop signal arrives. Draining from that moment, rather than once the
        HTTP server has waited for its connections, keeps the whole stop within `drain_s`:
        what is left then is answered 503 while the connections are still open.
        """
        for service in self:
            service.begin_shutdown()
        if drain_s is not None:
            self._start_drain(drain_s)

    def abort(self) -> None:
        """Answer every accepted request at once (503): a second stop signal."""
        for service in self:
            service.abort()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain every model at once, so the drain takes the slowest one's time, not the sum.

        If a drain began at the stop signal, this waits for that one."""
        await self._start_drain(timeout_s)

    def _start_drain(self, timeout_s: float) -> asyncio.Future[Any]:
        if self._drain is None:
            self._drain = asyncio.gather(*(service.stop(timeout_s) for service in self))
        return self._drain

    @property
    def status(self) -> str:
        """ready, loading, failed or stopping, for the server as a whole."""
        states = [service.state for service in self]
        if "stopping" in states:
            return "stopping"
        if "loading" in states:
            return "loading"
        return "ready" if "ready" in states else "failed"

    def readiness(self) -> dict[str, Any]:
        """The server's status, and each model's state (with the reason when not ready)."""
        body: dict[str, Any] = {"status": self.status}
        if len(self) == 1 and self.default.state != "ready":
            reason = self.default.readiness().get("reason")
            if reason is not None:
                body["reason"] = reason
        body["models"] = {service.name: service.readiness() for service in self}
        return body
