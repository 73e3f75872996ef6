"""`scripts/ab.py`: the pairwise comparison, and that each revision serves its own code."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .helpers import ROOT


@pytest.fixture(scope="module")
def ab() -> ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "scripts"))
        return importlib.import_module("ab")


def row(req_per_s: float, cpu_ms: float, p50: float, batch: float | None) -> dict[str, Any]:
    return {
        "req_per_s": req_per_s,
        "cpu_ms_per_req": cpu_ms,
        "p50_ms": p50,
        "p99_ms": p50 * 3,
        "mean_batch": batch,
    }


def test_each_figure_is_read_as_ratios_within_pairs(ab: ModuleType) -> None:
    pairs = [
        (row(1000, 0.300, 2.0, 20.0), row(1200, 0.250, 2.2, 31.0)),
        (row(2000, 0.200, 1.0, 20.0), row(1800, 0.210, 0.9, 31.0)),
        (row(1500, 0.250, 1.5, 19.0), row(1650, 0.240, 1.4, 30.0)),
    ]
    lines = {line["figure"]: line for line in ab.compare(pairs)}
    throughput = lines["req/s"]
    assert throughput["ratios"] == pytest.approx([1.2, 0.9, 1.1])
    assert throughput["median_ratio"] == pytest.approx(1.1)
    assert throughput["head_better"] == 2
    cpu = lines["server CPU µs/request"]
    assert cpu["base"] == pytest.approx([300, 200, 250])  # shown in µs
    assert cpu["head_better"] == 2  # lower is better: 250 < 300, 240 < 250
    assert lines["p50 ms"]["head_better"] == 2
    assert lines["mean batch"]["head_better"] is None  # no better direction
    table = ab.markdown(32, list(lines.values()))
    assert "c=32, 3 pairs" in table
    assert (
        "| req/s | 1000, 2000, 1500 | 1200, 1800, 1650 | 1.20, 0.90, 1.10 | 1.100 | 2 of 3 |"
        in table
    )


def test_a_figure_some_run_could_not_read_is_left_out(ab: ModuleType) -> None:
    pairs = [(row(1000, 0.3, 2.0, None), row(1100, 0.3, 2.0, 8.0))]
    figures = [line["figure"] for line in ab.compare(pairs)]
    assert "mean batch" not in figures and "req/s" in figures
    zero = ab.compare([(row(0, 0.3, 2.0, 1.0), row(10, 0.3, 2.0, 1.0))])
    assert math.isnan(zero[0]["ratios"][0])


def test_each_revision_is_served_from_its_own_checkout(ab: ModuleType, tmp_path: Path) -> None:
    # An editable install points every `import gpuserve` at one checkout; a comparison that
    # imported it on both sides would measure the same code twice.
    assert ab.imported_from(ROOT) == ROOT.resolve()
    tree = ab.checkout("HEAD", tmp_path / "head")
    try:
        assert (tree / "gpuserve" / "__init__.py").is_file()
        assert ab.imported_from(tree) == tree.resolve()
    finally:
        ab.remove(tree)
    assert not tree.exists()
