"""Fuzz the whole HTTP API from its own OpenAPI schema with schemathesis, on a real socket.

schemathesis' pytest plugin does not load under pytest 9 here, so its command line runs it:
every check (no 5xx, documented status codes and content types, schema-valid bodies accepted,
schema-invalid ones refused with a 4xx), then the server must still be ready.
"""

from __future__ import annotations

import os
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
        result = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "100",
                "--seed",
                "20261124",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,  # schemathesis leaves its cache where it runs
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        report = result.stdout + result.stderr
        assert result.returncode == 0, report[-6000:]
        assert "No issues found" in report
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert httpx.get(f"{server.url}/metrics").text.count('code="500"') == 0
        assert server.stop() == 0
