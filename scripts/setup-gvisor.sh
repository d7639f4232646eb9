#!/usr/bin/env bash
# Register gVisor with the local Docker engine, idempotently (docs/network.md, "gVisor").
#
# Installs Debian's `runsc` if it is missing, merges two runtimes into /etc/docker/daemon.json
# (whatever else the file holds is kept), reloads dockerd with SIGHUP (running containers are not
# touched) and waits until `docker info` lists both:
#   runsc       --network=none  sandboxes without a network
#   runsc-host  --network=host  sandboxes on the host network (the engine's network_mode=host)
# `--host-uds=open` lets a sandbox connect to the unix sockets sandboxd bind-mounts into it (the API
# broker and the egress proxy); without it gVisor refuses connect() on host sockets.
set -euo pipefail

# DOCKER_DAEMON_JSON: only for a dockerd started with --config-file elsewhere (SIGHUP rereads that file).
DAEMON_JSON="${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}"

if ! command -v runsc >/dev/null 2>&1; then
    echo "installing runsc (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq runsc >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq runsc >/dev/null
    fi
fi
RUNSC="$(command -v runsc)"

mkdir -p "$(dirname "$DAEMON_JSON")"
changed="$(python3 - "$DAEMON_JSON" "$RUNSC" <<'EOF'
import json, os, sys

path, runsc = sys.argv[1], sys.argv[2]
config = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path) as handle:
        config = json.load(handle)
wanted = {
    "runsc": {"path": runsc, "runtimeArgs": ["--network=none", "--host-uds=open"]},
    "runsc-host": {"path": runsc, "runtimeArgs": ["--network=host", "--host-uds=open"]},
}
runtimes = config.setdefault("runtimes", {})
if all(runtimes.get(name) == spec for name, spec in wanted.items()):
    print("no")
    sys.exit(0)
runtimes.update(wanted)
tmp = path + ".sandboxd-tmp"
with open(tmp, "w") as handle:
    json.dump(config, handle, indent=2)
    handle.write("\n")
os.replace(tmp, path)
print("yes")
EOF
)"

registered() {
    local runtimes
    runtimes="$(docker info --format '{{json .Runtimes}}' 2>/dev/null)" || return 1
    [[ "$runtimes" == *'"runsc"'* && "$runtimes" == *'"runsc-host"'* ]]
}

if [[ "$changed" == "no" ]] && registered; then
    echo "gVisor runtimes already registered ($RUNSC)"
    exit 0
fi

pid=""
if [[ -s /var/run/docker.pid ]]; then
    pid="$(cat /var/run/docker.pid)"
fi
if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
    pid="$(pidof dockerd || true)"
fi
if [[ -z "$pid" ]]; then
    echo "dockerd is not running on this machine; start it (scripts/setup-engine.sh) and run this again" >&2
    exit 1
fi
echo "reloading dockerd (pid $pid) with the runtimes of $DAEMON_JSON"
kill -HUP "$pid"
for _ in $(seq 1 30); do
    if registered; then
        echo "gVisor runtimes registered: runsc, runsc-host ($RUNSC, $("$RUNSC" --version 2>/dev/null | head -n 1))"
        exit 0
    fi
    sleep 1
done
echo "dockerd did not pick up the runtimes; check $DAEMON_JSON and the dockerd log" >&2
exit 1
