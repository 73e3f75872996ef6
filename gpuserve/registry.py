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

    def begin_shutdown(self) -> None:
        for service in self:
            service.begin_shutdown()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Drain every model at once, so the drain takes the slowest one's time, not the sum."""
        await asyncio.gather(*(service.stop(timeout_s) for service in self))

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
