"""The fast lane: `POST /predict` and `POST /models/{name}/predict` without FastAPI's routing.

FastAPI finds a route by trying each in turn, solves its dependencies, and passes each request
through five middlewares of its own; measured in-process, that was more than half of a
`/predict` request's CPU time on the event loop, all of it spent before and after the work
that matters. The prediction routes need none of it: the lane matches them by their path, runs
the same `predict_with` as the FastAPI routes, and answers errors through the same handlers.
Every other request, and these paths with another method, goes to FastAPI, which also keeps
documenting the prediction routes in the OpenAPI schema.
"""

from __future__ import annotations

from typing import NamedTuple

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gpuserve.app.responses import on_gpuserve_error, unexpected_error_response
from gpuserve.app.routes import predict_with
from gpuserve.errors import GpuserveError
from gpuserve.registry import ModelRegistry

_MODELS_PREFIX = "/models/"
_PREDICT_SUFFIX = "/predict"


class LaneRoute(NamedTuple):
    """A matched prediction route: its path template (the metrics label) and the model name."""

    path: str
    model: str | None  # None: the default model


_DEFAULT = LaneRoute("/predict", None)


def match(scope: Scope) -> LaneRoute | None:
    """The prediction route `scope` asks for, or None if FastAPI should answer it."""
    # Under a root path the paths FastAPI matches differ from scope["path"]: leave it to it.
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if path == "/predict":
        return _DEFAULT
    if path.startswith(_MODELS_PREFIX) and path.endswith(_PREDICT_SUFFIX):
        name = path[len(_MODELS_PREFIX) : -len(_PREDICT_SUFFIX)]
        if name and "/" not in name:
            return LaneRoute("/models/{name}/predict", name)
    return None


class PredictLane:
    """ASGI app for a matched prediction route (`scope["route"]` is its LaneRoute).

    It sits inside `RequestContext`, which adds the request id, checks the API key and counts
    the request under `scope["route"].path`, exactly as for the FastAPI routes.
    """

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: LaneRoute = scope["route"]
        request = Request(scope, receive)
        response: Response
        try:
            service = self.models.default if route.model is None else self.models.get(route.model)
            response = await predict_with(request, service)
        except GpuserveError as exc:
            response = await on_gpuserve_error(request, exc)
        except Exception as exc:
            response = unexpected_error_response(request, exc)
        await response(scope, receive, send)


class GpuserveAPI(FastAPI):
    """FastAPI, with the prediction routes answered first by the fast lane (see `lane`)."""

    lane: ASGIApp | None = None  # the ASGI app for matched routes; create_app sets it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = match(scope) if self.lane is not None else None
        if route is None or self.lane is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        scope["route"] = route
        await self.lane(scope, receive, send)
