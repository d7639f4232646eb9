"""The workspace snapshot store through a real Docker engine (issue 12): what one sandbox leaves in its
/workspace volume is saved with `get_archive` and delivered into the next sandbox's fresh volume with
`put_archive`, owned by the sandbox user, links kept as links, fifos left out."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        cap_drop=["ALL"], security_opt=["no-new-privileges"])
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
