#!/usr/bin/env bash
# A local stand-in for the Dockerfile's base image, for a machine that reaches Debian's package
# mirror but no image registry. It is Debian bookworm with Debian's Python 3.11, made with
# debootstrap and tagged with the exact name of the Dockerfile's FROM lines, so the same
# Dockerfile builds here and on a machine with registry access (which pulls the real image).
#   bash containers/base_image.sh [IMAGE]     (root; needs debootstrap and a running docker)
# An image of that name that is already present (pulled or made earlier) is kept.
set -euo pipefail
image=${1:-python:3.11-slim-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "base image $image: present"
    exit 0
fi
root=$(mktemp -d /var/tmp/kdp-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $image: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3.11,ca-certificates bookworm "$root" "$mirror" >/dev/null
# python3.11-venv (ensurepip, which `python -m venv` runs) from apt inside the new root: its
# dependencies are configured in order there, which debootstrap's --include does not do
chroot "$root" apt-get install -y -qq --no-install-recommends python3.11-venv >/dev/null
chroot "$root" dpkg --audit
chroot "$root" apt-get clean
# the official image's interpreter paths (the venvs' interpreter links point at them)
for name in python python3 python3.11; do ln -sf /usr/bin/python3.11 "$root/usr/local/bin/$name"; done
rm -rf "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$image" >/dev/null
echo "base image $image: made ($(docker image inspect -f '{{.Size}}' "$image") bytes)"
