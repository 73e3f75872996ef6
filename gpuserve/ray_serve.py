"""Ray Serve: gpuserve as a Ray Serve deployment, to scale past one machine on Ray.

Each replica runs the same app as `gpuserve serve` (same loading, same MicroBatcher, same
routes), built from Settings made once on the driver. Ray adds placement (`num_gpus` per
replica), replicas across nodes, and autoscaling on ongoing requests. Install with
`pip install 'gpuserve[ray]'`.

    serve run gpuserve.ray_serve:app_builder config_file=configs/ray.toml
    serve build gpuserve.ray_serve:app_builder -o serve-config.yaml   # for KubeRay

A replica ends its start-up only once its models have loaded, so Ray routes nothing to a
replica still loading, and its health check fails (Ray replaces it) when no model can serve.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from gpuserve.config import Settings
from gpuserve.http import create_app


@serve.ingress()
class GpuserveReplica:
    """One replica: the gpuserve app, built when Ray starts the replica."""

    def __init__(self, settings: dict[str, Any]) -> None:
        # Validated, not rebuilt from sources: the replica uses exactly the driver's settings.
        self._settings = Settings.model_validate(settings)
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        self._app = create_app(self._settings, wait_for_models=True)
        return self._app

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica."""
        if self._app is None:
            return
        models = self._app.state.models
        if models.status == "failed":
            raise RuntimeError(f"no model can serve: {models.readiness()['models']}")


def deployment(settings: Settings) -> Application:
    """The bound Ray Serve application for these settings (`settings.ray` sizes it)."""
    ray = settings.ray
    options: dict[str, Any] = {
        "name": "gpuserve",
        "ray_actor_options": {
            "num_gpus": ray.num_gpus,
            "num_cpus": ray.num_cpus,
            **({"resources": ray.resources} if ray.resources else {}),
        },
        "max_ongoing_requests": ray.max_ongoing_requests,
        # gpuserve drains on its own; give it the same time Ray waits before killing.
        "graceful_shutdown_timeout_s": settings.shutdown_timeout_s,
        "health_check_period_s": 10,
    }
    if ray.num_replicas is not None:
        options["num_replicas"] = ray.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": ray.min_replicas,
            "max_replicas": ray.max_replicas,
            "target_ongoing_requests": ray.target_ongoing_requests,
        }
    replica = serve.deployment(**options)(GpuserveReplica)
    # A JSON dump masks secrets; the replicas need the keys themselves.
    bound = {**settings.model_dump(mode="json"), "api_keys": settings.api_key_values()}
    return replica.bind(bound)


def app_builder(args: dict[str, Any]) -> Application:
    """For `serve run` and `serve build`: `args` are Settings fields (config_file=..., ...)."""
    return deployment(Settings(**args))
