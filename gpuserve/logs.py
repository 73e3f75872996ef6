"""Logging set-up: readable text by default, or one JSON object per line for log pipelines.

Request lines come from the `gpuserve.access` logger, one per request, with the request's id,
route, status, duration, model, and what its batch cost (size, queue and forward milliseconds)
as fields of the record; the JSON format writes each field as a key.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import orjson

LogFormat = Literal["text", "json"]
access = logging.getLogger("gpuserve.access")

# The attributes every LogRecord has; anything else on a record came in through `extra`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


def configure(level: str, log_format: LogFormat = "text") -> None:
    """Configure the root logger once, for the whole process (uvicorn's loggers included)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
