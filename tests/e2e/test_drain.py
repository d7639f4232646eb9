"""`sandboxd drain` end to end: real sandboxes serve scripted sessions from the local control plane."""

from __future__ import annotations

from typing import Any

from sandboxd.controlplane.scenario import ScriptedSession, ToolStep, six_tool_session
from tests.e2e.conftest import ContainerCounter, Harness


def _assert_served_by_its_own_sandbox(state: dict[str, Any], session_id: str) -> None:
    session = state["sessions"][session_id]
    work = state["work"][session["work_id"]]
    failures = [r for r in session["results"] if not r["passed"]]
    assert session["done"] and session["passed"], f"{session_id}: {failures or 'not every step answered'}"
    assert len(session["results"]) == session["steps"]
    assert session["duplicates"] == []
    assert work["claims"] == 1, "the item was claimed more than once"
    assert work["heartbeat_412s"] == 0 and work["lease_expiries"] == 0
    assert work["heartbeat_credentials"] == ["sessions_token"]
    assert work["stops"] == [{"credential": "sessions_token", "force": True}], work["stops"]
    assert work["state"] == "stopped"


def test_six_sessions_three_at_a_time_all_tools(harness: Harness) -> None:
    cp = harness.control_plane
    ids = [cp.add_session(six_tool_session(f"s{i}")).session_id for i in range(6)]

    with ContainerCounter(harness.docker, harness.worker_id) as counter:
        run = harness.drain("--max-sessions", "3")

    assert run.returncode == 0, run.output[-5000:]
    state = cp.state_snapshot()
    for session_id in ids:
        _assert_served_by_its_own_sandbox(state, session_id)
    tools = {r["name"] for r in state["sessions"][ids[0]]["results"]}
    assert tools == {"bash", "read", "write", "edit", "glob", "grep"}
    assert "sessions run: 6  succeeded: 6  failed: 0" in run.output
    # One sandbox per session; the warm pool (default size 1) is extra to max_sessions.
    assert len(counter.seen) >= 6
    assert 1 <= counter.peak <= 3 + 1, f"capacity exceeded: {counter.peak} sandboxes at once"
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert harness.staging_leftovers() == []
    assert state["stats"]["depth"] == 0 and state["stats"]["pending"] == 0


def test_one_failing_session_fails_the_drain_and_leaves_nothing(harness: Harness) -> None:
    cp = harness.control_plane
    good = [cp.add_session(six_tool_session(f"g{i}")).session_id for i in range(2)]
    # The API refuses this item's lease (403 on every heartbeat): the sandbox stops and reports it.
    refused = cp.add_session(
        ScriptedSession(steps=[ToolStep(name="bash", input={"command": "sleep 2"})], heartbeat_status=403)
    )

    run = harness.drain("--max-sessions", "3")

    assert run.returncode == 1, run.output[-5000:]
    assert "sessions run: 3  succeeded: 2  failed: 1" in run.output
    assert f"{refused.session_id} ({refused.work_id}): failed" in run.output
    state = cp.state_snapshot()
    for session_id in good:
        _assert_served_by_its_own_sandbox(state, session_id)
    assert state["work"][refused.work_id]["state"] == "stopped"
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert harness.staging_leftovers() == []


def test_item_without_a_secret_is_refused_unless_allowed(harness: Harness) -> None:
    cp = harness.control_plane
    no_secret = cp.add_session(ScriptedSession(steps=[ToolStep(name="bash", input={"command": "true"})], secret="none"))

    with ContainerCounter(harness.docker, harness.worker_id) as counter:
        run = harness.drain(SANDBOXD_WARM_POOL_SIZE="0")  # the pool would start a sandbox regardless

    assert run.returncode == 1
    assert "no usable secret" in run.output and "allow_environment_key_in_sandbox" in run.output
    work = cp.state_snapshot()["work"][no_secret.work_id]
    assert work["state"] == "stopped" and work["stops"] == [{"credential": "environment_key", "force": True}]
    assert counter.seen == set(), "no sandbox may start for an item without a usable secret"
