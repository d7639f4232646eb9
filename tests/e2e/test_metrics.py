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
    address = f"127.0.0.1:{_free_port()}"
    # The sandbox image is taken away while the daemon runs: the next launch fails (image_missing).
    harness.docker.images.get(harness.image).tag(f"{harness.worker_id}:doomed")
    doomed = f"{harness.worker_id}:doomed"
    try:
        run = harness.start("run", "--metrics-address", address, "--stats-interval-seconds", "0.5",
                            SANDBOXD_IMAGE=doomed, SANDBOXD_WARM_POOL_SIZE="0")
        cp.wait_for(lambda s: all(w["state"] == "stopped" for w in s["work"].values()), timeout=120)
        harness.docker.images.remove(doomed)
        blocked = cp.add_session(six_tool_session("blocked"))
        cp.wait_for(lambda s: s["work"][blocked.work_id]["state"] == "stopped", timeout=60)
        cp.wait_for(lambda s: all(w["state"] == "stopped" for w in s["work"].values()), timeout=120)
        # The last session's bookkeeping follows its item's stop by a moment.
        cp.wait_for(lambda s: _scrape(address)[("sandboxd_sessions_running", ())] == 0, timeout=30)
        env = (("environment_id", cp.environment_id),)
        cp.wait_for(lambda s: _scrape(address)[("sandboxd_queue_depth", env)] == s["stats"]["depth"] == 0, timeout=30)
        metrics = _scrape(address)
    finally:
        if any(doomed in (i.tags or []) for i in harness.docker.images.list()):
            harness.docker.images.remove(doomed)
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
    assert metrics[("sandboxd_container_launch_errors_total", (("reason", "image_missing"),))] == 1
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
