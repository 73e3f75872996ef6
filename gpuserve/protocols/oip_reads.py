"""What the Open Inference Protocol reads of the server and its models, shared by its HTTP and
gRPC transports: server metadata, model metadata, configuration, statistics and readiness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpuserve.config import Settings
from gpuserve.core.registry import ModelRegistry
from gpuserve.protocols import oip
from gpuserve.version import __version__

# The repository extension's model states.
_STATES = {"ready": "READY", "loading": "LOADING"}


def server_metadata(settings: Settings) -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    extensions = list(oip.EXTENSIONS)
    if settings.repository_api:
        extensions.append(oip.REPOSITORY_EXTENSION)
    return {"name": "gpuserve", "version": __version__, "extensions": extensions}


def server_ready(models: ModelRegistry) -> bool:
    """Whether the server is ready (as /health/ready answers 200)."""
    return models.status == "ready"


def model_ready(models: ModelRegistry, name: str, version: str | None) -> bool:
    """Whether a model version serves: false for one that is unknown, unloaded or not ready
    yet, as Triton answers (a question, not an error)."""
    service = models.find(name, version)
    return service is not None and service.state == "ready"


def statistics_of(
    models: ModelRegistry, name: str | None, version: str | None
) -> list[dict[str, Any]]:
    """Statistics in Triton's form: of one version; with `version` None, of each loaded
    version of `name`; with `name` None too, of every loaded model."""
    if name is None:
        services = list(models)
    else:
        services = [models.get(name, version)] if version else models.all_versions(name)
    summed = models.metrics.summed_stats([service.key_labels for service in services])
    return [
        stats.to_triton(service.name, service.version)
        for service, stats in zip(services, summed, strict=True)
    ]


def metadata_of(models: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    """A model version's metadata: name, versions loaded, platform, and the input and output
    tensors (batch dimension -1)."""
    return oip.metadata(models.get(name, version).spec, oip.PLATFORM, models.versions(name))


def model_config_of(models: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    """A served model's configuration in Triton's form: tensors, batching, copies."""
    service = models.get(name, version)
    settings = service.settings
    copies = [
        (device.kind, device.index, settings.instances_per_device) for device in service.devices
    ]
    return oip.model_config(
        service.spec,
        max_batch_size=settings.max_batch_size,
        preferred_batch_size=service.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        copies=copies,
        versions=models.versions(name),
        priority_levels=settings.priority_levels,
        default_priority_level=service.default_level + 1 if settings.priority_levels else 0,
    )


def index_entries(
    models: ModelRegistry, on_disk: Sequence[tuple[str, str]] = (), *, ready: bool = False
) -> list[dict[str, Any]]:
    """The repository index: each known model version's name, version, state and reason,
    then the versions in the repository folder never loaded; with `ready`, the ready ones
    only."""
    entries = []
    for name, version in models.configured:
        state, reason = models.state_of((name, version))
        entry = {"name": name, "version": version, "state": _STATES.get(state, "UNAVAILABLE")}
        if state != "ready" and reason:
            entry["reason"] = reason
        entries.append(entry)
    for name, version in on_disk:
        if (name, version) not in models.configured:
            entries.append(
                {"name": name, "version": version, "state": "UNAVAILABLE", "reason": "unloaded"}
            )
    if ready:
        entries = [entry for entry in entries if entry["state"] == "READY"]
    return entries
