#!/usr/bin/env bash
# Build what the container test (tests/docker/test_compose.py) runs, on a machine that reaches
# Debian's and Python's package indexes but no image registry:
#   1. Docker itself (Debian's docker.io) and a running dockerd, if there are none;
#   2. a Debian bookworm base image with python3, made with debootstrap (kept between runs);
#   3. a wheelhouse of Graft's dependencies, served on loopback to the builds (they install
#      with --no-index);
#   4. graft-api:$TAG and graft-worker:$TAG from the project's Dockerfile, and stand-ins for the
#      postgres, redis and minio images (tests/docker/standins.Dockerfile).
# Prints the images' sizes. Usage: tests/docker/build.sh   (VENV, GRAFT_IMAGE_TAG, GRAFT_DOCKER_WORK)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
TAG=${GRAFT_IMAGE_TAG:-ci}
WORK=${GRAFT_DOCKER_WORK:-/var/tmp/graft-docker}
BASE=graft-base:bookworm
mkdir -p "$WORK"
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  step "installing docker.io and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  step "starting dockerd"
  nohup dockerd >"$WORK/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null
fi

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  step "making $BASE with debootstrap"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

step "wheelhouse"
# async-timeout: redis asks for it below Python 3.11.3, which the base image has (3.11.2)
"$VENV/bin/pip" wheel -q -w "$WORK/wheels" '.[production,hf,keras]' 'moto[server]>=5.0' \
  'async-timeout>=4.0.3' setuptools wheel 2>&1 | grep -v "is ignored" || true
rm -f "$WORK"/wheels/graft-*.whl
# A fixed port: the address is part of PIP_ARGS, a build argument, which is part of the layer
# cache key (a new port each run would rebuild every layer).
PORT=${GRAFT_WHEELHOUSE_PORT:-38765}
"$VENV/bin/python" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WORK/wheels" \
  >"$WORK/wheelhouse.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  kill -0 $SERVER 2>/dev/null || { cat "$WORK/wheelhouse.log"; exit 1; }  # port taken?
  "$VENV/bin/python" -c "import urllib.request as r; r.urlopen('http://127.0.0.1:$PORT/')" \
    2>/dev/null && break
  sleep 0.1
done
PIP_ARGS="--no-index --find-links http://127.0.0.1:$PORT/"

build() {  # name, then docker build arguments
  local name=$1; shift
  step "building $name"
  DOCKER_BUILDKIT=0 docker build -q --network host --build-arg "PIP_ARGS=$PIP_ARGS" \
    -t "$name" "$@" >/dev/null
}
build "graft-api:$TAG" --target api --build-arg API_BASE=$BASE .
build "graft-worker:$TAG" --target worker --build-arg API_BASE=$BASE --build-arg WORKER_BASE=$BASE .
for service in postgres redis s3; do
  build "graft-test-$service" --target $service --build-arg BASE=$BASE \
    -f tests/docker/standins.Dockerfile tests/docker
done

step "images"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E "^(graft-api:$TAG|graft-worker:$TAG|graft-test-|$BASE)"
