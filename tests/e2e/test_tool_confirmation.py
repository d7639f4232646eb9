"""Tool confirmations and custom tools through sandboxd: the real daemon, real sandboxes.

The test plays the application (the API key, through the SDK): it confirms each `always_ask` bash
call, allowing one and denying one, and answers a custom tool call. The sandbox's worker runs the
allowed call, never runs the denied one (nor one the server refused), and leaves the custom call to
the application; each item is stopped exactly once and nothing is left behind.
"""

from __future__ import annotations

from typing import Any

from sandboxd.controlplane.scenario import ScriptedSession, ToolStep
from tests.e2e.conftest import Harness
from tests.integration.test_controlplane_confirmation import Application, ask, bash, custom


def _served_once(state: dict[str, Any], session_id: str) -> dict[str, Any]:
    """The session passed, every post the API refused is absent, and its item was stopped once by its sandbox."""
    record = state["sessions"][session_id]
    failures = [r for r in record["results"] if not r["passed"]]
    assert record["done"] and record["passed"], failures or record
    assert record["status"] == "terminated" and record["awaiting_user"] == []
    assert record["refused_events"] == [] and record["duplicates"] == [] and record["late_results"] == 0
    work = state["work"][record["work_id"]]
    assert work["claims"] == 1 and work["heartbeat_412s"] == 0 and work["lease_expiries"] == 0
    assert work["stops"] == [{"credential": "sessions_token", "force": True}] and work["times_stopped"] == 1
    return dict(record)


def _texts(record: dict[str, Any]) -> list[str | None]:
    return [r["text"] for r in record["results"]]


def test_confirmed_denied_and_custom_tool_calls(harness: Harness) -> None:
    cp = harness.control_plane
    cp.set_lease_ttl(120)  # a cold start on a busy host can outlast the harness's 30 s lease before its first beat
    allowed = cp.add_session(ScriptedSession(steps=[
        ask("printf 'allowed-%s\\n' A | tee allowed.txt", "allowed-A", confirmation="allow"),
        bash("cat allowed.txt", "allowed-A"),
    ])).session_id
    denied = cp.add_session(ScriptedSession(steps=[
        ask("touch denied.txt && echo denied-call-ran", confirmation="deny"),
        ToolStep(name="bash", input={"command": "touch refused.txt"}, permission="deny"),  # the server refused it
        bash("ls -A; if [ -e denied.txt ] || [ -e refused.txt ]; then echo present; else echo absent; fi", "absent"),
    ])).session_id
    customised = cp.add_session(ScriptedSession(steps=[
        custom("lookup_order", "order 42: shipped", order_id="42"),
        bash("echo after-the-custom-tool", "after-the-custom-tool"),
    ])).session_id
    applications = [
        Application(cp, allowed, decide=lambda command: "allow"),
        Application(cp, denied, decide=lambda command: "deny", deny_message="not here"),
        Application(cp, customised, answer=lambda name, tool_input: f"order {tool_input['order_id']}: shipped"),
    ]
    for application in applications:
        application.start()
    try:
        run = harness.drain("--max-sessions", "3")
    finally:
        for application in applications:
            application.stop()

    assert run.returncode == 0, run.output[-5000:]
    assert "sessions run: 3  succeeded: 3  failed: 0" in run.output
    state = cp.state_snapshot()

    record = _served_once(state, allowed)
    assert _texts(record) == ["allowed-A", "allowed-A"]
    first = record["results"][0]
    assert (first["confirmation"], first["confirmed_by"], first["posted_by"]) == ("allow", "api_key", "sessions_token")

    record = _served_once(state, denied)
    assert _texts(record) == [None, None, "absent"], "a denied call ran, or the session did not go on"
    first, refused = record["results"][:2]
    assert (first["confirmation"], first["confirmed_by"], first["ran"]) == ("deny", "api_key", False)
    assert (refused["evaluated_permission"], refused["confirmation"], refused["ran"]) == ("deny", None, False)

    record = _served_once(state, customised)
    assert _texts(record) == ["order 42: shipped", "after-the-custom-tool"]
    # The sandbox never answered the custom call: the application did, on the API key.
    assert [r["posted_by"] for r in record["results"]] == ["api_key", "sessions_token"]

    for application in applications:
        assert len(application.handled) == 1
    assert state["stop_summary"]["stopped_more"] == [] and state["stop_summary"]["not_stopped"] == []
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert harness.staging_leftovers() == []


def test_a_call_left_unconfirmed_never_runs_and_the_ended_session_is_stopped_once(harness: Harness) -> None:
    """The user never answers; the session is terminated while the call waits: the sandbox stops its item."""
    cp = harness.control_plane
    cp.set_lease_ttl(120)
    session_id, work_id = cp.add_session(ScriptedSession(steps=[ask("touch never.txt"), bash("true")]))

    run = harness.start("drain")
    cp.wait_for(lambda s: bool(s["sessions"][session_id]["awaiting_user"]), timeout=120)
    cp.terminate_session(session_id)
    harness.wait(run)

    assert run.returncode == 0, run.output[-5000:]
    state = cp.state_snapshot()
    record, work = state["sessions"][session_id], state["work"][work_id]
    assert record["results"] == [] and record["refused_events"] == [] and record["late_results"] == 0
    assert record["terminated_by"] == "admin" and record["pending_tool_uses"] == 1
    assert work["stops"] == [{"credential": "sessions_token", "force": True}] and work["times_stopped"] == 1
    assert harness.leftovers() == {"containers": [], "volumes": []}
    assert harness.staging_leftovers() == []
