#!/usr/bin/env bash
# `make images`: build the Dockerfile's two targets and tag them as components/image.py names them.
#   bash containers/build.sh [cpu] [train]      (default: both)
# The base image is used as it is when present, else pulled, else (no registry reachable) made
# from Debian's packages by containers/base_image.sh under the same name. With WHEELHOUSE set to a
# folder of the locked wheels (`make wheelhouse`), the build installs from it, served on the
# loopback interface (port WHEELHOUSE_PORT, default 8765) for the build's duration, instead of
# from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}   # components/image.py imports nothing: any Python reads it
base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
if ! docker image inspect "$base" >/dev/null 2>&1; then
    docker pull "$base" || bash containers/base_image.sh "$base"
fi
args=()
if [ -n "${WHEELHOUSE:-}" ]; then
    # a fixed port: the URL is a build arg, and a new one would miss the layer cache
    port=${WHEELHOUSE_PORT:-8765}
    "$python" -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$port" >/dev/null 2>&1 &
    server=$!
    trap 'kill $server' EXIT
    args+=(--network host --build-arg "WHEELHOUSE=http://127.0.0.1:$port/")
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(cpu train)
for target in "${targets[@]}"; do
    tag=$("$python" -c "from components.image import IMAGES; print(IMAGES['$target'])")
    echo "== $target: $tag"
    start=$(date +%s)
    docker build --target "$target" --tag "$tag" "${args[@]}" .
    echo "== $target: $tag built in $(( $(date +%s) - start )) s, $(docker image inspect -f '{{.Size}}' "$tag") bytes"
done
