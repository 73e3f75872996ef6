"""Logging set-up: readable text by default, or one JSON object per line for log pipelines.

Request lines come from the `gpuserve.access` logger, one per request, with the request's id,
route, status, duration, model, and what its batch cost (size, queue and forward milliseconds)
as fields of the record; the JSON format writes each field as a key.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

LogFormat = Literal["text", "json"]
access = logging.getLogger("gpuserve.access")

# The attributes every LogRecord has; anything else on a record came in through `extra`.
# uvicorn adds `color_message`, the message with ANSI colours: not for a log pipeline.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: whatever a terminal or
# a log reader could take for the end of a line, or for a command.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape(text: str) -> str:
    """`text` with every control character written as an escape (a newline as \\x0a)."""
    return _CONTROL.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class TextFormatter(logging.Formatter):
    """Readable lines that a client cannot forge.

    A request's path, a header or an error message may carry a newline (`%0a` in a URL is
    decoded before it is logged) and so write whole log lines of its own. Here a record's
    first line starts with its time, and every line after it (a traceback's, or a message's
    own: a model's load error can run to dozens) is indented by four spaces, so a line that
    does not start with a time is always part of the record above it. Other control
    characters are escaped, and an access line (one per request) stays one line, its
    newlines escaped too.

    The line is built directly, in `_TEXT_FORMAT`'s layout, with the time's text kept for the
    second it names: the access log writes one line per request, and the general path
    (a copy of the record, then strftime) cost as much as the rest of a request's logging.
    """

    def __init__(self, worker: int | str | None = None) -> None:
        super().__init__(_TEXT_FORMAT)
        self._second = -1
        self._second_text = ""
        named = f"worker {worker}" if isinstance(worker, int) else worker
        self._tag = "" if worker is None else f" [{named}]"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if "\n" in message and not record.name.endswith(".access"):
            first, rest = message.split("\n", 1)
            message = escape(first) + "\n" + _indented(rest)
        else:
            message = escape(message)
        line = f"{self._asctime(record)} {record.levelname} {record.name}{self._tag}: {message}"
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line

    def _asctime(self, record: logging.LogRecord) -> str:
        """What logging's default time format gives ("2026-11-26 06:43:52,123")."""
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._second_text},{int(record.msecs):03d}"


def _indented(text: str) -> str:
    return "\n".join("    " + escape(part) for part in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, traceback.

    JSON strings escape every control character, so a record is always one line.
    """

    def __init__(self, worker: int | str | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            body["worker"] = self._worker
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                body[key] = value
        if record.exc_info:
            body["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


def _iso_time(created: float) -> str:
    """ISO 8601 in UTC, to the millisecond: "2026-12-05T13:30:00.123Z"."""
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def configure(level: str, log_format: LogFormat = "text", worker: int | str | None = None) -> None:
    """Configure the root logger once, for the whole process (uvicorn's loggers included);
    in a worker process among several, every record says which worker (or the engine)
    wrote it."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        handler.setFormatter(TextFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither format shows the caller, the thread or the process: not worth looking up for
    # every record (the caller is a walk up the stack), the access log's one per request.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
