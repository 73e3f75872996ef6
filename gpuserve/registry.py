"""ModelRegistry: the models a server serves, each its own ModelService, by name.

Each model loads, batches and fails on its own: one that fails to load leaves the others
serving. The server is ready when no model is still loading and at least one is ready;
readiness lists every model, so an operator sees which one failed and why.

Models can also be unloaded, loaded again, or reloaded while serving (the repository API):
a reload loads a new copy beside the one serving and swaps them only once it is ready, so no
request fails; the old copy then drains and its memory is released.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from gpuserve.config import ModelSettings, Settings
from gpuserve.device import DeviceInfo, probe, release_memory
from gpuserve.errors import Conflict, ModelLoadError, ModelNotFound, NotReady
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
        self._device = settings.device
        self._loader, self._metrics, self._prober = loader, metrics, prober
        # What can be loaded, by name: the configured models (the repository's own are added
        # when first loaded), and what is loaded now.
        self.configured = {model.key: model for model in settings.served_models}
        self._services = {key: self._service(model) for key, model in self.configured.items()}
        self.default_name = next(iter(self.configured))
        self._changing: set[str] = set()
        self._drain: asyncio.Future[Any] | None = None

    def _service(self, model: ModelSettings) -> ModelService:
        return ModelService(model, self._device, self._loader, self._metrics, self._prober)

    @property
    def default(self) -> ModelService:
        """The model /predict serves; NotReady (503) while it is unloaded."""
        return self.get(self.default_name)

    def __iter__(self) -> Iterator[ModelService]:
        return iter(self._services.values())

    def __len__(self) -> int:
        return len(self._services)

    def get(self, name: str) -> ModelService:
        """The named model's service: ModelNotFound (404) for a name the server does not
        know, NotReady (503) for a known model that is unloaded."""
        service = self._services.get(name)
        if service is not None:
            return service
        if name in self.configured:
            raise NotReady(f"model {name!r} is unloaded", retry_after_s=30)
        known = ", ".join(self._services)
        raise ModelNotFound(f"no model named {name!r}; this server has: {known}")

    def find(self, name: str) -> ModelService | None:
        """The named model's service if it is loaded (or loading), else None."""
        return self._services.get(name)

    def state_of(self, name: str) -> tuple[str, str | None]:
        """A known model's state and reason, unloaded ones included."""
        service = self.find(name)
        if service is None:
            return "unloaded", "unloaded through the repository API"
        return service.state, service.reason

    async def load(self, model: ModelSettings, drain_s: float) -> ModelService:
        """Load `model`, or reload it when it is loaded: the new copy loads beside the one
        serving and replaces it only once ready, then the old copy drains for up to `drain_s`
        and is released. ModelLoadError with the reason if the new copy fails; the old one
        keeps serving."""
        name = model.key
        self._claim(name)
        try:
            fresh = self._service(model)
            await fresh.start()
            await fresh.loaded()
            if fresh.state != "ready":
                await fresh.stop(0)
                fresh.release()
                raise ModelLoadError(fresh.reason or f"{name} failed to load")
            self.configured[name] = model
            old = self._services.get(name)
            self._services[name] = fresh
            if old is not None:
                await self._retire(old, drain_s)
            fresh.publish_ready()
            return fresh
        finally:
            self._changing.discard(name)

    async def unload(self, name: str, drain_s: float) -> None:
        """Stop serving `name`: its accepted requests are answered (for up to `drain_s`),
        then its memory is released. It stays known, and can be loaded again."""
        self.get(name)  # 404 for an unknown name
        self._claim(name)
        try:
            await self._retire(self._services.pop(name), drain_s)
        finally:
            self._changing.discard(name)

    def _claim(self, name: str) -> None:
        if name in self._changing:
            raise Conflict(f"model {name!r} is being loaded or unloaded already")
        if self._drain is not None:
            raise NotReady("the server is shutting down", retry_after_s=5)
        self._changing.add(name)

    async def _retire(self, service: ModelService, drain_s: float) -> None:
        await service.stop(drain_s)
        service.release()
        release_memory()

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
        default = self.find(self.default_name)
        if len(self) == 1 and default is not None and default.state != "ready":
            reason = default.readiness().get("reason")
            if reason is not None:
                body["reason"] = reason
        body["models"] = {service.name: service.readiness() for service in self}
        for name in self.configured.keys() - self._services.keys():
            body["models"][name] = {"status": "unloaded"}
        return body
