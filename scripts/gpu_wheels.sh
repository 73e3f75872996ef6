#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, CUDA torch, no network): what gpuserve and
# scripts/gpu_check.py import beyond that machine's own packages, at the versions this
# checkout's .venv holds, as CPython 3.12 manylinux x86-64 wheels, into the git-ignored .whl/;
# and wrk with its LuaJIT as Debian packages in .whl/deb/ (that machine has no wrk, and the
# check's httpx clients saturated before the server did).
#
#   scripts/gpu_wheels.sh          # then, there (the device tool carries .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   for f in .whl/deb/*.deb; do dpkg -x "$f" /tmp/wrk; done
#   export PATH=/tmp/wrk/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/wrk/usr/lib/x86_64-linux-gnu
#   PYTHONPATH=/tmp/site:. python3 scripts/gpu_check.py --out $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
# gpuserve's requirements and theirs, as installed here, less what that machine has (its
# package list in the device tool's KINDS.md); protobuf and typing-extensions travel anyway,
# since tritonclient's generated code and pydantic need recent ones. (A hand-kept list missed
# fastapi's opentelemetry-api, and the served check's server could not start there.)
packages=($("$python" - <<'PY'
import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

on_device = {
    "torch", "numpy", "safetensors", "nvidia-ml-py", "prometheus-client", "httpx", "httpcore",
    "h11", "anyio", "idna", "certifi", "sniffio", "uvloop", "grpcio", "click", "packaging",
    "ml-dtypes", "urllib3", "pyyaml", "psutil", "filelock", "jinja2", "markupsafe", "fsspec",
    "networkx", "sympy", "mpmath", "setuptools", "zipp",
}
marker_env = {"python_version": "3.12", "python_full_version": "3.12.3", "os_name": "posix",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}
wanted: dict[str, set[str]] = {}
todo = [Requirement("gpuserve")]
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    extras = set(req.extras)
    if name in on_device or (name in wanted and extras <= wanted[name]):
        continue
    wanted[name] = wanted.get(name, set()) | extras
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    for line in requires:
        sub = Requirement(line)
        if sub.marker is None or any(
            sub.marker.evaluate({**marker_env, "extra": extra}) for extra in {"", *wanted[name]}
        ):
            todo.append(sub)
wanted.pop("gpuserve")
for name in sorted(wanted):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass  # not installed here: not needed on this platform
PY
))
rm -rf .whl && mkdir -p .whl
for pinned in "${packages[@]}"; do
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 -d .whl "$pinned"
done
if command -v apt-get >/dev/null; then
    mkdir -p .whl/deb
    (cd .whl/deb && apt-get download -q wrk libluajit-5.1-2 2>/dev/null)
else
    echo "no apt-get here: no wrk for that machine (the check falls back to httpx)" >&2
fi
ls -R .whl
