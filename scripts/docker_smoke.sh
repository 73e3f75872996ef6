#!/usr/bin/env bash
# Build Dockerfile.cuda and check the image for real: start it, wait for /health/ready, call
# /predict, check that it runs as a non-root user, that its HEALTHCHECK turns healthy, and that
# `docker stop` (SIGTERM) ends it with status 0.
#
# Opt-in, not part of `make test`. It starts its own Docker daemon (Debian's docker.io) on a
# temporary data root and stops it by its PID at the end. The build has no network: the base
# image comes from --base (an image tarball from `docker save`) or, by default, a Debian
# bookworm root made with debootstrap; every Python package comes from a local wheelhouse
# (the CPU torch build here). So it checks the image's recipe, user, health check and drain,
# not CUDA: there is no GPU on this machine.
#
#   sudo scripts/docker_smoke.sh [--base image.tar --base-name NAME] [--keep]
#
# Exits 0 with a line starting "SKIP:" where no daemon can start.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CACHE="${GPUSERVE_SMOKE_CACHE:-/tmp/gpuserve-smoke-cache}"
BASE_TAR=""
BASE_NAME="gpuserve-smoke-base:bookworm"
KEEP=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --base) BASE_TAR="$2"; shift 2 ;;
    --base-name) BASE_NAME="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

skip() { echo "SKIP: $*"; exit 0; }
step() { echo "== $(date -u +%H:%M:%S) $*"; }

command -v dockerd >/dev/null || skip "no dockerd (Debian: apt-get install docker.io)"
command -v docker >/dev/null || skip "no docker client"
[[ "$(id -u)" == 0 ]] || skip "starting a Docker daemon needs root"

WORK="$(mktemp -d /tmp/gpuserve-smoke.XXXXXX)"
export DOCKER_HOST="unix://$WORK/docker.sock"
DOCKERD_PID=""
CONTAINER="gpuserve-smoke-$$"

cleanup() {
  if [[ -n "$DOCKERD_PID" ]]; then
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
  fi
  # dockerd leaves its network namespace mounted under the exec root: unmount what is ours.
  grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null || true
  if [[ "$KEEP" == 0 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

step "starting dockerd on $WORK"
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  --host "$DOCKER_HOST" --storage-driver vfs >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 30); do
  docker info >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || break
  sleep 1
done
if ! docker info >/dev/null 2>&1; then
  tail -5 "$WORK/dockerd.log" || true
  DOCKERD_PID_DEAD="$DOCKERD_PID"
  skip "dockerd did not start (pid $DOCKERD_PID_DEAD); see the log lines above"
fi
docker version --format 'docker server {{.Server.Version}}'

if [[ -n "$BASE_TAR" ]]; then
  step "loading the base image from $BASE_TAR"
  docker load -i "$BASE_TAR"
else
  ROOTFS_TAR="$CACHE/bookworm-python.tar"
  if [[ ! -f "$ROOTFS_TAR" ]]; then
    command -v debootstrap >/dev/null || skip "no base image: give --base, or install debootstrap"
    step "building a Debian bookworm root with Python 3.11 (debootstrap, cached in $CACHE)"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
      bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    # A base image's Python is the image's own, as in the CUDA images: let pip install into it.
    rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
    tar -C "$WORK/rootfs" -cf "$ROOTFS_TAR" .
  fi
  step "importing the base image"
  docker import "$ROOTFS_TAR" "$BASE_NAME" >/dev/null
fi

step "building the build context and its wheelhouse ($TORCH_SPEC and the project's dependencies)"
CONTEXT="$WORK/context"
mkdir -p "$CONTEXT"
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$CONTEXT")
"$PY" -m pip download --quiet --only-binary=:all: --dest "$CONTEXT/wheelhouse" \
  "$TORCH_SPEC" "scikit-learn==1.5.2" "setuptools>=77" "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
echo "wheelhouse: $(find "$CONTEXT/wheelhouse" -name '*.whl' | wc -l) wheels"

step "docker build --network none (no index: wheelhouse only)"
docker build --network none -f "$CONTEXT/Dockerfile.cuda" -t gpuserve-smoke \
  --build-arg BASE_IMAGE="$BASE_NAME" --build-arg PIP_NO_INDEX=1 "$CONTEXT" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; echo "FAIL: docker build"; exit 1; }
docker image ls gpuserve-smoke --format 'image {{.Repository}}:{{.Tag}} {{.Size}}'

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
step "docker run (host network, port $PORT)"
docker run -d --name "$CONTAINER" --network host -e GPUSERVE_PORT="$PORT" gpuserve-smoke >/dev/null
URL="http://127.0.0.1:$PORT"

fail() { echo "FAIL: $*"; docker logs --tail 30 "$CONTAINER" || true; exit 1; }

for _ in $(seq 1 120); do
  [[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health/ready")" == 200 ]] && break
  sleep 1
done
READY="$(curl -s "$URL/health/ready")"
echo "ready: $READY"
[[ "$READY" == *'"status":"ready"'* ]] || fail "never ready"

PIXELS='[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]'
PREDICT="$(curl -s -w ' %{http_code}' -H 'content-type: application/json' \
  -d "{\"inputs\": $PIXELS}" "$URL/predict")"
echo "predict: ${PREDICT:0:60}... ${PREDICT##* }"
[[ "${PREDICT##* }" == 200 && "$PREDICT" == *'"label":"0"'* ]] || fail "/predict"

USER_ID="$(docker exec "$CONTAINER" id -u)"
echo "user id in the container: $USER_ID"
[[ "$USER_ID" != 0 ]] || fail "runs as root"

for _ in $(seq 1 60); do
  HEALTH="$(docker inspect --format '{{.State.Health.Status}}' "$CONTAINER")"
  [[ "$HEALTH" == healthy ]] && break
  sleep 2
done
echo "HEALTHCHECK: $HEALTH"
[[ "$HEALTH" == healthy ]] || fail "HEALTHCHECK never turned healthy"

step "docker stop (SIGTERM)"
docker stop -t 40 "$CONTAINER" >/dev/null
CODE="$(docker inspect --format '{{.State.ExitCode}}' "$CONTAINER")"
echo "exit code after docker stop: $CODE"
[[ "$CODE" == 0 ]] || fail "exit code $CODE"
docker logs "$CONTAINER" 2>&1 | grep -E "is ready|stopped on signal|Finished server" | sed 's/^/log: /' || true
echo "PASS: image built offline, ready, /predict 200, user $USER_ID, healthy, drained to exit 0"
