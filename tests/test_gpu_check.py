"""scripts/gpu_check.py in its CPU mode, so the GPU check cannot rot between GPU sessions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .helpers import ROOT


def test_the_gpu_check_runs_on_the_cpu_and_skips_only_what_needs_cuda(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    statuses = {name[0]: section["status"] for name, section in report["sections"].items()}
    assert statuses == {
        "A": "SKIP",  # NVML and CUDA
        "B": "PASS",
        "C": "PASS",
        "D": "PASS",
        "E": "SKIP",  # a CUDA memory limit
        "F": "PASS",
        "G": "PASS",  # a real server process, loaded by two client processes
    }
    ordering = report["sections"]["B. ordering under stress"]
    assert ordering["max_abs_error"] <= 1e-4 and ordering["prepared_share"] >= 0.5
    compiled = report["sections"]["D. compile"]
    assert compiled["default x1"]["graphs_compiled_while_serving"] == 0
    assert compiled["default, max_batch_size 256"]["ok"]
    over_http = report["sections"]["G. over HTTP"]
    assert over_http["errors"] == 0 and over_http["server_exit"] == 0
    # wrk where this machine has it, else httpx processes (the worker section's test below).
    assert over_http["load_generator"] == ("wrk" if shutil.which("wrk") else "httpx")
    # One line per section on the console, as on the GPU machine.
    assert result.stdout.count("PASS ") == 5 and result.stdout.count("SKIP ") == 2


def opt_in_section(tmp_path: Path, letter: str, *extra: str) -> dict[str, Any]:
    """Run one opt-in section of the check on the CPU; its JSON, once it exited 0."""
    out = tmp_path / f"{letter}.json"
    command = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--only", letter]
    result = subprocess.run(
        [*command, *extra, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (section,) = json.loads(out.read_text())["sections"].values()
    return dict(section)


def test_the_worker_section_runs_when_asked_for(tmp_path: Path) -> None:
    section = opt_in_section(tmp_path, "H", "--load-generator", "httpx")
    assert section["status"] == "PASS"
    for model in ("light", "encoder"):
        runs = section[model]
        assert [run["workers"] for run in runs] == [1, 2]
        assert all(run["errors"] == 0 and run["server_exit"] == 0 for run in runs)
        assert runs[0]["scaling"] == 1.0 and runs[1]["requests"] > 0
        assert all(run["load_generator"] == "httpx" for run in runs)


def test_the_cuda_graph_section_runs_when_asked_for(tmp_path: Path) -> None:
    section = opt_in_section(tmp_path, "I")
    assert section["status"] == "PASS"
    (row,) = section["by_batch_size"].values()
    assert row["graphs_compiled_while_serving"] == 0 and row["handler_samples_per_s"] > 0


def test_the_gpu_machine_gets_every_package_gpuserve_needs_that_it_lacks() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from _wheel_closure import ON_DEVICE, closure
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    needed = closure()
    # What the first H100 runs found missing there, one after the other.
    assert {"tritonclient", "python-rapidjson", "opentelemetry-api"} <= set(needed)
    # gpuserve's own requirements, where that machine lacks them; uvicorn's [standard] extra.
    assert {"fastapi", "pydantic", "pydantic-settings", "uvicorn", "httptools"} <= set(needed)
    assert not set(needed) & ON_DEVICE  # torch, numpy, grpcio... are there already
    assert all(version[0].isdigit() for version in needed.values())


def test_the_engine_section_runs_when_asked_for(tmp_path: Path) -> None:
    section = opt_in_section(tmp_path, "J", "--load-generator", "httpx")
    assert section["status"] == "PASS"
    one, engine = section["runs"]
    assert (one["engine"], engine["engine"]) == (False, True)
    assert engine["requests"] > 0 and engine["batch_over_one_process"] is not None
