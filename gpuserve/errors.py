"""The error hierarchy. Each error knows its HTTP status; `app` maps them to HTTP in one place."""

from __future__ import annotations


class GpuserveError(Exception):
    """Base class: a message safe to show a client, and the HTTP status that goes with it."""

    status_code: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(GpuserveError):
    """The request body is malformed or does not match the model's input spec."""

    status_code = 422


class NotReady(GpuserveError):
    """The model is loading, failed to load, or the server is shutting down."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosed(NotReady):
    """The batcher no longer accepts work: it is stopping or its collector crashed."""


class InferenceError(GpuserveError):
    """The forward pass failed. Clients see a generic message; the log has the traceback."""

    status_code = 500


class DeviceError(GpuserveError):
    """The requested device does not exist or cannot be used. Raised at start-up."""


class ModelLoadError(GpuserveError):
    """The model or its spec could not be loaded, or its warm-up batch failed."""
