#!/usr/bin/env bash
# Make sure a Docker engine answers; on a machine without one (CI, a fresh VM), install Debian's
# docker.io and start dockerd with no bridge network (sandboxes use host networking or none there).
set -euo pipefail

if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "installing docker.io (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io debootstrap git ripgrep >/dev/null
fi
mkdir -p /var/log/sandboxd-dev
echo "starting dockerd"
nohup dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    >/var/log/sandboxd-dev/dockerd.log 2>&1 &
for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
done
echo "dockerd did not come up; see /var/log/sandboxd-dev/dockerd.log" >&2
tail -n 30 /var/log/sandboxd-dev/dockerd.log >&2
exit 1
