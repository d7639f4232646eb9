"""A session keeps its /workspace across its work items: one daemon, and two daemons sharing a store.

Turn 1 writes a file and changes a fetched repository; the session goes idle, its item is stopped,
the user speaks again and a new work item (with its own token) is queued. Turn 2 must find both
changes: the workspace is restored, the repository not fetched over it again.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from sandboxd.controlplane.scenario import Expect, ScriptedSession, ToolStep
from sandboxd.workspace import store as store_module
from sandboxd.workspace.snapshot import CopyStats
from sandboxd.workspace.store import WorkspaceStore
from tests.conftest import managed_leftovers
from tests.e2e.conftest import Harness
from tests.integration.conftest import GitFixture


def _bash(command: str, **expect: Any) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(**expect))


def _two_turns(app_url: str, tag: str) -> ScriptedSession:
    return ScriptedSession(
        metadata={"repo": app_url},
        turns=[
            [
                _bash(f"mkdir -p notes && echo turn1-{tag} > notes/t1.txt && echo changed-{tag} >> app/run.sh && "
                      "ln -s /etc/passwd notes/link", is_error=False),
            ],
            [
                ToolStep(name="read", input={"file_path": "notes/t1.txt"},
                         expect=Expect(is_error=False, contains=[f"turn1-{tag}"])),
                _bash("tail -1 app/run.sh; stat -c '%u:%g' notes/t1.txt; readlink notes/link",
                      is_error=False, contains=[f"changed-{tag}", "10001:10001", "/etc/passwd"]),
            ],
        ],
    )


def _git_env(git_fixture: GitFixture) -> dict[str, str]:
    return {"SANDBOXD_GIT_ALLOWED_HOSTS": json.dumps([git_fixture.server.host])}


def _wait_done(harness: Harness, session_id: str, timeout: float = 150) -> dict[str, Any]:
    return harness.control_plane.wait_for(lambda s: s["sessions"][session_id]["done"], timeout=timeout)


def test_second_turn_finds_the_first_turns_files(harness: Harness, git_fixture: GitFixture) -> None:
    cp = harness.control_plane
    session = cp.add_session(_two_turns(git_fixture.url(git_fixture.repos.app), "one"))
    run = harness.start("run", **_git_env(git_fixture))
    try:
        state = _wait_done(harness, session.session_id)
    finally:
        harness.signal(run)
        harness.wait(run, timeout=60)

    record = state["sessions"][session.session_id]
    assert record["passed"], record["results"]
    assert len(record["work_ids"]) == 2 and record["work_ids"][0] != record["work_ids"][1]
    assert run.output.count("workspace_repo ") == 1, "the repository is fetched for the first turn only"
    assert "workspace_restore result=miss" in run.output and "workspace_restore result=hit" in run.output
    assert "workspace_deleted" in run.output and "reason=terminated" in run.output
    for work_id in record["work_ids"]:
        assert cp.state_snapshot()["work"][work_id]["stops"] == [{"credential": "sessions_token", "force": True}]
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_two_daemons_share_only_the_store(harness: Harness, git_fixture: GitFixture, tmp_path: Path) -> None:
    cp = harness.control_plane
    store = tmp_path / "shared-store"
    session = cp.add_session(_two_turns(git_fixture.url(git_fixture.repos.app), "two"))
    neighbour = cp.add_session(ScriptedSession(steps=[
        _bash("ls /workspace; cat /workspace/notes/t1.txt 2>&1 || echo NO-SUCH-FILE", contains=["NO-SUCH-FILE"]),
    ]))
    shared = {**_git_env(git_fixture), "SANDBOXD_WORKSPACE_STORE_DIR": str(store)}

    # The first daemon drains what is queued now: turn 1 and the neighbour. Turn 2 is queued later.
    first = harness.drain(env=shared, SANDBOXD_STATE_DIR=str(tmp_path / "state-a"))
    assert first.returncode == 0, first.output[-4000:]
    assert "workspace_saved" in first.output
    cp.wait_for(lambda s: len(s["sessions"][session.session_id]["work_ids"]) == 2, timeout=60)

    second_id = harness.worker_id + "-b"
    second = harness.start("run", **shared, SANDBOXD_STATE_DIR=str(tmp_path / "state-b"),
                           SANDBOXD_WORKER_ID=second_id)
    try:
        state = _wait_done(harness, session.session_id)
    finally:
        harness.signal(second)
        harness.wait(second, timeout=60)
    record = state["sessions"][session.session_id]
    assert record["passed"], record["results"]
    assert state["sessions"][neighbour.session_id]["passed"], "a session never sees another's workspace"
    assert "workspace_restore result=hit" in second.output and "workspace_repo " not in second.output
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert managed_leftovers(harness.docker, second_id) == {"containers": [], "volumes": []}


def test_a_corrupted_snapshot_is_refused_and_the_session_starts_fresh(
    harness: Harness, git_fixture: GitFixture, tmp_path: Path
) -> None:
    cp = harness.control_plane
    store = tmp_path / "store"
    session = cp.add_session(ScriptedSession(
        metadata={"repo": git_fixture.url(git_fixture.repos.app)},
        turns=[
            [_bash("echo kept > /workspace/kept.txt", is_error=False)],
            [_bash("cat /workspace/kept.txt 2>/dev/null || echo FRESH; test -f /workspace/app/run.sh && echo REFETCHED",
                   contains=["FRESH", "REFETCHED"], not_contains=["kept"])],
        ],
    ))
    env = {**_git_env(git_fixture), "SANDBOXD_WORKSPACE_STORE_DIR": str(store)}
    first = harness.drain(env=env)
    assert first.returncode == 0 and "workspace_saved" in first.output, first.output[-3000:]
    snapshots = [p for p in store.rglob("snap-*") if not p.name.endswith(".tmp")]
    assert len(snapshots) == 1
    data = bytearray(snapshots[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    snapshots[0].write_bytes(bytes(data))
    cp.wait_for(lambda s: len(s["sessions"][session.session_id]["work_ids"]) == 2, timeout=60)

    second = harness.start("run", **env)
    try:
        state = _wait_done(harness, session.session_id)
    finally:
        harness.signal(second)
        harness.wait(second, timeout=60)
    assert state["sessions"][session.session_id]["passed"], state["sessions"][session.session_id]["results"]
    assert "workspace_snapshot_corrupt" in second.output and "workspace_restore result=corrupt" in second.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_expired_workspace_is_fetched_fresh(harness: Harness, git_fixture: GitFixture) -> None:
    cp = harness.control_plane
    session = cp.add_session(ScriptedSession(
        metadata={"repo": git_fixture.url(git_fixture.repos.app)},
        turns=[[_bash("echo kept > /workspace/kept.txt", is_error=False)],
               [_bash("cat /workspace/kept.txt 2>&1 || echo FRESH", contains=["FRESH"])]],
    ))
    env = {**_git_env(git_fixture), "SANDBOXD_WORKSPACE_RETENTION_SECONDS": "3"}
    first = harness.drain(env=env)
    assert first.returncode == 0, first.output[-3000:]
    time.sleep(3.5)
    second = harness.start("run", **env)
    try:
        state = _wait_done(harness, session.session_id)
    finally:
        harness.signal(second)
        harness.wait(second, timeout=60)
    assert state["sessions"][session.session_id]["passed"]
    # Expired: refused at restore, or already swept by the daemon's start-up sweep.
    assert "workspace_restore result=expired" in second.output or "workspace_store_swept expired=1" in second.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_a_link_climbing_out_of_the_workspace_does_not_break_the_next_turn(harness: Harness) -> None:
    """Issue 18: `ln -s ../../etc /workspace/up` used to make every later restore of the session fail
    (put_archive refuses the link: `workspace_failed reason=delivery_failed ... invalid symlink`). The
    snapshot keeps the link with the absolute target it resolves to, so turn 2 finds it, pointing at /etc."""
    cp = harness.control_plane
    session = cp.add_session(ScriptedSession(turns=[
        [_bash("ln -s ../../etc /workspace/up && mkdir /workspace/n && ln -s ../../../etc/hostname /workspace/n/h "
               "&& ln -s ../x /workspace/n/in && echo kept > /workspace/kept.txt", is_error=False)],
        [_bash("cat /workspace/kept.txt; echo \"up=$(readlink /workspace/up) h=$(readlink /workspace/n/h) "
               "in=$(readlink /workspace/n/in)\"; test -f /workspace/up/passwd && echo RESOLVES",
               is_error=False, contains=["kept", "up=/etc h=/etc/hostname in=../x", "RESOLVES"])],
    ]))
    run = harness.start("run")
    try:
        state = _wait_done(harness, session.session_id)
    finally:
        harness.signal(run)
        harness.wait(run, timeout=60)
    record = state["sessions"][session.session_id]
    assert record["passed"], record["results"]
    assert len(record["work_ids"]) == 2
    assert re.search(r"workspace_snapshot_links_rewritten session_id=\S+ count=2 ", run.output), run.output[-4000:]
    assert "workspace_restore result=hit" in run.output
    assert "delivery_failed" not in run.output and "invalid symlink" not in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


def _refused_tar() -> bytes:
    """A snapshot as the store kept them before issue 18: a file, then a link put_archive refuses."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, target in (("early.txt", b"written before the refusal\n", None), ("up", None, "../../etc"),
                                   ("late.txt", b"never written\n", None)):
            member = tarfile.TarInfo(name)
            member.uid = member.gid = 10001
            if target is not None:
                member.type, member.linkname = tarfile.SYMTYPE, target
            member.size = len(data or b"")
            tar.addfile(member, io.BytesIO(data) if data else None)
    return buf.getvalue()


def test_a_snapshot_the_engine_refuses_is_discarded_and_the_session_fetched_afresh(
    harness: Harness, git_fixture: GitFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cp = harness.control_plane
    store_dir = tmp_path / "store"
    session = cp.add_session(ScriptedSession(
        metadata={"repo": git_fixture.url(git_fixture.repos.app)},
        turns=[
            [_bash("echo kept > /workspace/kept.txt", is_error=False)],
            # put_archive extracts up to the link it refuses: early.txt stays (documented), late.txt never comes
            [_bash("test -f /workspace/app/run.sh && echo REFETCHED; ls /workspace",
                   contains=["REFETCHED", "early.txt"], not_contains=["late.txt", "kept.txt"])],
        ],
    ))
    env = {**_git_env(git_fixture), "SANDBOXD_WORKSPACE_STORE_DIR": str(store_dir)}
    first = harness.drain(env=env)
    assert first.returncode == 0 and "workspace_saved" in first.output, first.output[-3000:]

    # Replace the session's snapshot with one the engine refuses, written by a store whose copy is a no-op.
    def verbatim(chunks: Any, out: Any, **_: Any) -> CopyStats:
        raw = b"".join(chunks)
        out.write(raw)
        return CopyStats(members=3, tar_bytes=len(raw))

    monkeypatch.setattr(store_module, "copy_workspace", verbatim)
    WorkspaceStore(store_dir, max_bytes=1 << 20, store_max_bytes=1 << 30, retention_seconds=86400, uid=10001,
                   gid=10001).save(session.session_id, [_refused_tar()])
    monkeypatch.undo()
    cp.wait_for(lambda s: len(s["sessions"][session.session_id]["work_ids"]) == 2, timeout=60)

    second = harness.start("run", **env)
    try:
        state = _wait_done(harness, session.session_id)
    finally:
        harness.signal(second)
        harness.wait(second, timeout=60)
    record = state["sessions"][session.session_id]
    assert record["passed"], record["results"]
    assert "workspace_restore result=discarded" in second.output and "reason=engine_refused" in second.output
    assert "workspace_repo " in second.output, "fetched afresh from the metadata"
    assert "workspace_failed" not in second.output
    assert harness.leftovers() == {"containers": [], "volumes": []}
