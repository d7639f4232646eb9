"""The soak's short variant, in the normal suite: ~40 sessions through the real daemon under faults.

Runs benchmarks/soak.py as a user would (a subprocess), without the Docker engine restart: seeded
API faults, revoked leases, cancels, terminated sessions, dropped streams, OOM-killed and
`docker kill`ed sandboxes, and the daemon SIGKILLed and restarted twice. Nothing may be lost
(every work item ends stopped, exactly once) and nothing may be left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.docker
def test_short_soak_stops_every_item_exactly_once_and_leaves_nothing(tmp_path: Path, sandbox_image: str) -> None:
    out = tmp_path / "soak.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "soak.py"),
        "--sessions", "40", "--seed", "11", "--no-engine-restart", "--daemon-kills", "2",
        "--max-sessions", "4", "--duration-limit-seconds", "480",
        "--workdir", str(tmp_path / "work"), "--json-out", str(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=720, cwd=REPO)
    assert out.exists(), f"the soak did not report:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    result = json.loads(out.read_text())
    table = run.stdout[-4000:]
    assert not result["timed_out"], table
    assert result["lost"] == [], table
    assert (result["orphan_containers"], result["orphan_volumes"]) == ([], []), table
    assert result["stopped_more"] == [], result["stop_logs_of_stopped_more"]
    assert result["stopped_once"] == result["items"] > 40, table
    assert run.returncode == 0, table
    # The faults really happened.
    assert result["events"].get("daemon_kill") == 2, table
    for kind in ("lease_lost", "cancel", "docker_kill", "stream_drop"):
        assert result["events"].get(kind, 0) >= 1, f"{kind} never fired:\n{table}"
    assert sum(result["faults_injected"].values()) >= 10, table
    # Faults a session must survive (API errors, delays, dropped streams, a lost lease) did not
    # cost it its results; only sandboxes killed under it (daemon kills) may excuse one.
    survivable = ("none", "multi_turn", "lease_lost", "stream_drop")
    unfinished = [sid for sid, s in result["per_session"].items()
                  if s["class"] in survivable and not s["hit_by"] and not s["done"]]
    assert unfinished == [], f"{unfinished}\n{table}"
