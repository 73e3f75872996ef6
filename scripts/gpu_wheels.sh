#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, CUDA torch, no network): what gpuserve and
# scripts/gpu_check.py import beyond that machine's own packages (torch, numpy, safetensors,
# nvidia-ml-py, prometheus-client, httpx, uvloop, grpcio, click, h11 are there), at the
# versions this checkout's .venv holds, as CPython 3.12 manylinux x86-64 wheels, into the
# git-ignored .whl/.
#
#   scripts/gpu_wheels.sh          # then, there (the device tool carries .whl):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 scripts/gpu_check.py --out $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
# tritonclient (with python-rapidjson) carries the gRPC messages; protobuf at this checkout's
# version, since tritonclient's generated code needs a recent one; fastapi-offline the docs.
packages=(pydantic pydantic-core pydantic-settings python-dotenv annotated-types
          typing-inspection fastapi starlette uvicorn orjson httptools fastapi-offline
          tritonclient python-rapidjson protobuf)
rm -rf .whl && mkdir -p .whl
for name in "${packages[@]}"; do
    version=$("$python" -c "import importlib.metadata as m; print(m.version('$name'))")
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 -d .whl "$name==$version"
done
ls .whl
