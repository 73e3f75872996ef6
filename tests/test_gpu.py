"""The GPU check's correctness sections (probe and NVML, ordering under stress, precision,
compile, out of memory) as tests, on a CUDA GPU: `make gpu`. Skipped without one; their CPU
mode runs everywhere (tests/test_gpu_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .helpers import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Each section's letter and what it checks; the sections that only measure stay in the check.
CORRECTNESS = {
    "A": "the probe picks the GPU and NVML reads it",
    "B": "answers stay in order, each its own, under concurrent load",
    "C": "reduced precision within its tolerance of fp32",
    "D": "a compiled model compiles nothing while serving and answers as eager",
    "E": "out of memory halves the batch and every instance is still answered",
}


@pytest.mark.parametrize("section", sorted(CORRECTNESS))
def test_a_correctness_section_of_the_gpu_check_passes_on_this_gpu(
    section: str, tmp_path: Path
) -> None:
    out = tmp_path / "check.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_check.py"),
            "--only",
            section,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    (result,) = json.loads(out.read_text())["sections"].values()
    assert result["status"] == "PASS", f"{CORRECTNESS[section]}: {result}"
