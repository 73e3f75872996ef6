"""The HTTP layer, the only part of gpuserve that knows FastAPI.

A request reads, one module a step: `lane` (the inference routes, matched in front of
FastAPI's routing) -> `context` (request id, API key, metrics) -> `routes` (`/predict`: parse,
validate against the spec) or `v2` (the Open Inference Protocol) -> `ModelService.predict`
(batcher -> worker thread) -> `responses` (the body, or the error). `app.create_app` puts
them together.
"""

from gpuserve.http.app import create_app

__all__ = ["create_app"]
