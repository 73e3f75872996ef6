#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, CUDA torch, no network): what gpuserve and
# scripts/gpu_check.py import beyond that machine's own packages, at the versions this
# checkout's .venv holds, as CPython 3.12 manylinux x86-64 wheels, into the git-ignored .whl/;
# and wrk with its LuaJIT as Debian packages in .whl/deb/ (that machine has no wrk, and the
# check's httpx clients saturated before the server did).
#
#   scripts/gpu_wheels.sh          # then, there, with .whl/ copied beside the checkout:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   for f in .whl/deb/*.deb; do dpkg -x "$f" /tmp/wrk; done
#   export PATH=/tmp/wrk/usr/bin:$PATH LD_LIBRARY_PATH=/tmp/wrk/usr/lib/x86_64-linux-gnu
#   PYTHONPATH=/tmp/site:. python3 scripts/gpu_check.py --out $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
# What gpuserve needs there beyond that machine's packages (scripts/_wheel_closure.py).
packages=($("$python" scripts/_wheel_closure.py))
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
