"""/metrics of a running daemon, scraped over HTTP, against what really happened to the sessions."""

from __future__ import annotations

import signal
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from sandboxd.controlplane.scenario import ScriptedSession, ToolStep, six_tool_session
from tests.e2e.conftest import Harness


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_outcome_counters_match_a_run_with_every_kind_of_failure(harness: Harness) -> None:
    cp = harness.control_plane
    good = cp.add_session(six_tool_session("ok"))
    refused = cp.add_session(ScriptedSession(steps=[ToolStep(name="bash", input={"command": "true"})],
                                             heartbeat_status=403))
    bad_workspace = cp.add_session(ScriptedSession(metadata={"repo": "https://evil.example.com/x.git"}))
    # A foreign container that already has the name of this item's sandbox makes its launch fail (409).
    blocked = cp.add_session(six_tool_session("blocked"))
    squatter = harness.docker.containers.create(harness.image, name=f"sandboxd-{blocked.work_id}")
    address = f"127.0.0.1:{_free_port()}"
    try:
        run = harness.start("run", "--metrics-address", address, "--stats-interval-seconds", "0.5")
        cp.wait_for(lambda s: all(w["state"] == "stopped" for w in s["work"].values()), timeout=120)
        # The last session's bookkeeping follows its item's stop by a moment.
        cp.wait_for(lambda s: _scrape(address)[("sandboxd_sessions_running", ())] == 0, timeout=30)
        env = (("environment_id", cp.environment_id),)
        cp.wait_for(lambda s: _scrape(address)[("sandboxd_queue_depth", env)] == s["stats"]["depth"] == 0, timeout=30)
        metrics = _scrape(address)
        squatter.reload()  # cleaning up after the failed launch left the foreign container alone
    finally:
        squatter.remove(force=True)
    harness.signal(run, signal.SIGTERM)
    harness.wait(run, timeout=60)

    def finished(outcome: str) -> float:
        return metrics[("sandboxd_sessions_finished_total", (("outcome", outcome),))]

    assert finished("succeeded") == 1
    assert finished("failed") == 1
    assert finished("launch_failed") == 1
    assert finished("workspace_failed") == 1
    for outcome in ("timed_out", "lease_lost", "cancelled"):
        assert finished(outcome) == 0, "every outcome series exists from the start"
    assert metrics[("sandboxd_container_launch_errors_total", (("reason", "create_failed"),))] == 1
    assert metrics[("sandboxd_workspace_failures_total", (("reason", "host_not_allowed"),))] == 1
    assert metrics[("sandboxd_work_items_claimed_total", (("type", "session"),))] == 4
    assert metrics[("sandboxd_sessions_capacity", ())] == 4
    assert metrics[("sandboxd_session_duration_seconds_count", ())] == 4
    assert metrics[("sandboxd_polls_total", ())] > 0
    # Queue gauges (the daemon has the api_key secret file) came from the stats API.
    assert metrics[("sandboxd_queue_stats_up", env)] == 1
    assert metrics[("sandboxd_queue_pending", env)] == 0
    assert run.returncode == 0
    assert {good.work_id, refused.work_id, bad_workspace.work_id, blocked.work_id} <= set(cp.state_snapshot()["work"])
