#!/usr/bin/env bash
# Everything a fresh machine needs to run the demo and the tests: a virtualenv with sandboxd and its
# dev tools at the versions in requirements.lock (.venv), a running Docker engine, and the two
# images (built from a debootstrap base when no registry is reachable). Idempotent: a second run
# only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
# Exactly the tested versions (requirements.lock, hash-checked: `make lock` writes it from
# pyproject.toml), then sandboxd itself, editable, without letting pip pick anything else.
.venv/bin/python -m pip install --quiet --require-hashes -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps -e .
# checkov (the chart's security scan, tests only) pins an old `packaging` that pytest cannot use:
# it gets a venv of its own, from its own lock.
if [ "${WITH_TEST_TOOLS:-0}" = 1 ]; then
    [ -x .venv-checkov/bin/python ] || "$python" -m venv .venv-checkov
    .venv-checkov/bin/python -m pip install --quiet --require-hashes -r requirements-checkov.lock
fi

scripts/setup-engine.sh
# gVisor (Debian's runsc), registered with the engine as `runsc` and `runsc-host`: the tests run
# sessions under it.
if [ "${WITH_TEST_TOOLS:-0}" = 1 ]; then
    scripts/setup-gvisor.sh
fi
# debootstrap builds the local base image. For the tests: promtool (Debian's prometheus) checks the
# alert rules, sshd (openssh-server) serves git over ssh on loopback.
packages=""
command -v debootstrap >/dev/null 2>&1 || packages="debootstrap"
if [ "${WITH_TEST_TOOLS:-0}" = 1 ]; then
    command -v promtool >/dev/null 2>&1 || packages="$packages prometheus"
    [ -x /usr/sbin/sshd ] || packages="$packages openssh-server"
fi
if [ -n "$packages" ]; then
    apt-get update -qq
    # shellcheck disable=SC2086 # a list of package names
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
fi

# Rebuild when the sources the images are made of changed (so tests never run a stale sandbox).
source_hash=$(find src images pyproject.toml requirements.lock -type f -not -path '*/__pycache__/*' -print0 | sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16)
built_hash=$(docker image inspect -f '{{ index .Config.Labels "io.sandboxd.source-hash" }}' sandboxd-sandbox:latest 2>/dev/null || true)
if [ "$built_hash" != "$source_hash" ] || ! docker image inspect sandboxd:latest >/dev/null 2>&1 || [ "${REBUILD:-0}" = 1 ]; then
    # No registry here: the base image is built locally with debootstrap unless BASE_IMAGE is given.
    if [ -z "${BASE_IMAGE:-}" ]; then export SANDBOXD_LOCAL_BASE=1; fi
    SOURCE_HASH=$source_hash PYTHON=.venv/bin/python images/build.sh
else
    echo "images up to date (source $source_hash)"
fi
