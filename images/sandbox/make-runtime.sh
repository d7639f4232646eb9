#!/bin/sh
# make-runtime.sh OUT — the sandbox worker runtime, self-contained, at OUT (/opt/sandboxd-runtime).
#
# The entrypoint (sandboxd.entrypoint: the SDK's EnvironmentWorker on one work item) with its own
# interpreter, standard library, packages, every shared library they load and the dynamic loader
# itself. The daemon mounts it read-only into sandboxes of any image and runs
#   OUT/ld.so --library-path OUT/lib OUT/bin/python3 -I -S OUT/run.py ...
# so it uses neither the image's libc nor its Python (an image may have neither: musl, static,
# distroless-with-bash). Processes it starts (/bin/bash, rg, git) are the image's, with the image's
# own libraries: the loader's library path is not inherited.
#
# Runs in the sandbox image's build stage, where /opt/sandboxd is the venv of sandboxd and its locked
# dependencies on the distribution's python3.
set -eu
out=$1
venv=/opt/sandboxd
py=$(readlink -f "$venv/bin/python3")
ver=$("$venv/bin/python3" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
stdlib=$("$venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/site"
cp "$py" "$out/bin/python3"
# The standard library where the interpreter looks for it (prefix/lib/pythonX.Y, found from bin/python3),
# without what a worker never imports.
cp -a "$stdlib" "$out/lib/python$ver"
for unused in test idlelib tkinter turtledemo ensurepip lib2to3 pydoc_data distutils/tests; do
  rm -rf "$out/lib/python$ver/$unused"
done
cp -a "$venv/lib/python$ver/site-packages/." "$out/site/"
find "$out" -name __pycache__ -prune -exec rm -rf {} +
# Every ELF file's libraries (ldd gives the closure) and the loader, which is also the program run.
find "$out" -type f \( -name '*.so' -o -name '*.so.*' -o -path "$out/bin/*" \) | while read -r elf; do
  ldd "$elf" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p'
done | sort -u | while read -r lib; do
  cp -L "$lib" "$out/lib/"
done
loader=$(ldd "$out/bin/python3" | sed -n 's/^[[:space:]]*\(\/[^ ]*ld-linux[^ ]*\) (.*/\1/p' | head -1)
test -n "$loader"
cp -L "$loader" "$out/ld.so"
cat > "$out/run.py" <<'PY'
"""The sandbox entrypoint, run by the runtime's own interpreter (-I -S): its packages, then the worker."""
import site
import sys

site.addsitedir(sys.prefix + "/site")
from sandboxd.entrypoint import main  # noqa: E402

main()
PY
# Compiled once here (hash-checked against nothing: the files never change), so a sandbox's start
# does not compile the SDK into memory every time.
"$venv/bin/python3" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$out/lib/python$ver" "$out/site" "$out/run.py" >/dev/null
chmod -R a+rX,go-w "$out"
# Proof that it stands alone: the worker imports with nothing but the runtime on its paths.
env -i "$out/ld.so" --library-path "$out/lib" "$out/bin/python3" -I -S -c \
  "import site, sys; site.addsitedir(sys.prefix + '/site'); import sandboxd.entrypoint, ssl, anthropic.lib.environments"
# Written last: the daemon checks for it in the volume it fills from this directory.
echo "python$ver $(cat "$venv"/lib/python"$ver"/site-packages/sandboxd-*.dist-info/METADATA | sed -n 's/^Version: //p')" > "$out/.complete"
