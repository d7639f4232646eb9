#!/usr/bin/env bash
# The newest anthropic SDK that pyproject.toml allows, tested on purpose before the lock takes it: a
# throwaway virtualenv gets the locked dependencies (requirements.lock), then the newest release in
# pyproject's anthropic range (and whatever newer dependency it needs, nothing else), then runs the
# suites that drive the SDK in this process. It prints the version it tested and a PASS or FAIL line
# naming it. .venv is not touched.
#
#   scripts/sdk-latest.sh                          the newest release the range allows (`make sdk-latest`)
#   SDK='anthropic==2.17.0' scripts/sdk-latest.sh  another version, e.g. to try an older one
#
# Covered: tests/unit; the SDK's worker and poller against the local control plane
# (tests/integration/test_controlplane*.py); the whole daemon with its sandboxes' EnvironmentWorker
# run in-process (test_log_secrets.py, test_readiness.py); the queue-stats exporter
# (test_exporter.py). Not covered: the suites that run containers (tests/e2e and the `docker`-marked
# tests), because the sandbox image's SDK comes from the lock: after `make lock-upgrade`,
# `make test` rebuilds the images with the new SDK and runs them.
#
# Environment: PYTHON (python3, a 3.11 interpreter), SDK (default: the anthropic requirement of
# pyproject.toml), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
suites=(
    tests/unit
    tests/integration/test_controlplane.py
    tests/integration/test_controlplane_multiturn.py
    tests/integration/test_log_secrets.py
    tests/integration/test_readiness.py
    tests/integration/test_exporter.py
)
range=$("$python" -c '
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if re.match(r"anthropic\b", d)).replace(" ", ""))')
spec=${SDK:-$range}
locked=$(sed -n 's/^anthropic==\([^ ;\\]*\).*/\1/p' requirements.lock)

venv=$(mktemp -d "${TMPDIR:-/tmp}/sandboxd-sdk-latest.XXXXXX")
trap 'rm -rf "$venv"' EXIT
echo "sdk-latest: a throwaway virtualenv in $venv: requirements.lock, then $spec"
"$python" -m venv "$venv"
vpython=$venv/bin/python
"$vpython" -m pip install --quiet --upgrade pip >/dev/null
"$vpython" -m pip install --quiet --require-hashes -r requirements.lock
# --upgrade only-if-needed (pip's default): the SDK's own dependencies move only where it needs more.
"$vpython" -m pip install --quiet --upgrade "$spec"
"$vpython" -m pip install --quiet --no-deps -e .
"$vpython" -m pip check
version=$("$vpython" -c 'import importlib.metadata as m; print(m.version("anthropic"))')
moved=$("$vpython" - <<'EOF'
import importlib.metadata, re

def name(raw):
    return re.sub(r"[-_.]+", "-", raw).lower()

locked = {}
for line in open("requirements.lock"):
    if m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line):
        locked[name(m[1])] = m[2]
for dist in importlib.metadata.distributions():
    n = name(dist.metadata["Name"])
    if n not in ("pip", "setuptools", "sandboxd") and locked.get(n) != dist.version:
        print(f"{n} {locked.get(n, '(not locked)')} -> {dist.version};", end=" ")
EOF
)
echo "sdk-latest: testing anthropic $version (range $range; requirements.lock pins $locked)"
echo "sdk-latest: versions that differ from the lock: ${moved:-none}"

# PYTEST_ARGS is a list of words on purpose.
# shellcheck disable=SC2086
if "$vpython" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} "${suites[@]}"; then
    echo "sdk-latest: PASS anthropic $version (unit, control plane, in-process daemon and exporter suites)"
else
    echo "sdk-latest: FAIL anthropic $version (unit, control plane, in-process daemon and exporter suites)"
    exit 1
fi
