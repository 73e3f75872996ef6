"""The fast lane: the inference routes, answered without FastAPI's routing.

FastAPI finds a route by trying each in turn, solves its dependencies, and passes each request
through five middlewares of its own; measured in-process, that was most of a `/predict`
request's CPU time in the app, all of it spent before and after the work that matters
(`scripts/app_cost.py`). The inference routes need none of it: the lane matches them by their
path and calls the same functions as the FastAPI routes (`routes.predict_with`, `v2.infer`),
answering errors through the same handlers. Every other request, and these paths with another
method, goes to FastAPI, which also keeps documenting the inference routes in the OpenAPI
schema.
"""

from __future__ import annotations

from typing import NamedTuple

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gpuserve.core.errors import GpuserveError
from gpuserve.http import v2
from gpuserve.http.responses import on_gpuserve_error, unexpected_error_response
from gpuserve.http.routes import predict_with


class LaneRoute(NamedTuple):
    """A matched inference route: its path template (the metrics label) and its arguments."""

    path: str
    model: str | None = None  # None: the default model
    version: str | None = None


_PREDICT = LaneRoute("/predict")


def match(scope: Scope) -> LaneRoute | None:
    """The inference route `scope` asks for, or None if FastAPI should answer it."""
    # Under a root path the paths FastAPI matches differ from scope["path"]: leave it to it.
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    path: str = scope["path"]
    if path == "/predict":
        return _PREDICT
    parts = path.split("/")
    if not all(parts[1:]):  # an empty segment ("//", or a trailing "/"): FastAPI's to answer
        return None
    match parts:
        case ["", "models", name, "predict"]:
            return LaneRoute("/models/{name}/predict", name)
        case ["", "v2", "models", name, "infer"]:
            return LaneRoute("/v2/models/{name}/infer", name)
        case ["", "v2", "models", name, "versions", version, "infer"]:
            return LaneRoute("/v2/models/{name}/versions/{version}/infer", name, version)
    return None


class InferenceLane:
    """ASGI app for a matched inference route (`scope["route"]` is its LaneRoute).

    It sits inside `RequestContext`, which adds the request id, checks the API key and counts
    the request under `scope["route"].path`, exactly as for the FastAPI routes.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: Response
        try:
            response = await self._answer(request, scope["route"])
        except GpuserveError as exc:
            response = await on_gpuserve_error(request, exc)
        except Exception as exc:
            response = unexpected_error_response(request, exc)
        await response(scope, receive, send)

    async def _answer(self, request: Request, route: LaneRoute) -> Response:
        if route.path.startswith("/v2/"):
            assert route.model is not None
            if route.version is not None:
                return await v2.version_infer(request, route.model, route.version)
            return await v2.infer(request, route.model)
        return await predict_with(request, route.model)


class GpuserveAPI(FastAPI):
    """FastAPI, with the inference routes answered first by the fast lane (see `lane`)."""

    lane: ASGIApp | None = None  # the ASGI app for matched routes; create_app sets it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.lane is None or (route := match(scope)) is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        scope["route"] = route
        await self.lane(scope, receive, send)
