#!/usr/bin/env bash
# Build the image from a clean checkout of a commit and run it the two ways a user does; pass
# when both containers report `healthy`. Cleans up its containers, index server and temp files.
#
#   bash docker/smoke.sh                    (from anywhere in the repository; root on a dev box)
#
# What it builds: `git archive` of SMOKE_REF (default HEAD), not the working tree, so what is
# tested is what a clone gets (commit first). Runs, both with HF_HUB_OFFLINE=1 so the server
# comes up at once on the built-in tiny model where the hub is unreachable:
#   A  the default CMD, published with -p 127.0.0.1:PORT:8000
#   B  `omni2 serve --port 18472`, published on that port (the health check must follow it)
# and /health/ready is also asked from the host through each published port.
#
# Settings (environment):
#   DOCKER         a docker CLI that can build with BuildKit (default: the first `docker` on PATH
#                  with buildx, or a 20.x CLI, which has BuildKit built in)
#   CUDA_IMAGE     the base image. Unset: no registry is assumed; a Debian bookworm root made by
#                  `debootstrap --variant=minbase` (root, a Debian mirror: DEBIAN_MIRROR) is
#                  imported once as omni2-smoke-base:bookworm and stands in for the CUDA base
#                  (it has no GPU libraries; the server runs on CPU)
#   TORCH_INDEX    the torch index. Unset: `pip download torch==$TORCH_VERSION` (on a machine
#                  whose pip finds a local CPU wheel, that one) and its dependencies are laid out
#                  as a simple index and served on 127.0.0.1 while the build runs; the build
#                  uses the host network (--network host) to reach it. With the PyTorch index
#                  reachable: TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   TORCH_VERSION  default 2.13.0
#   CA_CERTS       extra CA certificates for pip in the build (secret ca_certs). Default: PIP_CERT,
#                  else this host's system bundle (/etc/ssl/certs/ca-certificates.crt), which is
#                  where a host behind a TLS-intercepting proxy keeps the proxy's root; "none": nothing
#   PIP_CONF       a pip.conf for the build (secret pip_conf; e.g. index-url with credentials)
#   SMOKE_TAG      image tag (default omni2:smoke); SMOKE_PORT the port of run B (18472)
#   SMOKE_TIMEOUT  seconds to wait for healthy (default 600)
#   SMOKE_COLD=1   prune the daemon's build cache first, to time a cold build (all of it!)
#   SMOKE_KEEP=1   keep the image afterwards (default: removed; the stand-in base image and the
#                  build cache stay, for a quick rerun: docker builder prune to drop the cache)
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
REF=${SMOKE_REF:-HEAD}
TAG=${SMOKE_TAG:-omni2:smoke}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PORT_B=${SMOKE_PORT:-18472}
TIMEOUT=${SMOKE_TIMEOUT:-600}
BASE_TAG=omni2-smoke-base:bookworm
NAME=omni2-smoke-$$
WORK=$(mktemp -d /tmp/omni2-smoke.XXXXXX)
INDEX_PID=
pyver=()

log() { echo "[smoke $(date +%H:%M:%S)] $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

cleanup() {
  local rc=$?
  set +e
  for c in "$NAME-a" "$NAME-b"; do
    if [ "$rc" != 0 ] && "$DOCKER" inspect "$c" >/dev/null 2>&1; then
      log "last log lines of $c:"; "$DOCKER" logs --tail 30 "$c" 2>&1 | sed 's/^/    /' >&2
      "$DOCKER" inspect -f '{{json .State.Health}}' "$c" >&2
    fi
    "$DOCKER" rm -f -v "$c" >/dev/null 2>&1
  done
  [ -n "$INDEX_PID" ] && kill "$INDEX_PID" 2>/dev/null
  [ "${SMOKE_KEEP:-0}" = 1 ] || "$DOCKER" rmi "$TAG" >/dev/null 2>&1
  rm -rf "$WORK"
  [ "$rc" = 0 ] && log "PASS" || log "exit $rc"
}

pick_docker() {   # a CLI whose `docker build` is BuildKit (RUN --mount, --secret)
  local d
  for d in ${DOCKER:-} $(type -ap docker); do
    if "$d" buildx version >/dev/null 2>&1; then echo "$d"; return; fi
    case "$("$d" version --format '{{.Client.Version}}' 2>/dev/null)" in
      19.03*|20.10*) echo "$d"; return ;;
    esac
  done
  return 1
}

last_check() {   # the newest health check output of a container
  "$DOCKER" inspect -f '{{json .State.Health.Log}}' "$1" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)[-1]["Output"].strip())'
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

DOCKER=$(pick_docker) || die "no docker CLI that builds with BuildKit (install buildx, or use Docker 20.10's CLI)"
trap cleanup EXIT
"$DOCKER" info >/dev/null 2>&1 || die "no docker daemon answers ($DOCKER info)"
export DOCKER_BUILDKIT=1
log "docker CLI $DOCKER ($("$DOCKER" version --format '{{.Client.Version}} / daemon {{.Server.Version}}'))"

# 1. A clean checkout of the commit: the build context is exactly what a clone holds.
mkdir -p "$WORK/src"
git -C "$ROOT" archive --format=tar "$REF" | tar -x -C "$WORK/src"
log "context: $(git -C "$ROOT" rev-parse --short "$REF") ($REF), $(du -sh "$WORK/src" | cut -f1)"

# 2. The base image.
if [ -z "${CUDA_IMAGE:-}" ]; then
  if ! "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || die "CUDA_IMAGE unset and no debootstrap (apt-get install debootstrap)"
    log "making the stand-in base $BASE_TAG (debootstrap --variant=minbase bookworm)"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
    tar -C "$WORK/rootfs" -c . | "$DOCKER" import - "$BASE_TAG" >/dev/null
    rm -rf "$WORK/rootfs"
  fi
  CUDA_IMAGE=$BASE_TAG
  pyver=(--python-version 3.11)      # bookworm's python3, for the torch wheel below
fi
build_args=(--build-arg "CUDA_IMAGE=$CUDA_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION")

# 3. The torch index.
if [ -z "${TORCH_INDEX:-}" ]; then
  python3 -m pip download -q --only-binary=:all: "${pyver[@]}" "torch==$TORCH_VERSION" -d "$WORK/wheels" \
    2>"$WORK/pip.log" || { cat "$WORK/pip.log" >&2; die "pip download torch==$TORCH_VERSION"; }
  for whl in "$WORK"/wheels/*.whl; do       # simple index: one folder per normalised name
    project=$(basename "$whl" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    mkdir -p "$WORK/index/$project" && mv "$whl" "$WORK/index/$project/"
  done
  log "torch index: $(ls "$WORK"/index/torch/) and $(($(ls "$WORK/index" | wc -l) - 1)) dependencies"
  INDEX_PORT=$(free_port)
  python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" >"$WORK/index.log" 2>&1 &
  INDEX_PID=$!
  TORCH_INDEX=http://127.0.0.1:$INDEX_PORT/
  build_args+=(--network host)
fi
build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")

# 4. pip's secrets: the CA bundle this machine's pip trusts (a TLS-intercepting proxy), a pip.conf.
CA_CERTS=${CA_CERTS:-${PIP_CERT:-}}
[ -z "$CA_CERTS" ] && [ -s /etc/ssl/certs/ca-certificates.crt ] && CA_CERTS=/etc/ssl/certs/ca-certificates.crt
if [ -n "$CA_CERTS" ] && [ "$CA_CERTS" != none ]; then
  [ -s "$CA_CERTS" ] || die "CA_CERTS=$CA_CERTS: no such file"
  build_args+=(--secret "id=ca_certs,src=$CA_CERTS")
fi
[ -n "${PIP_CONF:-}" ] && build_args+=(--secret "id=pip_conf,src=$PIP_CONF")

# 5. Build.
if [ "${SMOKE_COLD:-0}" = 1 ]; then
  log "pruning the build cache (SMOKE_COLD=1)"; "$DOCKER" builder prune -af >/dev/null
fi
log "building $TAG (base $CUDA_IMAGE, torch $TORCH_VERSION from $TORCH_INDEX); log: $WORK/build.log"
start=$(date +%s)
"$DOCKER" build --progress=plain -f "$WORK/src/docker/Dockerfile" -t "$TAG" "${build_args[@]}" "$WORK/src" \
  > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log" >&2; die "docker build"; }
build_s=$(($(date +%s) - start))
[ -n "$INDEX_PID" ] && { kill "$INDEX_PID"; INDEX_PID=; }
size=$("$DOCKER" image inspect -f '{{.Size}}' "$TAG")
log "built in ${build_s}s; image $(python3 -c "print(f'{$size / 1e9:.2f} GB')") ($size bytes)"
"$DOCKER" run --rm --entrypoint sh "$TAG" -c \
  'du -sm /opt/omni2/lib/python3*/site-packages/* | sort -n | tail -6 | tr "\n" " "; echo; pip list 2>/dev/null | grep -i "^triton " || echo "no triton"' >&2

# 6. Run it the two ways a user does, both at once (they load independently).
PORT_A=$(free_port)
PORT_B_HOST=$(free_port)
"$DOCKER" run -d --name "$NAME-a" -e HF_HUB_OFFLINE=1 -p "127.0.0.1:$PORT_A:8000" "$TAG" >/dev/null
"$DOCKER" run -d --name "$NAME-b" -e HF_HUB_OFFLINE=1 -p "127.0.0.1:$PORT_B_HOST:$PORT_B" "$TAG" \
  omni2 serve --port "$PORT_B" >/dev/null
log "A: default CMD on 127.0.0.1:$PORT_A; B: omni2 serve --port $PORT_B on 127.0.0.1:$PORT_B_HOST"

wait_healthy() {   # container, host port
  local c=$1 port=$2 t0 state
  t0=$(date +%s)
  while :; do
    state=$("$DOCKER" inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$c")
    case "$state" in
      "running healthy") break ;;
      *unhealthy*|exited*|dead*) die "$c: $state" ;;
    esac
    [ $(($(date +%s) - t0)) -lt "$TIMEOUT" ] || die "$c: not healthy after ${TIMEOUT}s ($state)"
    sleep 3
  done
  log "$c healthy after $(($(date +%s) - t0))s: $(last_check "$c" | cut -c1-160)"
  python3 -c "import urllib.request as u, sys; r = u.urlopen(sys.argv[1], timeout=10); assert r.status == 200; print(r.read()[:200].decode())" \
    "http://127.0.0.1:$port/health/ready" >&2 || die "$c: /health/ready not reachable on 127.0.0.1:$port"
}
wait_healthy "$NAME-a" "$PORT_A"
wait_healthy "$NAME-b" "$PORT_B_HOST"
last_check "$NAME-b" | grep -q ":$PORT_B/" \
  || die "B: the health check did not ask port $PORT_B"
echo "smoke: PASS build ${build_s}s, image $size bytes, both runs healthy"
