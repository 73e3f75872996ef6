"""How long a model takes to start: load time and time to ready, by the form it is served in.

    python scripts/cold_start.py [--models demo encoder]

For each model (the demo, and bench.py's encoder): the `.pt2` program served eager; compiled
(`compile = "default"`) on a first start with an empty `compile_cache_dir`, and on a second
start with the cache the first one left; and an AOTInductor package of the same program
(compiled here first, not timed), on a first and a second start with `compile_cache_dir`.
Each start is `gpuserve serve` in a fresh process on core 0 with torch's default cache folder
empty, as in a new container; "load" is the model's own load line, "ready" the time from the
process's start to `/health/ready` answering 200.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import torch
from _loadgen import free_port
from bench import export_models

ROOT = Path(__file__).resolve().parent.parent
_LOADED = re.compile(r"loaded \S+ from .* in ([0-9.]+)s")


def start(path: Path, env: dict[str, str], work: Path) -> tuple[float, float]:
    """(load seconds, seconds to ready) of one `gpuserve serve` of `path`."""
    port = free_port()
    log = work / f"serve-{port}.log"
    began = time.monotonic()
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "gpuserve", "serve", str(path), "--port", str(port)],
            env={**os.environ, "GPUSERVE_DEVICE": "cpu", "GPUSERVE_GRPC": "false", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, {0}),
        )
        try:
            deadline = began + 900
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
                time.sleep(0.05)
            ready = time.monotonic() - began
        finally:
            server.terminate()
            server.wait(timeout=60)
    found = _LOADED.search(log.read_text())
    return (float(found.group(1)) if found else float("nan")), ready


def package(program: Path, out: Path) -> Path:
    """An AOTInductor package of a `.pt2` program, with its spec beside it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.load(str(program))
        made = Path(torch._inductor.aoti_compile_and_package(exported, package_path=str(out)))
    shutil.copy(program.with_suffix(".json"), made.with_suffix(".json"))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["demo", "encoder"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        programs = {"demo": ROOT / "models" / "digits.pt2"}
        if "encoder" in args.models:
            programs["encoder"] = export_models(work / "bench")["encoder"]
        print("model    form                               load s   ready s")
        for name in args.models:
            program = programs[name]
            packaged = package(program, work / f"{name}-aoti.pt2")
            cache = work / f"{name}-compile-cache"
            runs = [
                ("eager .pt2", program, {}),
                ("compiled, empty compile_cache_dir", program, _compiled(cache)),
                ("compiled, its second start", program, _compiled(cache)),
                ("AOTInductor package, empty cache", packaged, _cached(work / f"{name}-aoti")),
                ("AOTInductor package, second start", packaged, _cached(work / f"{name}-aoti")),
            ]
            for index, (form, path, env) in enumerate(runs):
                fresh = {"TORCHINDUCTOR_CACHE_DIR": str(work / f"default-{name}-{index}")}
                load, ready = start(path, {**env, **fresh}, work)
                print(f"{name:8} {form:34} {load:7.2f}  {ready:7.2f}", flush=True)


def _compiled(cache: Path) -> dict[str, str]:
    return {"GPUSERVE_MODEL__COMPILE": "default", **_cached(cache)}


def _cached(cache: Path) -> dict[str, str]:
    return {"GPUSERVE_MODEL__COMPILE_CACHE_DIR": str(cache)}


if __name__ == "__main__":
    main()
