#!/usr/bin/env bash
# Build the sandbox and daemon images from a clean checkout.
#
#   images/build.sh                 wheelhouse + both images (base: $BASE_IMAGE, default debian:bookworm-slim;
#                                   with SANDBOXD_LOCAL_BASE=1 a debootstrap-built sandboxd-base:bookworm)
#   images/build.sh wheelhouse      only the wheels (build/wheelhouse), built on the host
#
# Environment: BASE_IMAGE, SANDBOX_TAG (sandboxd-sandbox:latest), DAEMON_TAG (sandboxd:latest), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
sandbox_tag=${SANDBOX_TAG:-sandboxd-sandbox:latest}
daemon_tag=${DAEMON_TAG:-sandboxd:latest}

wheelhouse() {
    rm -rf build/wheelhouse
    mkdir -p build/wheelhouse
    # The images run Debian's python3 (3.11 on bookworm); the wheels must match it.
    "$python" -m pip wheel --quiet --wheel-dir build/wheelhouse . >/dev/null
    echo "wheelhouse: $(ls build/wheelhouse | wc -l) wheels in build/wheelhouse"
}

if [ "${1:-}" = wheelhouse ]; then wheelhouse; exit 0; fi

if [ "${SANDBOXD_LOCAL_BASE:-0}" = 1 ]; then
    images/build-base.sh sandboxd-base:bookworm
    base=${BASE_IMAGE:-sandboxd-base:bookworm}
else
    base=${BASE_IMAGE:-debian:bookworm-slim}
fi
wheelhouse
# --network host: apt inside the build reaches the mirror even when dockerd runs with --bridge=none.
for spec in "sandbox:$sandbox_tag" "daemon:$daemon_tag"; do
    dir=${spec%%:*} tag=${spec#*:}
    echo "building $tag (images/$dir, base $base)"
    docker build --quiet --network host --build-arg BASE_IMAGE="$base" -f "images/$dir/Dockerfile" -t "$tag" . >/dev/null
done
echo "built $sandbox_tag and $daemon_tag"
