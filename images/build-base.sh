#!/usr/bin/env bash
# Build a minimal Debian bookworm base image with debootstrap and `docker import` it.
# For machines that cannot pull from a registry (air-gapped CI). Everywhere else, pass
# your normal base with `--build-arg BASE_IMAGE=debian:bookworm-slim` instead.
#
# usage: images/build-base.sh [TAG]          (default tag: sandboxd-base:bookworm)
set -euo pipefail

tag="${1:-sandboxd-base:bookworm}"
mirror="${DEBIAN_MIRROR:-}"

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag already present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is required (apt-get install debootstrap)" >&2; exit 1; }
if [ -z "$mirror" ]; then
    # Reuse the host's configured Debian mirror so proxies and local mirrors keep working.
    mirror=$(grep -hoE '^(deb|URIs:) +\[?[^]]*\]? *https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | grep -v security | head -n1 || true)
    mirror="${mirror:-http://deb.debian.org/debian}"
fi

root=$(mktemp -d /var/tmp/sandboxd-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror into $root"
debootstrap --variant=minbase --include=ca-certificates bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# Trim what an image never needs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$tag" >/dev/null
echo "built base image $tag"
