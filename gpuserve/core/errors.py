"""The error hierarchy. Each error knows its HTTP status; `app` maps them to HTTP in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class GpuserveError(Exception):
    """Base class: a message safe to show a client, its HTTP status, and when to retry."""

    status_code: int = 500
    retry_after_s: int | None = None

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class InvalidInput(GpuserveError):
    """The request body is malformed or does not match the model's input spec."""

    status_code = 422


class BadRequest(InvalidInput):
    """Invalid input under the Open Inference Protocol, which answers 400 rather than 422."""

    status_code = 400


class ModelNotFound(GpuserveError):
    """No model of that name (or version) is served here."""

    status_code = 404


class Unauthorized(GpuserveError):
    """API keys are configured and the request did not carry a valid one."""

    status_code = 401


class PayloadTooLarge(GpuserveError):
    """The body is larger than `max_body_bytes`; refused before it is parsed."""

    status_code = 413


class UnsupportedMediaType(GpuserveError):
    """The body is not declared as JSON."""

    status_code = 415


class Conflict(GpuserveError):
    """The model is already being loaded or unloaded: one change at a time."""

    status_code = 409


class NotReady(GpuserveError):
    """The model is loading, failed to load, or the server is shutting down."""

    status_code = 503
    retry_after_s = 1


class BatcherClosed(NotReady):
    """The batcher no longer accepts work: it is stopping, stalled, or its collector crashed."""


class Overloaded(GpuserveError):
    """The model's queue is full. Refused at once, so accepted requests keep their latency."""

    status_code = 503
    retry_after_s = 1


class DeadlineExceeded(GpuserveError):
    """The request's deadline passed before its result was ready."""

    status_code = 504


class ClientDisconnected(GpuserveError):
    """The client hung up while its request waited; nobody reads the answer (nginx's 499)."""

    status_code = 499


class InferenceError(GpuserveError):
    """The forward pass failed. Clients see a generic message; the log has the traceback."""

    status_code = 500


class DeviceError(GpuserveError):
    """The requested device does not exist or cannot be used. Raised at start-up."""


class ModelLoadError(GpuserveError):
    """The model or its spec could not be loaded, or its warm-up batch failed."""


def describe_validation(exc: ValidationError, root: str, limit: int | None = None) -> str:
    """A pydantic validation error in a few words: `where: what` for each problem (the first
    `limit` of them), `root` where the problem is the whole document."""
    errors = exc.errors(include_url=False, include_input=False)
    shown = errors if limit is None else errors[:limit]
    parts = [f"{'.'.join(str(p) for p in error['loc']) or root}: {error['msg']}" for error in shown]
    if len(errors) > len(shown):
        parts.append(f"and {len(errors) - len(shown)} more")
    return "; ".join(parts)
