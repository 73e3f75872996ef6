"""Dockerfile.cuda: lint-clean under hadolint, and the final stage has what a GPU deploy needs."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile.cuda"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    steps = instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__file__).parent.parent / ".venv/bin/hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: `make test` installs it with the dev extra")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_argument() -> None:
    steps = instructions(DOCKERFILE.read_text())
    keyword, arg = steps[0]
    assert keyword == "ARG" and arg.startswith("BASE_IMAGE=")
    tag = arg.split(":", 1)[1]
    assert tag != "latest" and re.search(r"\d+\.\d+", tag) and "cuda" in tag
    assert [s for s in steps if s[0] == "FROM"] == [
        ("FROM", "${BASE_IMAGE} AS build"),
        ("FROM", "${BASE_IMAGE}"),
    ]


def test_final_stage_runs_as_a_non_root_user() -> None:
    users = [arg for keyword, arg in final_stage() if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_final_stage_exposes_the_port_and_checks_liveness_in_python() -> None:
    stage = dict(final_stage())
    assert stage["EXPOSE"] == "8000 8001"  # HTTP and gRPC
    healthcheck = stage["HEALTHCHECK"]
    assert '"python"' in healthcheck and "/health/live" in healthcheck
    # The probe follows the port the server was given, not a fixed 8000.
    assert "os.environ.get('GPUSERVE_PORT', '8000')" in healthcheck


def test_the_healthcheck_command_runs_and_fails_without_a_server() -> None:
    command = dict(final_stage())["HEALTHCHECK"].split("CMD ", 1)[1]
    argv = json.loads(command)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    result = subprocess.run(
        [sys.executable, *argv[1:]], env={"GPUSERVE_PORT": str(port)}, capture_output=True
    )
    assert result.returncode != 0 and b"Connection refused" in result.stderr


def test_final_stage_asks_the_nvidia_runtime_for_compute() -> None:
    env = " ".join(arg for keyword, arg in final_stage() if keyword == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    assert "GPUSERVE_HOST=0.0.0.0" in env  # inside a container, loopback is unreachable


def test_final_stage_serves_the_default_config() -> None:
    stage = dict(final_stage())
    assert stage["ENTRYPOINT"] == '["gpuserve", "serve"]'
    config = stage["CMD"].split('"')[3]
    assert (ROOT / config).is_file()


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "models"} <= ignored
