"""Logs: the JSON format, and one access line per request with what its batch cost."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from gpuserve.config import Settings
from gpuserve.http import create_app
from gpuserve.logs import JsonFormatter, TextFormatter, access, configure, escape

from .helpers import SETTINGS, FakeModel, fake_loader, serving


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_message_the_extra_fields_and_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed %s", ("x",), exc_info=sys.exc_info()
        )
    record.__dict__.update({"request_id": "abc", "batch_size": 4})
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed x" and line["level"] == "error" and line["logger"] == "t"
    assert (line["request_id"], line["batch_size"]) == ("abc", 4)
    assert "ValueError: boom" in line["traceback"]


def test_configure_installs_one_handler_of_the_chosen_format(root_logger: logging.Logger) -> None:
    configure("warning", "json")
    assert len(root_logger.handlers) == 1 and root_logger.level == logging.WARNING
    assert isinstance(root_logger.handlers[0].formatter, JsonFormatter)
    configure("info", "text")
    assert not isinstance(root_logger.handlers[0].formatter, JsonFormatter)


@pytest.mark.anyio
async def test_each_request_gets_one_access_line_with_its_batch(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpuserve.access")
    async with serving(create_app(SETTINGS, loader=fake_loader(fake_model))) as client:
        caplog.clear()
        response = await client.post(
            "/predict", json={"instances": [[1, 2, 3, 4]] * 3}, headers={"x-request-id": "r-42"}
        )
        assert response.status_code == 200
        await client.post("/predict", json={"inputs": "bad"})
    predicted, refused = [r for r in caplog.records if r.name == "gpuserve.access"]
    assert predicted.request_id == "r-42" and predicted.status == 200  # type: ignore[attr-defined]
    assert predicted.model == "digits" and predicted.batch_size == 3  # type: ignore[attr-defined]
    assert predicted.queue_ms >= 0 and predicted.forward_ms >= 0  # type: ignore[attr-defined]
    assert "POST /predict 200" in predicted.getMessage() and "batch=3" in predicted.getMessage()
    assert refused.status == 422 and not hasattr(refused, "batch_size")


@pytest.mark.anyio
async def test_the_access_log_can_be_turned_off(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpuserve.access")
    quiet = Settings(**{**SETTINGS.model_dump(), "access_log": False})
    async with serving(create_app(quiet, loader=fake_loader(fake_model))) as client:
        await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    assert not [r for r in caplog.records if r.name == "gpuserve.access"]


@pytest.mark.anyio
async def test_probes_and_scrapes_are_logged_at_debug_and_requests_at_info(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gpuserve.access")
    probes = ["/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics"]
    async with serving(create_app(SETTINGS, loader=fake_loader(fake_model))) as client:
        caplog.clear()
        for path in probes:
            await client.get(path)
        await client.get("/v2/models/digits/ready")
        await client.post("/predict", json={"inputs": [1, 2, 3, 4]})
    levels = {r.path: r.levelno for r in caplog.records if r.name == "gpuserve.access"}  # type: ignore[attr-defined]
    assert levels == {
        **dict.fromkeys(probes, logging.DEBUG),
        "/v2/models/digits/ready": logging.INFO,
        "/predict": logging.INFO,
    }


FORGERIES = ["/predict\n2026-01-01 00:00:00,000 INFO gpuserve.access: forged", "/x\r\x1b[2J\u2028y"]


@pytest.mark.parametrize("path", FORGERIES)
def test_a_text_record_cannot_forge_a_line_whatever_its_fields_hold(path: str) -> None:
    try:
        raise ValueError(f"bad {path}")
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "POST %s", (path,), exc_info=sys.exc_info()
        )
    lines = TextFormatter().format(record).split("\n")
    first = path.split("\n")[0]
    assert lines[0].endswith("POST " + escape(first)) and "\r" not in lines[0]
    assert not any(control in line for line in lines for control in "\r\x1b\u2028")
    # The message's own further lines and the traceback's are all indented, the attacker's
    # text among them: none starts as a record does, with a time.
    assert len(lines) > 1 and all(line.startswith("    ") for line in lines[1:])
    if "\n" in path:
        assert lines[1] == "    2026-01-01 00:00:00,000 INFO gpuserve.access: forged"
    assert record.getMessage() == f"POST {path}"  # the record itself is untouched


def test_a_message_of_many_lines_is_read_as_lines_and_an_access_line_stays_one() -> None:
    """A load error of many lines (TorchScript's) keeps them; a request line never splits."""
    message = "could not load m.pt:\nRuntimeError: bad\n  at line 3\n\ttab\x1b[2J"
    record = logging.makeLogRecord({"name": "gpuserve.core.service", "msg": message})
    lines = TextFormatter().format(record).split("\n")
    assert lines[0].endswith(": could not load m.pt:")
    assert lines[1:] == ["    RuntimeError: bad", "      at line 3", "    \\x09tab\\x1b[2J"]
    request = logging.makeLogRecord({"name": "gpuserve.access", "msg": "GET /a\nb 404"})
    assert TextFormatter().format(request).endswith("GET /a\\x0ab 404")


def test_json_times_are_utc_to_the_millisecond() -> None:
    record = logging.makeLogRecord({"msg": "m", "created": 1_764_140_632.0456})
    assert json.loads(JsonFormatter().format(record))["time"] == "2025-11-26T07:03:52.045Z"


@pytest.mark.anyio
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_percent_encoded_newline_in_the_path_cannot_forge_an_access_line(
    fake_model: FakeModel, log_format: str
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        async with serving(create_app(SETTINGS, loader=fake_loader(fake_model))) as client:
            forged = "/predict%0a2026-01-01%2000:00:00,000%20INFO%20gpuserve.access:%20POST"
            await client.post(forged + "%0d%1b[2J", json={"inputs": [1, 2, 3, 4]})
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    lines = [line for line in stream.getvalue().splitlines() if "health" not in line]
    assert len(lines) == 1, lines
    if log_format == "json":
        assert json.loads(lines[0])["path"].startswith("/predict\n2026")
    else:
        assert "/predict\\x0a2026-01-01" in lines[0] and "\\x0d\\x1b[2J" in lines[0]


def test_json_lines_drop_uvicorns_colour_codes() -> None:
    record = logging.getLogger("uvicorn.error").makeRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Started", (), None
    )
    record.color_message = "\x1b[32mStarted\x1b[0m"  # type: ignore[attr-defined]
    assert "color_message" not in json.loads(JsonFormatter().format(record))


def test_the_text_line_is_what_the_standard_formatter_writes_for_a_clean_record() -> None:
    """The direct path gives logging's own layout and time, across seconds too."""
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    ours = TextFormatter()
    for created in (1_764_140_632.123, 1_764_140_632.999, 1_764_140_633.004, 1_764_140_700.5):
        record = logging.makeLogRecord(
            {
                "name": "gpuserve.access",
                "levelname": "INFO",
                "levelno": 20,
                "msg": "%s %d",
                "args": ("POST /predict", 200),
                "created": created,
                "msecs": (created - int(created)) * 1000,
            }
        )
        assert ours.format(record) == standard.format(record)


def test_a_worker_s_records_say_which_worker_wrote_them() -> None:
    record = logging.makeLogRecord({"name": "gpuserve.core.service", "msg": "digits is ready"})
    assert " gpuserve.core.service [worker 1]: digits is ready" in TextFormatter(worker=1).format(
        record
    )
    assert " gpuserve.core.service: digits is ready" in TextFormatter().format(record)
    assert json.loads(JsonFormatter(worker=0).format(record))["worker"] == 0
    assert "worker" not in json.loads(JsonFormatter().format(record))
