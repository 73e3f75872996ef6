"""create_app: the FastAPI app, its lifespan (model loads, drained stop) and its OpenAPI."""

from __future__ import annotations

import asyncio
import functools
import importlib.resources
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.calls import RequestPath
from gpuserve.core.envelope import Envelope
from gpuserve.core.errors import GpuserveError
from gpuserve.core.metrics import Metrics, Spans, sample_gpus
from gpuserve.core.offload import BodyDecoder
from gpuserve.core.registry import ModelRegistry
from gpuserve.core.service import Loader, ModelService
from gpuserve.http import repository, routes, v1, v2
from gpuserve.http.context import RequestContext
from gpuserve.http.lane import GpuserveAPI, InferenceLane
from gpuserve.http.responses import (
    on_gpuserve_error,
    on_http_error,
    on_unexpected_error,
    on_validation_error,
)
from gpuserve.model.device import GpuMonitor, visible_gpu_uuids
from gpuserve.model.loading import build_model
from gpuserve.version import __version__

if TYPE_CHECKING:
    from gpuserve.engine.link import EngineLink
    from gpuserve.workers import Peers

logger = logging.getLogger("gpuserve.http")


def create_app(
    settings: Settings,
    *,
    loader: Loader | None = None,
    wait_for_models: bool = False,
    on_no_model: Callable[[], None] | None = None,
    peers: Peers | None = None,
    traces: Spans | None = None,
) -> FastAPI:
    """Build the ASGI app. The models start loading when the app's lifespan starts.

    By default the lifespan returns at once, so health checks answer while models load. With
    `wait_for_models`, start-up ends only when every model has loaded or failed: for hosts
    such as Ray Serve that route to a replica as soon as its start-up ends. `on_no_model` is
    called once every model has failed to load (the server then stops, unless
    `keep_running_without_models`). `peers` makes it one worker process among several.
    `traces` receives the spans instead of what `settings.traces` would start.
    ValueError when the settings name no model.
    """
    if not settings.served_models:
        raise ValueError("no model to serve: set model.path (or factory, or handler) or models")
    metrics = Metrics(peers.metrics_dir if peers is not None else None)
    link = _engine_link(peers)
    models = ModelRegistry(
        settings,
        loader if loader is not None else build_model,
        metrics,
        service=None if link is None else _remote(link, metrics),
    )
    if peers is not None:
        models.peers_ready = peers.others_ready
    decoder = BodyDecoder(settings.parse_offload_bytes, settings.parse_processes)
    path = RequestPath(models, decoder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Started here, in the process that serves (a worker forks before): the exporter's
        # thread is this process's own.
        metrics.traces = traces
        if traces is None and settings.traces:
            from gpuserve.core.tracing import Tracing  # an extra: imported only when on

            metrics.traces = Tracing.over_otlp()
        if link is not None:
            await link.start()
        await models.start()
        if wait_for_models:
            await models.loaded()
        monitor, sampler = _start_gpu_sampling(settings, metrics)
        tasks = []
        if on_no_model is not None and not settings.keep_running_without_models:
            tasks.append(asyncio.create_task(_stop_if_no_model(models, on_no_model)))
        if peers is not None:
            tasks.append(asyncio.create_task(_publish(models, metrics, peers)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if peers is not None:
                peers.publish(False)
            await models.stop(settings.shutdown_timeout_s)
            if link is not None:
                await link.close()
            decoder.close()
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
            if monitor is not None:
                monitor.close()
            if metrics.traces is not None:
                metrics.traces.close()

    # No trailing-slash redirects: Starlette builds their Location from the client's Host
    # header, which lets anyone make this server redirect to a host of their choosing.
    app = GpuserveAPI(
        title="gpuserve",
        version=__version__,
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.models = models
    app.state.metrics = metrics
    app.state.decoder = decoder
    app.state.path = path
    app.include_router(routes.router)
    app.include_router(v2.router)
    app.include_router(v1.router)
    if settings.repository_api:
        app.include_router(repository.router)
    _add_docs(app)
    app.add_exception_handler(GpuserveError, on_gpuserve_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    envelope = Envelope(metrics, settings.api_key_values(), settings.access_log, "http")
    context = functools.partial(RequestContext, envelope=envelope)
    app.add_middleware(context)
    # The inference routes skip FastAPI's per-request machinery, not the request's context.
    app.lane = context(InferenceLane())
    app.openapi = functools.partial(_openapi, app, app.openapi)  # type: ignore[method-assign]
    return app


async def _stop_if_no_model(models: ModelRegistry, stop: Callable[[], None]) -> None:
    """Once every model has finished loading, stop the server if none of them can serve: a
    terminal user sees it, and Kubernetes restarts it, rather than it staying up, alive and
    useless."""
    await models.loaded()
    if models.status == "failed":
        reasons = "; ".join(f"{s.title}: {s.reason}" for s in models)
        logger.error("no model can serve (%s); stopping", reasons)
        stop()


# How often a worker among several tells the others its readiness and queue depths.
_PUBLISH_INTERVAL_S = 0.1


async def _publish(models: ModelRegistry, metrics: Metrics, peers: Peers) -> None:
    """A worker's own readiness to the others, and its queue depths to the shared metrics,
    until cancelled."""
    while True:
        peers.publish(models.own_status == "ready")
        metrics.refresh()
        await asyncio.sleep(_PUBLISH_INTERVAL_S)


def _start_gpu_sampling(
    settings: Settings, metrics: Metrics
) -> tuple[GpuMonitor | None, asyncio.Task[None] | None]:
    """The background task behind the GPU gauges, where NVML works; none on a CPU box."""
    if settings.gpu_metrics_interval_s <= 0:
        return None, None
    # Only the GPUs this server can use, by the CUDA index it uses for them.
    monitor = GpuMonitor(visible=visible_gpu_uuids())
    if not monitor.available:
        logger.info("no GPU gauges in /metrics: %s", monitor.problem)
        return None, None
    task = asyncio.create_task(
        sample_gpus(metrics, monitor, settings.gpu_metrics_interval_s), name="gpuserve-gpu-gauges"
    )
    return monitor, task


# Swagger UI's own files, from an installed package: /docs works where no CDN can be reached.
_DOCS_ASSETS = "/docs/assets"


def _add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc, their scripts and styles served from this server."""
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.mount(_DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="gpuserve",
            swagger_js_url=f"{_DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_DOCS_ASSETS}/favicon.png",
        )

    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="gpuserve",
            redoc_js_url=f"{_DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{_DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    app.add_route("/docs", swagger_ui, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)


def _openapi(app: FastAPI, default: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI document, with /predict's body described by the default model's own spec.

    Until that model has loaded the body is described loosely, and the document is not cached.
    Model names in paths are listed as an enum, so clients and fuzzers see the valid ones.
    """
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = default()
    _drop_unreachable_validation_errors(document)
    models: ModelRegistry = app.state.models
    service = models.find(models.default_name)
    if service is None or service.model is None:
        app.openapi_schema = None
        return document
    _name_models(document, models.names)
    single = len(models.names) == 1
    schema = _predict_schema(service)
    for path in ("/predict", "/models/{name}/predict") if single else ("/predict",):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        body["schema"] = schema
    if single:  # with several models, each route's body depends on the model named
        v1 = document["paths"]["/v1/models/{name}:predict"]["post"]["requestBody"]
        v1["content"]["application/json"]["schema"] = _v1_schema(service)
    return document


def _drop_unreachable_validation_errors(document: dict[str, Any]) -> None:
    """FastAPI documents a 422 for every route with a parameter; gpuserve's parameters are
    plain strings that cannot fail validation, so that 422 is never given. The routes that do
    answer 422 (/predict, for a bad instance) document their own, in the error shape."""
    for operations in document["paths"].values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422", {})
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            if schema.get("$ref", "").endswith("/HTTPValidationError"):
                del operation["responses"]["422"]


def _name_models(document: dict[str, Any], names: list[str]) -> None:
    """Every `{name}` path parameter takes one of the served models' names."""
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "name":
                    parameter["schema"] = {"type": "string", "enum": names}


def _predict_schema(service: ModelService) -> dict[str, Any]:
    """A /predict body for this model: its instances, shaped, typed and bounded by its spec."""
    assert service.model is not None
    instance = service.model.spec.instance_schema()
    return {
        "oneOf": [
            _one_field("inputs", instance),
            _one_field("instances", _instances(service)),
        ]
    }


def _v1_schema(service: ModelService) -> dict[str, Any]:
    """A KServe v1 body for this model: its instances as a list, under either name."""
    rows = _instances(service)
    return {"oneOf": [_one_field("instances", rows), _one_field("inputs", rows)]}


def _instances(service: ModelService) -> dict[str, Any]:
    assert service.model is not None
    return {
        "type": "array",
        "items": service.model.spec.instance_schema(),
        "minItems": 1,
        "maxItems": service.settings.max_instances_per_request,
    }


def _one_field(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: schema},
        "required": [name],
        "additionalProperties": False,
    }


def _engine_link(peers: Peers | None) -> EngineLink | None:
    """A worker in front of an engine reaches it through a link of its own."""
    if peers is None or peers.engine_address is None:
        return None
    from gpuserve.engine.link import EngineLink

    return EngineLink(peers.engine_address, f"front-{peers.index}-{os.getpid()}")


def _remote(link: EngineLink, metrics: Metrics) -> Callable[[ModelSettings], ModelService]:
    from gpuserve.engine.remote import RemoteService

    def service(model: ModelSettings) -> ModelService:
        return RemoteService(model, link, metrics)

    return service
