"""The fast lane: the inference routes, answered without FastAPI's routing.

FastAPI finds a route by trying each in turn, solves its dependencies, and passes each request
through five middlewares of its own; measured in-process, that was most of a `/predict`
request's CPU time in the app, all of it spent before and after the work that matters
(`scripts/app_cost.py`). The inference routes need none of it: the lane matches them by their
path and calls the same endpoints as FastAPI would, answering errors through the same
handlers. There is one list of them, the FastAPI routers' own: the lane reads the paths and
endpoints of the routes named in `_ENDPOINTS` from the routers. Every other request, and these
paths with another method, goes to FastAPI, which also documents the inference routes in the
OpenAPI schema.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gpuserve.core.errors import GpuserveError
from gpuserve.http import routes, v2
from gpuserve.http.responses import on_gpuserve_error, unexpected_error_response


class LaneRoute(NamedTuple):
    """A matched inference route: its path template (the metrics label) and its arguments."""

    path: str
    model: str | None = None  # None: the default model
    version: str | None = None


Endpoint = Callable[..., Awaitable[Response]]
# The inference routes the lane answers, by their FastAPI endpoints: their paths come from the
# routers. Their path parameters are a model's `name` and `version`, nothing else.
_ENDPOINTS: tuple[Endpoint, ...] = (
    routes.predict,
    routes.predict_model,
    v2.infer,
    v2.version_infer,
)


class _Template(NamedTuple):
    """One inference route: its path template, split (None where a parameter goes), and the
    endpoint that answers it."""

    path: str
    parts: tuple[str | None, ...]
    endpoint: Endpoint


def _templates() -> tuple[_Template, ...]:
    declared = {
        route.endpoint: route.path
        for router in (routes.router, v2.router)
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in (route.methods or ())
    }
    found = []
    for endpoint in _ENDPOINTS:
        path = declared[endpoint]
        parts = tuple(
            None if part.startswith("{") and part.endswith("}") else part
            for part in path.split("/")
        )
        found.append(_Template(path, parts, endpoint))
    return tuple(found)


_TEMPLATES = _templates()
_BY_PATH = {template.path: template for template in _TEMPLATES}


def match(scope: Scope) -> LaneRoute | None:
    """The inference route `scope` asks for, or None if FastAPI should answer it."""
    # Under a root path the paths FastAPI matches differ from scope["path"]: leave it to it.
    if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
        return None
    parts = scope["path"].split("/")
    if not all(parts[1:]):  # an empty segment ("//", or a trailing "/"): FastAPI's to answer
        return None
    # Plain loops: on every request, where a comprehension would cost a call of its own.
    for template in _TEMPLATES:
        if len(parts) != len(template.parts):
            continue
        values: list[str] = []
        for part, fixed in zip(parts, template.parts, strict=True):
            if fixed is None:
                values.append(part)
            elif fixed != part:
                break
        else:
            return LaneRoute(template.path, *values)
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
        # The endpoint's parameters are the route's values, in order (name, then version).
        endpoint = _BY_PATH[route.path].endpoint
        if route.model is None:
            return await endpoint(request)
        if route.version is None:
            return await endpoint(request, route.model)
        return await endpoint(request, route.model, route.version)


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
