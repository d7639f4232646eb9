"""Workspaces from session metadata, end to end: real git and file servers, the daemon, real sandboxes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from sandboxd.controlplane.scenario import Expect, ScriptedSession, ToolStep
from tests.e2e.conftest import ContainerCounter, Harness
from tests.integration.conftest import GitFixture
from tests.integration.git_server import FileServer, GitHttpServer


@pytest.fixture
def fetch_env(tmp_path: Path, git_fixture: GitFixture, file_server: FileServer) -> dict[str, str]:
    """Daemon settings that allow the local servers, with the git server's token in a file."""
    token_file = tmp_path / "git-token"
    token_file.write_text(git_fixture.server.token + "\n")
    return {
        "SANDBOXD_GIT_ALLOWED_HOSTS": json.dumps([git_fixture.server.host]),
        "SANDBOXD_FILE_ALLOWED_HOSTS": json.dumps([file_server.host]),
        "SANDBOXD_GIT_TOKEN_FILES": json.dumps({git_fixture.server.host: str(token_file)}),
        "SANDBOXD_FETCH_TIMEOUT_SECONDS": "30",
    }


def _step(command: str, **expect: object) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(**expect))


def test_two_repositories_and_a_file_land_in_the_workspace(
    harness: Harness, git_fixture: GitFixture, file_server: FileServer, fetch_env: dict[str, str]
) -> None:
    content = b"measurements,1,2,3\n"
    file_server.add("input.csv", content)
    file_url = file_server.url("input.csv")
    repos = git_fixture.repos
    token = git_fixture.server.token
    metadata = {
        "repo": git_fixture.url(repos.app),
        "repo.private": f"{git_fixture.url(repos.private)} path=deps/secret",
        "repo.super": f"{git_fixture.url(repos.super)} path=deps/super submodules=true",
        "file": f"{file_url} sha256={hashlib.sha256(content).hexdigest()} path=data/input.csv",
        "title": "keys the daemon does not know are ignored",
    }
    steps = [
        _step("ls /workspace /workspace/app /workspace/deps/super/libs/lib",
              is_error=False, contains=["app", "deps", "data", "README.md", "lib.txt"]),
        _step("cd /workspace/app && git log -1 --format=%H && git status --porcelain | wc -l",
              is_error=False, contains=[repos.app_commits["main"]]),
        ToolStep(name="read", input={"file_path": "app/README.md"}, expect=Expect(is_error=False, contains=["app v3"])),
        ToolStep(name="read", input={"file_path": "deps/secret/secret.txt"}, expect=Expect(contains=["private"])),
        ToolStep(name="read", input={"file_path": "data/input.csv"}, expect=Expect(contains=["measurements"])),
        _step("stat -c '%u:%g %a %n' /workspace/app/README.md /workspace/app/run.sh /workspace/data/input.csv "
              "/workspace/deps/secret/secret.txt", is_error=False, not_contains=["0:0"]),
        _step("for d in app deps/secret deps/super; do (cd /workspace/$d && git config --list); done; "
              "cat /workspace/*/.git/config /workspace/deps/*/.git/config; env",
              is_error=False, not_contains=[token, "extraheader", "Authorization"]),
        _step("touch /workspace/app/new-file && echo writable", is_error=False, contains=["writable"]),
    ]
    session = harness.control_plane.add_session(ScriptedSession(metadata=metadata, steps=steps))

    run = harness.drain(env=fetch_env, SANDBOXD_LOG_LEVEL="DEBUG")

    assert run.returncode == 0, run.output[-5000:]
    state = harness.control_plane.state_snapshot()
    results = state["sessions"][session.session_id]["results"]
    # DEBUG logging of the daemon (and the sandbox's log lines it copies) shows no secret.
    assert "sandbox_log" in run.output and "DEBUG" in run.output
    for secret in (token, harness.control_plane.environment_key, harness.control_plane.api_key):
        assert secret not in run.output
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]
    owners = {line.split()[0] for line in results[5]["text"].splitlines()}
    assert owners == {"10001:10001"}, results[5]["text"]
    assert "755" in results[5]["text"] and "644" in results[5]["text"]
    # Provenance: every fetched commit and the file's digest are in the daemon's log.
    assert f"commit={repos.app_commits['main']}" in run.output
    assert f"commit={repos.private_commit}" in run.output
    assert f"sha256={hashlib.sha256(content).hexdigest()}" in run.output
    work = state["work"][session.work_id]
    assert work["heartbeat_412s"] == 0 and work["claims"] == 1
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert harness.staging_leftovers() == []


def test_fetch_longer_than_the_lease_ttl_keeps_the_lease(
    harness: Harness, git_fixture: GitFixture, fetch_env: dict[str, str]
) -> None:
    cp = harness.control_plane
    cp.set_lease_ttl(3)
    # The same repositories, served slowly: every request waits 1.5 s, so the fetch outlasts the TTL.
    with GitHttpServer(git_fixture.server.root, latency_seconds=1.5) as slow:
        env = {**fetch_env, "SANDBOXD_GIT_ALLOWED_HOSTS": json.dumps([slow.host])}
        session = cp.add_session(ScriptedSession(
            metadata={"repo": slow.url(git_fixture.repos.app)},
            steps=[_step("cat /workspace/app/README.md", is_error=False, contains=["app v3"])],
        ))
        run = harness.drain(env=env)

    assert run.returncode == 0, run.output[-5000:]
    prepared = re.search(r"workspace_prepared work_id=\S+ .*seconds=([\d.]+)", run.output)
    assert prepared and float(prepared.group(1)) > 3, "the fetch did not outlast the lease TTL"
    state = cp.state_snapshot()
    work = state["work"][session.work_id]
    assert state["sessions"][session.session_id]["passed"]
    assert work["heartbeat_412s"] == 0, "the sandbox's heartbeat met a 412"
    assert work["claims"] == 1 and work["lease_expiries"] == 0, "the item was re-queued or claimed twice"
    assert work["heartbeats"] >= 2
    assert work["stops"] == [{"credential": "sessions_token", "force": True}]


def test_bad_metadata_fails_its_session_only_and_leaves_nothing(
    harness: Harness, git_fixture: GitFixture, fetch_env: dict[str, str]
) -> None:
    cp = harness.control_plane
    app = git_fixture.url(git_fixture.repos.app)
    # Rejected before any container starts: the plan is invalid.
    escaping = cp.add_session(ScriptedSession(metadata={"repo": f"{app} path=../../etc"}, steps=[_step("true")]))
    forbidden = cp.add_session(
        ScriptedSession(metadata={"repo": "https://evil.example.com/x.git"}, steps=[_step("true")])
    )
    # Fails while fetching, after the sandbox took the lease: the sandbox is aborted and stops its item.
    no_ref = cp.add_session(ScriptedSession(metadata={"repo": f"{app} ref=no-such-branch"}, steps=[_step("true")]))
    good = cp.add_session(
        ScriptedSession(metadata={"repo": app}, steps=[_step("ls /workspace/app", contains=["run.sh"])])
    )

    with ContainerCounter(harness.docker, harness.worker_id) as counter:
        run = harness.drain("--max-sessions", "2", env=fetch_env)

    assert run.returncode == 1, run.output[-5000:]
    assert "workspace_failed: 3" in run.output and "succeeded: 1" in run.output
    assert "path_escape" in run.output or ".." in run.output
    assert "host_not_allowed" in run.output and "evil.example.com" in run.output
    assert "no-such-branch" in run.output
    state = cp.state_snapshot()
    # A refused plan is stopped exactly once: by the daemon when no sandbox had the item yet, or by
    # the sandbox it was already handed to (the assignment does not wait for the metadata read).
    for item in (escaping, forbidden, no_ref):
        assert len(state["work"][item.work_id]["stops"]) == 1, state["work"][item.work_id]["stops"]
    assert state["sessions"][good.session_id]["passed"]
    assert counter.seen
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert harness.staging_leftovers() == []
