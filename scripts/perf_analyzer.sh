#!/usr/bin/env bash
# Triton's perf_analyzer against a running gpuserve, wherever perf_analyzer can run.
#
#   scripts/perf_analyzer.sh [MODEL] [HOST:PORT] [GRPC_HOST:PORT]
#                                  (default: digits on 127.0.0.1:8000, gRPC on 127.0.0.1:8001)
#
# Start the server first (`make serve`). perf_analyzer reads the model's configuration
# (/v2/models/MODEL/config), then sends inputs at concurrency 1, 8 and 32 (the demo's own
# digits for `digits`, zeros for another model, or INPUT_DATA=random|zero|FILE.json): JSON and
# binary tensors over HTTP, and raw contents over gRPC; it prints its tables.
# Without perf_analyzer on the PATH it is installed into .perf/ (scripts/perf_analyzer_setup.sh,
# with a newer glibc beside it where this machine's is too old). Where that fails too, the
# script says so and exits 3.
set -uo pipefail
cd "$(dirname "$0")/.."
model="${1:-digits}"
url="${2:-127.0.0.1:8000}"
grpc_url="${3:-127.0.0.1:8001}"
if ! command -v perf_analyzer >/dev/null 2>&1; then
    scripts/perf_analyzer_setup.sh >/dev/null
    PATH="$PWD/.perf/bin:$PATH"
fi
# Its exit statuses say little (`--help` exits 99 in some versions, is an invalid option in
# others): look for its version line or its usage text instead.
usage="$({ perf_analyzer --version; perf_analyzer --help; } 2>&1)"
if ! grep -q -e "Perf Analyzer Version" -e "--concurrency-range" <<<"$usage"; then
    glibc="$(ldd --version 2>/dev/null | head -1 | awk '{print $NF}')"
    echo "perf_analyzer cannot run on this machine: no build of it installs or starts here" \
        "(its PyPI wheels need glibc 2.38 or newer; this machine has glibc ${glibc:-unknown};" \
        "$(cat .perf/why 2>/dev/null || echo 'scripts/perf_analyzer_setup.sh failed'))." \
        "Run this script where it can, for example in NVIDIA's tritonserver SDK container." >&2
    exit 3
fi
# Random inputs fall outside what a model accepts (the demo refuses pixels past 16): the demo
# gets real digits, another model zeros, unless INPUT_DATA names perf_analyzer's own choice.
data="${INPUT_DATA:-zero}"
if [ -z "${INPUT_DATA:-}" ] && [ "$model" = digits ]; then
    data="$(mktemp --suffix .json)"
    trap 'rm -f "$data"' EXIT
    py=.venv/bin/python; [ -x "$py" ] || py=python3
    "$py" - "$data" <<'PY' || data=zero
import json, sys
from sklearn.datasets import load_digits
rows = load_digits().data[:64].astype(float).tolist()
json.dump({"data": [{"pixels": row} for row in rows]}, open(sys.argv[1], "w"))
PY
fi
status=0
for concurrency in 1 8 32; do
    for output in json binary; do
        flags=(--input-data "$data")
        echo "== $model over http, concurrency $concurrency, $output tensors"
        if [ "$output" = json ]; then flags+=(--input-tensor-format json --output-tensor-format json); fi
        perf_analyzer -m "$model" -u "$url" -i http --concurrency-range "$concurrency" \
            --measurement-interval 5000 "${flags[@]}" || status=$?
    done
    echo "== $model over grpc, concurrency $concurrency, raw contents"
    perf_analyzer -m "$model" -u "$grpc_url" -i grpc --concurrency-range "$concurrency" \
        --measurement-interval 5000 --input-data "$data" || status=$?
done
exit "$status"
