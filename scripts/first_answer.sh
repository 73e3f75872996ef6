#!/usr/bin/env bash
# A new user's first minutes, timed: a fresh clone of this repository, `make`'s serving
# install, the README's export, `gpuserve serve mymodel.pt2`, and the first answer.
# Usage: scripts/first_answer.sh [PORT]   (needs network access to PyPI, like `make serve`)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
port="${1:-8765}"
work="$(mktemp -d)"
server=""
cleanup() {
    if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
start=$(date +%s.%N)
git clone -q "$repo" "$work/gpuserve"
cd "$work/gpuserve"
make .venv/.installed > "$work/install.log" 2>&1
installed=$(date +%s.%N)
mkdir mine && cd mine
../.venv/bin/python - > export.py <<'PY'
import re
readme = open("../README.md").read()
print(re.search(r"<!-- quickstart: export.py -->\n```\w*\n(.*?)```", readme, re.S).group(1))
PY
../.venv/bin/python export.py
../.venv/bin/gpuserve serve mymodel.pt2 --port "$port" > serve.log 2>&1 &
server=$!
body='{"inputs": [0,1,2,3,4,5,6,7,8,9]}'
for _ in $(seq 600); do  # bounded: 120 s
    if curl -sf "localhost:$port/predict" -H 'content-type: application/json' -d "$body" > answer.json; then
        break
    fi
    sleep 0.2
done
answered=$(date +%s.%N)
echo "install: $(echo "$installed - $start" | bc) s; first answer: $(echo "$answered - $start" | bc) s"
cat answer.json
echo
