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
  # The first deb line of apt's own configuration: whatever mirror this machine is allowed to use.
  mirror=$(grep -rhoE '^(deb|URIs:)\s+\S+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | awk '{print $2}' | grep -E '^https?://' | head -1)
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR" >&2; exit 1; }
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-numpy,python3-yaml,ca-certificates \
  bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import --change 'CMD ["python3"]' - "$tag"
echo "built $tag"
