"""Triton's own benchmark tool against gpuserve: perf_analyzer (installed into .perf/ by
`make test`, see scripts/perf_analyzer_setup.sh) sweeps concurrency over HTTP with JSON and
with binary tensors, and over gRPC, and every request it sent is counted, successful, in
gpuserve's statistics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from sklearn.datasets import load_digits

from .helpers import ROOT, ServerProcess, wait_ready

PERF = ROOT / ".perf" / "bin" / "perf_analyzer"


def perf_analyzer() -> Path:
    if not PERF.exists():
        why_file = ROOT / ".perf" / "why"
        why = why_file.read_text().strip() if why_file.exists() else "not installed"
        pytest.skip(f"perf_analyzer: {why} (scripts/perf_analyzer_setup.sh installs it)")
    return PERF


def test_perf_analyzer_sweeps_http_json_binary_and_grpc(tmp_path: Path) -> None:
    tool = perf_analyzer()
    data = tmp_path / "digits.json"
    rows = load_digits().data[:32].astype(float).tolist()
    data.write_text(json.dumps({"data": [{"pixels": row} for row in rows]}))
    with ServerProcess("--device", "cpu") as server:
        wait_ready(server.url)
        http = server.url.removeprefix("http://")
        runs = {
            "http json": ["-i", "http", "-u", http, "--input-tensor-format", "json",
                          "--output-tensor-format", "json"],
            "http binary": ["-i", "http", "-u", http],
            "grpc": ["-i", "grpc", "-u", server.grpc_url],
        }  # fmt: skip
        sent = 0
        # A finished sweep is asked for, not a stable figure (a busy machine may never give
        # perf_analyzer three windows within its default 10%): any spread counts as stable.
        for name, flags in runs.items():
            csv = tmp_path / f"{name.replace(' ', '_')}.csv"
            done = subprocess.run(
                [str(tool), "-m", "digits", *flags, "--input-data", str(data),
                 "--concurrency-range", "1:4:3", "--measurement-interval", "500",
                 "--stability-percentage", "1000", "--max-trials", "6", "-f", str(csv)],
                capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            assert done.returncode == 0, (name, done.stdout[-3000:], done.stderr[-3000:])
            table = csv.read_text().splitlines()
            assert [line.split(",")[0] for line in table[1:]] == ["1", "4"], (name, table)
            assert all(float(line.split(",")[1]) > 0 for line in table[1:]), (name, table)
            sent += sum(int(n) for n in re.findall(r"Request count: (\d+)", done.stdout))
        stats = httpx.get(f"{server.url}/v2/models/digits/stats").json()["model_stats"][0]
        inference = stats["inference_stats"]
        # Every request perf_analyzer measured (and its warm-up ones) succeeded here.
        assert inference["fail"]["count"] == 0
        assert inference["success"]["count"] >= sent > 0
        assert server.stop() == 0
