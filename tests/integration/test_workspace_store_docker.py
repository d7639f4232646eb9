"""The workspace snapshot store through a real Docker engine (issues 12 and 18): what one sandbox leaves in
its /workspace volume is saved with `get_archive` and delivered into the next sandbox's fresh volume with
`put_archive`, owned by the sandbox user, links kept as links (those put_archive would refuse with the
absolute target they resolve to), fifos left out; a hostile workspace costs the saving daemon bounded
memory and does not hold up another session's restore."""

from __future__ import annotations

import io
import secrets
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from sandboxd.workspace.store import RestoreResult, SnapshotError, WorkspaceStore

pytestmark = pytest.mark.docker

LABEL = "io.sandboxd.test=store"
USER = "10001:10001"

WRITER = r"""
set -e
cd /workspace
mkdir -p src/pkg
printf 'print("hello")\n' > src/main.py
chmod 755 src/main.py
head -c 200000 /dev/urandom > src/pkg/blob.bin
printf 'secret notes\n' > notes.txt
chmod 600 notes.txt
ln -s /etc/shadow shadow-link
ln -s src/main.py main-link
ln src/main.py src/main-hard.py
mkfifo pipe
printf 'latin-1 name\n' > "$(printf 'caf\351')"
printf 'spinning\n' > spin-a
touch ready
# a file renamed over and over while the daemon saves the running container
end=$(( $(date +%s) + 4 ))
while [ "$(date +%s)" -lt "$end" ]; do mv spin-a spin-b; mv spin-b spin-a; done
"""

CHECKER = r"""
cd /workspace
for p in src src/main.py src/main-hard.py src/pkg/blob.bin notes.txt shadow-link main-link spin-a; do
  stat -c 'STAT %n %u:%g %a %F %h' "$p"
done
echo "LINK shadow-link $(readlink shadow-link)"
echo "LINK main-link $(readlink main-link)"
echo "MAIN $(cat src/main.py)"
echo "SUM $(md5sum src/pkg/blob.bin | cut -c1-32)"
[ -e pipe ] || [ -L pipe ] && echo "PIPE present" || echo "PIPE absent"
[ -e spin-b ] && echo "SPINB present" || echo "SPINB absent"
cat shadow-link >/dev/null 2>&1 && echo "SHADOW readable" || echo "SHADOW unreadable"
echo "LATIN1 $(cat "$(printf 'caf\351')")"
"""


@pytest.fixture
def engine(docker_client: Any, sandbox_image: str) -> Iterator[dict[str, Any]]:
    """Containers and volumes made by a test, removed afterwards (all labelled io.sandboxd.test=store)."""
    made: dict[str, Any] = {"containers": [], "volumes": [], "image": sandbox_image, "client": docker_client}
    yield made
    for container in made["containers"]:
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    for volume in made["volumes"]:
        try:
            volume.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    client = docker_client
    assert not client.containers.list(all=True, filters={"label": LABEL, "id": [c.id for c in made["containers"]]})


def sandbox(engine: dict[str, Any], script: str) -> Any:
    client = engine["client"]
    name = f"store-test-{secrets.token_hex(4)}"
    volume = client.volumes.create(name=f"{name}-workspace", labels={"io.sandboxd.test": "store"})
    engine["volumes"].append(volume)
    container = client.containers.create(
        engine["image"], entrypoint=["/bin/sh", "-c", script], user=USER, network_mode="none", name=name,
        labels={"io.sandboxd.test": "store"}, volumes={volume.name: {"bind": "/workspace", "mode": "rw"}},
        cap_drop=["ALL"], security_opt=["no-new-privileges"], read_only=True, tmpfs={"/tmp": "rw,size=16m"})
    engine["containers"].append(container)
    return container


def wait_for(container: Any, path: str, timeout_seconds: float = 30) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if container.exec_run(["test", "-e", path], user=USER).exit_code == 0:
            return
        time.sleep(0.2)
    pytest.fail(f"{path} did not appear in the writer container")


def test_a_workspace_survives_into_the_next_sandbox(engine: dict[str, Any], tmp_path: Path) -> None:
    store = WorkspaceStore(tmp_path / "workspaces", max_bytes=64 << 20, store_max_bytes=1 << 30,
                           retention_seconds=86400, uid=10001, gid=10001, spool_dir=tmp_path)
    writer = sandbox(engine, WRITER)
    writer.start()
    wait_for(writer, "/workspace/ready")

    # Saved while a file is being renamed: a clean snapshot or a clean refusal, never a broken entry.
    stream, _ = writer.get_archive("/workspace")
    try:
        live = store.save("sesn_live", stream)
    except SnapshotError as exc:
        assert exc.reason in ("corrupt", "unsafe")
    else:
        with store.restore("sesn_live") as restored:
            assert restored.result is RestoreResult.HIT and live.members >= 9

    assert writer.wait(timeout=60)["StatusCode"] == 0
    stream, _ = writer.get_archive("/workspace")
    saved = store.save("sesn_docker", stream)
    assert saved.dropped == {"fifo": 1}
    assert saved.content_bytes >= 200_000

    checker = sandbox(engine, CHECKER)
    with store.restore("sesn_docker") as restored:
        assert restored.result is RestoreResult.HIT and restored.archive is not None
        assert checker.put_archive("/workspace", restored.archive)
    checker.start()
    assert checker.wait(timeout=60)["StatusCode"] == 0
    out = checker.logs().decode()
    expected_sum = writer_sum(engine, writer)
    stats = {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.startswith("STAT ")}
    assert set(stats) == {"src", "src/main.py", "src/main-hard.py", "src/pkg/blob.bin", "notes.txt", "shadow-link",
                          "main-link", "spin-a"}, out
    assert all(fields[0] == "10001:10001" for fields in stats.values()), out
    assert stats["src/main.py"][1] == "755" and stats["notes.txt"][1] == "600", out
    assert stats["shadow-link"][2:4] == ["symbolic", "link"] and stats["main-link"][2:4] == ["symbolic", "link"]
    assert stats["src/main.py"][-1] == "2" and stats["src/main-hard.py"][-1] == "2", out  # still one inode
    assert "LINK shadow-link /etc/shadow" in out and "LINK main-link src/main.py" in out
    assert 'MAIN print("hello")' in out and f"SUM {expected_sum}" in out
    assert "LATIN1 latin-1 name" in out
    assert "PIPE absent" in out and "SPINB absent" in out and "SHADOW unreadable" in out


def writer_sum(engine: dict[str, Any], writer: Any) -> str:
    """md5 of the blob as the first sandbox wrote it, read from its volume by a throwaway container."""
    client = engine["client"]
    volume = writer.attrs["Mounts"][0]["Name"]
    output = client.containers.run(
        engine["image"], entrypoint=["/bin/sh", "-c", "md5sum /workspace/src/pkg/blob.bin | cut -c1-32"],
        user=USER, network_mode="none", remove=True, labels={"io.sandboxd.test": "store"},
        volumes={volume: {"bind": "/workspace", "mode": "ro"}})
    return str(output.decode().strip())


LINKS = r"""
set -e
cd /workspace
ln -s ../../etc up
mkdir -p a/b sub
ln -s ../../../etc/passwd a/b/passwd
ln -s ../x a/in
ln -s a/../../etc mid
ln -s /../../etc/hosts abs-up
ln -s sub/p/.. esc
ln -s .. sub/p
ln -s ../../x/../../../../y weird
"""

LINK_CHECKER = r"""
cd /workspace
for l in up a/b/passwd a/in mid abs-up esc sub/p weird; do echo "LINK $l $(readlink "$l" || echo ABSENT)"; done
test -f up/hostname && echo "UP resolves"
test -f a/b/passwd/../passwd 2>/dev/null; head -c 5 a/b/passwd && echo
"""


def test_links_that_climb_out_of_the_workspace_round_trip(engine: dict[str, Any], tmp_path: Path) -> None:
    """`ln -s ../../etc up` made a session's every later restore fail (put_archive: invalid symlink). Such a
    link is kept with the absolute target it resolves to, and the snapshot is extracted by the engine."""
    store = WorkspaceStore(tmp_path / "workspaces", max_bytes=1 << 20, store_max_bytes=1 << 30,
                           retention_seconds=86400, uid=10001, gid=10001, spool_dir=tmp_path)
    writer = sandbox(engine, LINKS)
    writer.start()
    assert writer.wait(timeout=60)["StatusCode"] == 0, writer.logs()

    verbatim = _tar([("up", "../../etc")])  # the link as the store used to keep it
    with pytest.raises(docker.errors.APIError, match="invalid symlink"):
        sandbox(engine, "true").put_archive("/workspace", verbatim)
    saved = store.save("sesn_links", writer.get_archive("/workspace")[0])
    assert saved.links_rewritten == 4 and saved.dropped == {"symlink": 1}  # weird leads nowhere expressible

    checker = sandbox(engine, LINK_CHECKER)
    with store.restore("sesn_links") as restored:
        assert restored.result is RestoreResult.HIT and restored.archive is not None
        assert checker.put_archive("/workspace", restored.archive)
    checker.start()
    assert checker.wait(timeout=60)["StatusCode"] == 0
    out = checker.logs().decode()
    links = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("LINK ")}
    assert links == {"up": "/etc", "a/b/passwd": "/etc/passwd", "a/in": "../x", "mid": "/workspace/a/../../etc",
                     "abs-up": "/etc/hosts", "esc": "sub/p/..", "sub/p": "..", "weird": "ABSENT"}, out
    assert "UP resolves" in out and "root:" in out


HOSTILE = r"""
set -e
cd /workspace
deep=$(printf 'd/%.0s' $(seq 1 1400))
mkdir -p "$deep"
cd "$deep"
pad=$(printf 'x%.0s' $(seq 1 240))
i=0
while [ $i -lt {files} ]; do : > "$i$pad"; i=$((i+1)); done
"""


def test_a_hostile_workspace_costs_bounded_memory_and_holds_up_no_other_restore(
        engine: dict[str, Any], tmp_path: Path) -> None:
    """Thousands of files ~3 KB deep below 1400 directories: the save's Python heap stays a few MB (it keeps
    a hash per member, never the names: ~30 MB of them here), the time per member does not grow with the
    depth, and a names budget refuses a bigger one. Meanwhile another session's restore goes through."""
    store = WorkspaceStore(tmp_path / "workspaces", max_bytes=1 << 20, store_max_bytes=1 << 30,
                           retention_seconds=86400, uid=10001, gid=10001, spool_dir=tmp_path)
    writer = sandbox(engine, HOSTILE.replace("{files}", "10000"))
    writer.start()
    assert writer.wait(timeout=300)["StatusCode"] == 0, writer.logs()[-2000:]

    tracemalloc.start()
    try:
        saved = store.save("sesn_hostile", writer.get_archive("/workspace")[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert saved.members == 11_400
    assert peak < 16 << 20, peak  # the names alone are ~33 MB; the get_archive chunks are 2 MB each

    tight = WorkspaceStore(tmp_path / "tight", max_bytes=1 << 20, store_max_bytes=1 << 30, retention_seconds=86400,
                           uid=10001, gid=10001, spool_dir=tmp_path, max_name_bytes=8 << 20)
    with pytest.raises(SnapshotError) as caught:
        tight.save("sesn_hostile", writer.get_archive("/workspace")[0])
    assert caught.value.reason == "names_too_large"

    # A hostile save in flight does not hold up another session's restore.
    store.save("sesn_other", iter([_small_workspace()]))
    running = threading.Event()
    done = threading.Event()

    def hostile_save() -> None:
        running.set()
        try:
            store.save("sesn_hostile", writer.get_archive("/workspace")[0])
        finally:
            done.set()

    thread = threading.Thread(target=hostile_save)
    thread.start()
    try:
        assert running.wait(10)
        checker = sandbox(engine, "cat /workspace/hello")
        began = time.monotonic()
        with store.restore("sesn_other") as restored:
            assert restored.result is RestoreResult.HIT and restored.archive is not None
            assert checker.put_archive("/workspace", restored.archive)
        seconds = time.monotonic() - began
        hostile_still_running = not done.is_set()
    finally:
        thread.join(120)
    checker.start()
    assert checker.wait(timeout=60)["StatusCode"] == 0 and checker.logs() == b"hello\n"
    assert seconds < 10, seconds
    assert hostile_still_running or seconds < 2  # (a fast machine may finish the hostile save first)


def _small_workspace() -> bytes:
    return _tar([("workspace", None), ("workspace/hello", b"hello\n")])


def _tar(members: list[tuple[str, bytes | str | None]]) -> bytes:
    """Directories (None), files (bytes) and symlinks (str: the target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, what in members:
            member = tarfile.TarInfo(name)
            member.uid = member.gid = 10001
            if what is None:
                member.type = tarfile.DIRTYPE
                tar.addfile(member)
            elif isinstance(what, str):
                member.type, member.linkname = tarfile.SYMTYPE, what
                tar.addfile(member)
            else:
                member.size = len(what)
                tar.addfile(member, io.BytesIO(what))
    return buf.getvalue()
