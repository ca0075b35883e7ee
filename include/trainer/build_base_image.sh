#!/usr/bin/env bash
# Build the trainer's base image without any container registry: a minimal Debian bookworm root
# filesystem from Debian's package mirror (the one apt already uses here), imported into Docker.
#
# usage: sudo ./build_base_image.sh [IMAGE_TAG]      (default gpu-trainer-base:bookworm)
# needs: debootstrap, docker (a running engine), root.
set -euo pipefail
tag=${1:-gpu-trainer-base:bookworm}
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # The mirror apt itself uses for bookworm here (after apt-get update), else Debian's default.
  mirror=$(apt-get indextargets --format '$(URI)' 'Created-By: Packages' 2>/dev/null \
           | grep -m1 '/dists/bookworm/' | sed 's#/dists/.*##' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR" >&2; exit 1; }
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-numpy,python3-yaml,ca-certificates \
  bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["python3"]' - "$tag"
echo "built $tag"
