#!/usr/bin/env bash
# Build the sandbox and daemon images from a clean checkout.
#
#   images/build.sh                 wheelhouse + both images (base: $BASE_IMAGE, default debian:bookworm-slim;
#                                   with SANDBOXD_LOCAL_BASE=1 a debootstrap-built sandboxd-base:bookworm)
#   images/build.sh wheelhouse      only the wheels (build/wheelhouse), built on the host
#
# Each image is tagged twice: :latest (or SANDBOX_TAG / DAEMON_TAG) and the package version, the tag
# the Helm chart uses by default.
#
# The wheels are built on the host, so the images need neither pip nor a compiler nor network access
# to a package index. They must match the image's python3: Debian bookworm ships 3.11, so PYTHON must
# be a 3.11 interpreter for the default base (PYTHON_MINOR says which minor the base has). The
# dependencies are the versions of requirements.lock, hash-checked: the images run what was tested.
#
# Environment: BASE_IMAGE, SANDBOX_TAG (sandboxd-sandbox:latest), DAEMON_TAG (sandboxd:latest), PYTHON,
# PYTHON_MINOR (3.11), DOCKER_BUILD_NETWORK (host).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
python_minor=${PYTHON_MINOR:-3.11}
sandbox_tag=${SANDBOX_TAG:-sandboxd-sandbox:latest}
daemon_tag=${DAEMON_TAG:-sandboxd:latest}
# host: apt inside the build reaches the mirror even when dockerd runs with --bridge=none.
network=${DOCKER_BUILD_NETWORK:-host}

wheelhouse() {
    local have
    have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$have" != "$python_minor" ]; then
        echo "images/build.sh: $python is Python $have; the image's python3 is $python_minor." >&2
        echo "Set PYTHON to a $python_minor interpreter (or PYTHON_MINOR for another base image)." >&2
        exit 1
    fi
    rm -rf build/wheelhouse
    mkdir -p build/wheelhouse
    # sandboxd's dependencies at the versions of requirements.lock, given as constraints without their
    # hashes (pip versions differ on hashes in a constraints file): only what sandboxd needs, none of
    # the dev tools. Then every wheel is checked against the lock's hashes.
    sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*--hash/d' -e 's/[[:space:]]*\\$//' requirements.lock \
        > build/wheelhouse-constraints.txt
    "$python" -m pip wheel --quiet --wheel-dir build/wheelhouse -c build/wheelhouse-constraints.txt . >/dev/null
    "$python" - build/wheelhouse requirements.lock <<'EOF'
import hashlib, pathlib, re, sys

def key(name, version):
    return re.sub(r"[-_.]+", "-", name).lower(), version

locked, hashes = {}, set()
for line in pathlib.Path(sys.argv[2]).read_text().splitlines():
    if m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line):
        hashes = locked.setdefault(key(m[1], m[2]), set())
    elif m := re.search(r"--hash=sha256:([0-9a-f]{64})", line):
        hashes.add(m[1])
wheels = [w for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")) if not w.name.startswith("sandboxd-")]
bad = [w.name for w in wheels
       if hashlib.sha256(w.read_bytes()).hexdigest() not in locked.get(key(*w.name.split("-")[:2]), ())]
if bad:
    sys.exit(f"images/build.sh: not a file of requirements.lock (version or hash): {', '.join(bad)}")
EOF
    echo "wheelhouse: $(find build/wheelhouse -name '*.whl' | wc -l) wheels in build/wheelhouse (requirements.lock)"
}

if [ "${1:-}" = wheelhouse ]; then wheelhouse; exit 0; fi

if [ "${SANDBOXD_LOCAL_BASE:-0}" = 1 ]; then
    images/build-base.sh sandboxd-base:bookworm
    base=${BASE_IMAGE:-sandboxd-base:bookworm}
else
    base=${BASE_IMAGE:-debian:bookworm-slim}
fi
wheelhouse
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
for spec in "sandbox=$sandbox_tag" "daemon=$daemon_tag"; do
    dir=${spec%%=*} tag=${spec#*=}
    versioned="${tag%:*}:$version"
    echo "building $tag and $versioned (images/$dir, base $base)"
    docker build --quiet --network "$network" --build-arg BASE_IMAGE="$base" --build-arg VERSION="$version" \
        ${SOURCE_HASH:+--label "io.sandboxd.source-hash=$SOURCE_HASH"} \
        -f "images/$dir/Dockerfile" -t "$tag" -t "$versioned" . 2>&1 >/dev/null \
        | { grep -vE 'DEPRECATED: The legacy builder|buildx component|docs.docker.com/go/buildx|^[[:space:]]*$' || true; }
done
echo "built $sandbox_tag and $daemon_tag (also tagged :$version)"
