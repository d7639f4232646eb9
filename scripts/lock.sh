#!/usr/bin/env bash
# Writes the locks, with hashes, for the images' Python (Debian bookworm's 3.11) on linux x86_64:
#   requirements.lock          sandboxd's dependencies with its `controlplane` and `dev` extras: the
#                              daemon, the sandbox image's worker, the test, lint and type tools
#   requirements-checkov.lock  checkov, which gets a virtualenv of its own (.venv-checkov)
# from pyproject.toml and requirements-checkov.in. scripts/bootstrap.sh installs from them and
# images/build.sh builds the images' wheelhouse with them, so a fresh clone installs what was tested.
#
#   scripts/lock.sh                               keep every pin that still fits the inputs (`make lock`)
#   scripts/lock.sh --upgrade                     the newest release of everything (`make lock-upgrade`)
#   scripts/lock.sh --upgrade-package anthropic   the newest release of one package
#   scripts/lock.sh --check                       exit 1 if the locks are not what the inputs make (CI)
#
# Environment: UV (.venv/bin/uv: uv is one of the dev tools, so it is in the lock too).
set -euo pipefail
cd "$(dirname "$0")/.."

uv=${UV:-.venv/bin/uv}
if [ ! -x "$uv" ]; then
    echo "scripts/lock.sh: no $uv; \`make bootstrap\` installs it (uv is a dev tool), or set UV." >&2
    exit 1
fi
check=0
if [ "${1:-}" = --check ]; then check=1; shift; fi

compile() {  # <output> <input> [uv pip compile options]
    local output=$1 input=$2
    shift 2
    # uv reads neither pip.conf nor pip's constraints: the lock is resolved against PyPI alone. An
    # existing output is read for its pins, which uv keeps while they fit (unless --upgrade).
    "$uv" pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --custom-compile-command "make lock" "$@" --output-file "$output" "$input"
}

if [ "$check" = 0 ]; then
    compile requirements.lock pyproject.toml --extra dev "$@"
    compile requirements-checkov.lock requirements-checkov.in "$@"
    exit 0
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for lock in requirements.lock requirements-checkov.lock; do
    cp "$lock" "$scratch/$lock"
done
compile "$scratch/requirements.lock" pyproject.toml --extra dev
compile "$scratch/requirements-checkov.lock" requirements-checkov.in
for lock in requirements.lock requirements-checkov.lock; do
    if ! diff -u "$lock" "$scratch/$lock"; then
        echo "$lock is not what \`make lock\` makes of its inputs: run \`make lock\` and commit it." >&2
        status=1
    fi
done
[ "$status" = 0 ] && echo "locks match pyproject.toml and requirements-checkov.in"
exit "$status"
