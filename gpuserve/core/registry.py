"""ModelRegistry: the models a server serves, each its own ModelService, by name and version.

Each model loads, batches and fails on its own: one that fails to load leaves the others
serving. The server is ready when no model is still loading and at least one is ready;
readiness lists every model, so an operator sees which one failed and why.

Models can also be unloaded, loaded again, or reloaded while serving (the repository API):
a reload loads a new copy beside the one serving and swaps them only once it is ready, so no
request fails; the old copy then drains and its memory is released. Loading version N+1
and then unloading version N is a rollout the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import Conflict, ModelLoadError, ModelNotFound, NotReady
from gpuserve.core.metrics import Metrics
from gpuserve.core.service import Loader, ModelService
from gpuserve.model.device import DeviceInfo, probe, release_memory
from gpuserve.spec import ModelSpec

Key = tuple[str, str]  # a model's name and version, as the protocol spells them


class ModelRegistry:
    """The served models; the first one is the default, served at `/predict`.

    A name may have several versions, each its own ModelService. Routes without a version
    reach the name's `default_versions` entry while that one is loaded, else the highest
    version ready (or, with none ready, the highest loaded, whose state answers for it).
    """

    def __init__(
        self,
        settings: Settings,
        loader: Loader,
        metrics: Metrics,
        prober: Callable[[str], DeviceInfo] = probe,
        service: Callable[[ModelSettings], ModelService] | None = None,
    ) -> None:
        self._device = settings.device
        self._make_service = service
        self._loader, self.metrics, self._prober = loader, metrics, prober
        # What can be loaded: the configured models (the repository's own are added when
        # first loaded), and what is loaded now.
        self.configured: dict[Key, ModelSettings] = {
            _key(model): model for model in settings.served_models
        }
        self._services = {key: self._service(model) for key, model in self.configured.items()}
        self._by_name: dict[str, list[ModelService]] = {}  # each name's versions, lowest first
        self._index()
        self._default_versions = {
            name: str(version) for name, version in settings.default_versions.items()
        }
        self.default_name = next(iter(self.configured))[0]
        self._changing: set[Key] = set()
        # Set in a worker among several: whether every other worker is ready.
        self.peers_ready: Callable[[], bool] | None = None
        self._drain: asyncio.Future[Any] | None = None

    def _service(self, model: ModelSettings) -> ModelService:
        if self._make_service is not None:
            return self._make_service(model)
        return ModelService(model, self._device, self._loader, self.metrics, self._prober)

    @property
    def default(self) -> ModelService:
        """The model /predict serves; NotReady (503) while it is unloaded."""
        return self.get(self.default_name)

    def __iter__(self) -> Iterator[ModelService]:
        return iter(self._services.values())

    def __len__(self) -> int:
        return len(self._services)

    @property
    def names(self) -> list[str]:
        """Every known model name (configured or loaded), once each, the default first."""
        return list(dict.fromkeys(name for name, _ in self.configured))

    def get(self, name: str, version: str | None = None) -> ModelService:
        """The model's service: the given version, or the one routes without a version
        serve. ModelNotFound (404) for a name or version the server does not know, NotReady
        (503) for a known one that is unloaded."""
        if version is None:
            candidates = self._by_name.get(name)
            if candidates is not None and len(candidates) == 1:  # every request: keep it short
                return candidates[0]
        service = self.find(name, version)
        if service is not None:
            return service
        known = self.names
        if name not in known:
            raise ModelNotFound(f"no model named {name!r}; this server has: {', '.join(known)}")
        if version is None:
            raise NotReady(f"model {name!r} is unloaded", retry_after_s=30)
        if (name, version) in self.configured:
            raise NotReady(f"model {name!r} version {version} is unloaded", retry_after_s=30)
        loaded = ", ".join(service.version for service in self._by_name.get(name, ()))
        raise ModelNotFound(
            f"model {name!r} has no version {version!r}; loaded: {loaded or 'none'}"
        )

    def _serving(self, name: str) -> ModelService | None:
        candidates = self._by_name.get(name)
        if not candidates:
            return None
        if len(candidates) == 1:  # the common case, on every request: one version
            return candidates[0]
        chosen = self._default_versions.get(name)
        if chosen is not None:
            service = self._services.get((name, chosen))
            if service is not None:
                return service
        ready = [service for service in candidates if service.state == "ready"]
        return (ready or candidates)[-1]

    def _index(self) -> None:
        """Group the services by name, versions ascending: after every change of the table."""
        by_name: dict[str, list[ModelService]] = {}
        for service in sorted(self._services.values(), key=lambda s: s.settings.version):
            by_name.setdefault(service.name, []).append(service)
        self._by_name = by_name

    def current(self, service: ModelService, version: str | None, spec: ModelSpec) -> ModelService:
        """The service to queue on, for a `service` retired since the request found it
        (reloaded, or its version unloaded) while the request read and checked its body
        against `spec`: the one the request's route (`version`, None for the routes without
        one) reaches now, if that one takes the same tensors, so a reload or a version
        rollout fails no request; else `service` itself, whose `predict` says why it cannot
        serve. Called right before `predict`, with no await between."""
        if not service.retired or self._drain is not None:
            return service
        now = self.find(service.name, version)
        if now is None or now.state != "ready" or now.spec != spec:
            return service
        return now

    def versions(self, name: str) -> list[str]:
        """The loaded (or loading) versions of `name`, lowest first."""
        return [service.version for service in self.all_versions(name)]

    def all_versions(self, name: str) -> list[ModelService]:
        """The loaded (or loading) versions of `name`, lowest first: 404 for an unknown name,
        503 when none is loaded."""
        found = self._by_name.get(name)
        if not found:
            self.get(name)
        return list(found or ())

    def find(self, name: str, version: str | None = None) -> ModelService | None:
        """`get`'s service, or None where `get` raises."""
        return self._serving(name) if version is None else self._services.get((name, version))

    def state_of(self, key: Key) -> tuple[str, str | None]:
        """A known model version's state and reason, unloaded ones included."""
        service = self._services.get(key)
        if service is None:
            return "unloaded", "unloaded through the repository API"
        return service.state, service.reason

    async def load(self, model: ModelSettings, drain_s: float) -> ModelService:
        """Load `model`, or reload it when it is loaded: the new copy loads beside the one
        serving and replaces it only once ready, then the old copy drains for up to `drain_s`
        and is released. ModelLoadError with the reason if the new copy fails; the old one
        keeps serving. Other versions of the name are left as they are, so loading version
        N+1 and then unloading version N is a rollout with no failed request."""
        key = _key(model)
        self._claim(key)
        try:
            fresh = self._service(model)
            await fresh.start()
            await fresh.loaded()
            if fresh.state != "ready":
                # Read before stopping: a stopped service's reason is that it stopped.
                reason = fresh.reason or f"{model.title} failed to load"
                await fresh.stop(0)
                fresh.release()
                raise ModelLoadError(reason)
            self.configured[key] = model
            old = self._services.get(key)
            self._services[key] = fresh
            self._index()
            if old is not None:
                old.retired = True
                await self._retire(old, drain_s)
            fresh.publish_ready()
            return fresh
        finally:
            self._changing.discard(key)

    async def unload(self, name: str, drain_s: float, version: str | None = None) -> None:
        """Stop serving `name` (every version, or the one given): its accepted requests are
        answered (for up to `drain_s`), then its memory is released. It stays known, and can
        be loaded again. Unloading what is not loaded succeeds, as Triton's does; an unknown
        name or version is ModelNotFound."""
        if version is not None:
            if (name, version) not in self._services:
                if (name, version) in self.configured:
                    return  # unloaded already
                self.get(name, version)  # ModelNotFound, naming what there is
            keys = [(name, version)]
        else:
            keys = [key for key in self._services if key[0] == name]
            if not keys:
                if name in self.names:
                    return  # unloaded already
                self.get(name)  # ModelNotFound, naming what there is
        self._claim(*keys)
        try:
            # Leaving the table first: new requests go to the versions left, or get 503.
            retired = [self._services.pop(key) for key in keys]
            self._index()
            for service in retired:
                service.retired = True
            await asyncio.gather(*(self._retire(service, drain_s) for service in retired))
        finally:
            self._changing.difference_update(keys)

    def _claim(self, *keys: Key) -> None:
        """Mark `keys` as changing, all or none: Conflict (409) if one already is."""
        for name, version in keys:
            if (name, version) in self._changing:
                raise Conflict(f"model {name!r} version {version} is being loaded or unloaded")
        if self._drain is not None:
            raise NotReady("the server is shutting down", retry_after_s=5)
        self._changing.update(keys)

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
        """ready, loading, failed or stopping, for the server as a whole: with several
        worker processes, ready only while the others are too."""
        own = self.own_status
        if own == "ready" and self.peers_ready is not None and not self.peers_ready():
            return "loading"
        return own

    @property
    def own_status(self) -> str:
        """`status` for this process alone."""
        states = [service.state for service in self]
        if "stopping" in states:
            return "stopping"
        if "loading" in states:
            return "loading"
        return "ready" if "ready" in states else "failed"

    def readiness(self) -> dict[str, Any]:
        """The server's status, and each model's state (with the reason when not ready).

        A name with several versions known reports the one its routes without a version
        serve, and every version under `versions`."""
        body: dict[str, Any] = {"status": self.status}
        if body["status"] != self.own_status:
            body["reason"] = "another worker process is not ready yet"
        default = self._serving(self.default_name)
        if len(self) == 1 and default is not None and default.state != "ready":
            reason = default.readiness().get("reason")
            if reason is not None:
                body["reason"] = reason
        models: dict[str, Any] = {}
        for name in self.names:
            serving = self._serving(name)
            models[name] = serving.readiness() if serving else {"status": "unloaded"}
            keys = [key for key in self.configured if key[0] == name]
            if len(keys) > 1:
                models[name]["versions"] = {
                    version: self._services[(name, version)].readiness()
                    if (name, version) in self._services
                    else {"status": "unloaded"}
                    for _, version in sorted(keys, key=lambda key: int(key[1]))
                }
        body["models"] = models
        return body


def _key(model: ModelSettings) -> Key:
    return model.key, str(model.version)
