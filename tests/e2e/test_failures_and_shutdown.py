"""The daemon under bad conditions: a missing image, health checks, SIGTERM with sessions running."""

from __future__ import annotations

import signal
import time

from sandboxd.controlplane.scenario import ScriptedSession, ToolStep, six_tool_session
from tests.e2e.conftest import ContainerCounter, Harness


def test_missing_image_stops_each_item_and_the_daemon_goes_on(harness: Harness) -> None:
    cp = harness.control_plane
    items = [cp.add_session(six_tool_session(f"m{i}")) for i in range(2)]

    run = harness.drain(SANDBOXD_IMAGE="sandboxd-does-not-exist:never")

    assert run.returncode == 1
    assert "launch_failed: 2" in run.output and "sandboxd-does-not-exist:never" in run.output
    state = cp.state_snapshot()
    for item in items:  # both were tried: the first failure did not stop the daemon
        work = state["work"][item.work_id]
        assert work["state"] == "stopped" and work["claims"] == 1
        assert work["stops"] == [{"credential": "environment_key", "force": True}]
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_health_check_items_are_stopped_without_a_container(harness: Harness) -> None:
    cp = harness.control_plane
    check = cp.add_healthcheck()
    session = cp.add_session(six_tool_session("after-check"))

    with ContainerCounter(harness.docker, harness.worker_id) as counter:
        run = harness.drain(SANDBOXD_WARM_POOL_SIZE="0")  # the pool would start a sandbox regardless

    assert run.returncode == 0, run.output[-3000:]
    state = cp.state_snapshot()
    assert state["work"][check]["state"] == "stopped"
    assert state["work"][check]["stops"] == [{"credential": "environment_key", "force": True}]
    assert state["sessions"][session.session_id]["passed"]
    assert len(counter.seen) == 1, "only the session got a container"
    assert "health-check items stopped: 1" in run.output


def _wait_running(harness: Harness, work_id: str, timeout: float = 60) -> None:
    harness.control_plane.wait_for(lambda s: s["work"][work_id]["heartbeats"] >= 1, timeout=timeout)


def test_sigterm_lets_running_sessions_finish(harness: Harness) -> None:
    cp = harness.control_plane
    slow = cp.add_session(ScriptedSession(steps=[ToolStep(name="bash", input={"command": "sleep 3; echo done"})]))
    run = harness.start("run", "--shutdown-grace-seconds", "60")
    _wait_running(harness, slow.work_id)
    queued_later = cp.add_session(six_tool_session("never-claimed"))
    time.sleep(0.5)

    harness.signal(run, signal.SIGTERM)
    harness.wait(run, timeout=90)

    assert run.returncode == 0, run.output[-4000:]
    state = cp.state_snapshot()
    assert state["sessions"][slow.session_id]["passed"], "the running session finished during the grace period"
    assert state["work"][slow.work_id]["stops"] == [{"credential": "sessions_token", "force": True}]
    # The daemon stopped claiming at once; whatever it had not claimed stays queued for another worker.
    later = state["work"][queued_later.work_id]
    assert later["claims"] == 0 or later["state"] == "stopped"
    assert "shutdown_requested" in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_grace_period_over_stops_sandboxes_which_stop_their_items(harness: Harness) -> None:
    cp = harness.control_plane
    stuck = cp.add_session(ScriptedSession(steps=[ToolStep(name="bash", input={"command": "sleep 60"})]))
    run = harness.start("run", "--shutdown-grace-seconds", "1", "--stop-timeout-seconds", "10")
    _wait_running(harness, stuck.work_id)
    cp.wait_for(lambda s: s["sessions"][stuck.session_id]["events"] >= 2, timeout=30)
    time.sleep(0.5)

    harness.signal(run, signal.SIGTERM)
    harness.wait(run, timeout=60)

    assert run.returncode == 0, run.output[-4000:]
    work = cp.state_snapshot()["work"][stuck.work_id]
    assert work["state"] == "stopped"
    # Stopped once, by the sandbox's own worker on its own token, when the daemon SIGTERMed it.
    assert work["stops"] == [{"credential": "sessions_token", "force": True}]
    assert "outcome=cancelled" in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}
