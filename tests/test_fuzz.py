"""Fuzz the whole HTTP API from its own OpenAPI schema with schemathesis, on a real socket.

schemathesis' pytest plugin does not load under pytest 9 here, so its command line runs it:
every check (no 5xx, documented status codes and content types, schema-valid bodies accepted,
schema-invalid ones refused with a 4xx), then the server must still be ready.

The Open Inference Protocol's infer body gets every check but one: JSON Schema cannot say that
a tensor's `data` holds as many values as its `shape` asks for, so a schema-valid body can be
rightly refused, and "schema-valid bodies are accepted" does not hold there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import ServerProcess
from .test_socket import wait_ready


def test_the_api_survives_schemathesis_with_every_check(demo_model: Path, tmp_path: Path) -> None:
    env = {"GPUSERVE_MODEL__PATH": str(demo_model)}
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        report = schemathesis(server.url, ["--exclude-path", INFER], tmp_path)
        assert "No issues found" in report, report[-6000:]
        # Its body schema is loose, so most generated bodies are refused: a warning, no failure.
        only = ["--include-path", INFER, "--exclude-checks", "positive_data_acceptance"]
        report = schemathesis(server.url, only, tmp_path)
        assert re.search(r"\d+ generated, \d+ passed", report), report[-6000:]
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert httpx.get(f"{server.url}/metrics").text.count('code="500"') == 0
        assert server.stop() == 0


INFER = "/v2/models/{name}/infer"


def schemathesis(url: str, selection: list[str], cwd: Path) -> str:
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            *selection,
            "--max-examples",
            "100",
            "--seed",
            "20261124",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,  # schemathesis leaves its cache where it runs
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    return report
