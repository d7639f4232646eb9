#!/usr/bin/env bash
# Make sure a Docker engine answers; on a machine without one (CI, a fresh VM), install Debian's
# docker.io and start dockerd with no bridge network (sandboxes use host networking or none there)
# and live-restore (containers outlive a restart of the engine, and sandboxd takes its sessions up
# again when the engine is back).
#
#   scripts/setup-engine.sh             start dockerd if no engine answers
#   scripts/setup-engine.sh --restart   stop the local dockerd (SIGTERM) and start it again with these flags
set -euo pipefail

DAEMON_JSON="${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}"
LOG=/var/log/sandboxd-dev/dockerd.log
FLAGS=(--bridge=none --iptables=false --ip-forward=false --ip-masq=false)
# dockerd refuses a directive given both as a flag and in its config file.
if ! grep -qs '"live-restore"' "$DAEMON_JSON"; then
    FLAGS+=(--live-restore)
fi

if docker info >/dev/null 2>&1; then
    if [[ "${1:-}" != "--restart" ]]; then
        if [[ "$(docker info --format '{{.LiveRestoreEnabled}}' 2>/dev/null)" != "true" ]]; then
            echo "note: the running Docker engine has live-restore off: its containers (sessions) die when it" \
                 "restarts; restart it with scripts/setup-engine.sh --restart" >&2
        fi
        exit 0
    fi
    pid="$(cat /var/run/docker.pid 2>/dev/null || pgrep -xo dockerd || true)"
    if [[ -z "$pid" ]]; then
        echo "no local dockerd to restart (is DOCKER_HOST a remote engine?)" >&2
        exit 1
    fi
    echo "stopping dockerd ($pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 600); do
        state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
        [[ -z "$state" || "$state" == "Z" ]] && break
        sleep 0.1
    done
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "installing docker.io (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq docker.io debootstrap git ripgrep >/dev/null
fi
mkdir -p "$(dirname "$LOG")"
echo "starting dockerd ${FLAGS[*]}"
nohup dockerd "${FLAGS[@]}" </dev/null >>"$LOG" 2>&1 &
for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 0.5
done
echo "dockerd did not come up; see $LOG" >&2
tail -n 30 "$LOG" >&2
exit 1
