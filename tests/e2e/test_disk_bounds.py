"""/workspace bounded by a filesystem of its own: hogs are refused by the kernel, linked or not.

The daemon runs as root on the engine's host here, so `workspace_quota = filesystem` applies: each
sandbox's /workspace is a loop-mounted ext4 of workspace_max_bytes and workspace_max_inodes. A
write past either fails with ENOSPC inside the hostile session, which goes on (it only hurt
itself), while its neighbour completes; nothing (container, volume, mount, image) is left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandboxd.controlplane.scenario import Expect, ScriptedSession, ToolStep
from tests.e2e.conftest import Harness

ENOSPC = "No space left on device"


def _bash(command: str, **expect: Any) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(**expect))


def _mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(path) in line]


def test_linked_unlinked_and_inode_hogs_are_refused_while_the_neighbour_completes(harness: Harness) -> None:
    cp = harness.control_plane
    linked = cp.add_session(ScriptedSession(steps=[
        _bash("head -c 200000000 /dev/zero > /workspace/fill; echo status=$?; ls -l /workspace/fill",
              contains=[ENOSPC, "status=1"]),
        _bash("rm /workspace/fill && echo freed && df -P /workspace | tail -1", contains=["freed"]),
    ]))
    unlinked = cp.add_session(ScriptedSession(steps=[
        # The file is gone from the tree but holds its blocks: a size poll never sees it, the filesystem does.
        _bash("exec 3>/workspace/ghost; rm /workspace/ghost; head -c 200000000 /dev/zero >&3; echo status=$?",
              contains=[ENOSPC, "status=1"]),
    ]))
    inodes = cp.add_session(ScriptedSession(steps=[
        _bash("cd /workspace && for i in $(seq 1 5000); do : > f$i 2>/dev/null || { echo refused-at-$i; break; }; "
              "done; df -Pi /workspace | tail -1", contains=["refused-at-"]),
    ]))
    neighbour = cp.add_session(ScriptedSession(steps=[
        _bash("echo hello > /workspace/n && cat /workspace/n", is_error=False, contains=["hello"]),
    ]))

    run = harness.drain("--max-sessions", "4", SANDBOXD_WORKSPACE_QUOTA="filesystem",
                        SANDBOXD_WORKSPACE_MAX_BYTES=str(64 * 2**20), SANDBOXD_WORKSPACE_MAX_INODES="2048")

    assert run.returncode == 0, run.output[-4000:]
    assert "workspace_quota mode=filesystem" in run.output
    state = cp.state_snapshot()
    for session in (linked, unlinked, inodes, neighbour):
        assert state["sessions"][session.session_id]["passed"], state["sessions"][session.session_id]
        work = state["work"][session.work_id]
        assert work["state"] == "stopped" and len(work["stops"]) == 1
    refused_at = next(r["text"] for r in state["sessions"][inodes.session_id]["results"] if "refused-at-" in r["text"])
    assert int(refused_at.split("refused-at-")[1].split()[0]) <= 2048
    assert harness.leftovers() == {"containers": [], "volumes": []}
    disks = harness.state_dir / "disks"
    assert not _mounts_under(disks), "every workspace filesystem is unmounted"
    assert not disks.exists() or list(disks.iterdir()) == [], "and its image deleted"


def test_filesystem_quota_where_impossible_is_a_config_error(harness: Harness) -> None:
    run = harness.drain(SANDBOXD_WORKSPACE_QUOTA="filesystem", DOCKER_HOST="tcp://127.0.0.1:1")
    assert run.returncode == 2, run.output[-3000:]
    assert "workspace_quota = filesystem" in run.output and "not local" in run.output
