"""The warm pool with real sandboxes: hits, churn, members killed from outside, secrets, restarts, image rolls."""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from sandboxd.controlplane.scenario import Expect, ScriptedSession, ToolStep, six_tool_session
from tests.e2e.conftest import Harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line and line[0] != "#"}


def _wait_metric(address: str, name: str, value: float, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _metrics(address).get(name) == value:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.2)


def _containers(harness: Harness) -> list[dict[str, Any]]:
    filters = {"label": ["io.sandboxd.managed=true", f"io.sandboxd.instance={harness.worker_id}"]}
    return list(harness.docker.api.containers(all=True, filters=filters))


def _assigned(harness: Harness) -> set[str]:
    filters = {"label": ["io.sandboxd.managed=true", f"io.sandboxd.instance={harness.worker_id}",
                         "io.sandboxd.role=assignment"]}
    volumes = harness.docker.api.volumes(filters=filters).get("Volumes") or []
    return {v["Labels"]["io.sandboxd.sandbox"] for v in volumes}


def _members(harness: Harness) -> list[dict[str, Any]]:
    """Running containers of the instance that hold no assignment: the pool."""
    assigned = _assigned(harness)
    return [c for c in _containers(harness)
            if c["Labels"]["io.sandboxd.sandbox"] not in assigned and c["State"] == "running"]


def _stopped(work_id: str, state: dict[str, Any]) -> bool:
    return bool(state["work"][work_id]["state"] == "stopped")


@pytest.fixture
def address() -> Iterator[str]:
    yield f"127.0.0.1:{_free_port()}"


def test_sessions_from_the_pool_run_all_six_tools(harness: Harness, address: str) -> None:
    cp = harness.control_plane
    run = harness.start("run", "--metrics-address", address, SANDBOXD_WARM_POOL_SIZE="2")
    try:
        sessions = []
        for n in range(3):
            _wait_metric(address, "sandboxd_pool_ready", 2)
            before = _members(harness)
            assert len(before) == 2
            secrets = (cp.environment_key, cp.api_key)
            for member in before:  # a member holds no secret before it is assigned
                inspected = json.dumps(harness.docker.api.inspect_container(member["Id"]))
                assert not any(secret in inspected for secret in secrets)
            session = cp.add_session(six_tool_session(f"warm{n}"))
            sessions.append(session)
            cp.wait_for(partial(_stopped, session.work_id), timeout=90)
        metrics = _metrics(address)
    finally:
        harness.signal(run)
        harness.wait(run, timeout=60)
    state = cp.state_snapshot()
    for session in sessions:
        assert state["sessions"][session.session_id]["passed"]
    assert metrics['sandboxd_pool_acquisitions_total{result="hit"}'] == 3
    assert metrics['sandboxd_pool_acquisitions_total{result="miss"}'] == 0
    assert metrics['sandboxd_claim_to_first_heartbeat_seconds_count{source="pool"}'] == 3
    assert "source=pool" in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}, "shutdown removes the pool"


def test_pool_never_exceeds_its_size_under_churn_and_kills(harness: Harness, address: str) -> None:
    cp = harness.control_plane
    stop = threading.Event()
    peaks = {"members": 0, "all": 0, "killed": 0}

    def churn() -> None:
        while not stop.is_set():
            try:
                members = _members(harness)
                peaks["members"] = max(peaks["members"], len(members))
                peaks["all"] = max(peaks["all"], len([c for c in _containers(harness) if c["State"] == "running"]))
                if members and peaks["killed"] < 4:
                    harness.docker.api.kill(members[0]["Id"])  # from outside, like an OOM killer or an operator
                    peaks["killed"] += 1
            except Exception:  # noqa: BLE001 - a container vanished between list and kill
                pass
            stop.wait(0.7)

    run = harness.start("run", "--metrics-address", address, "--max-sessions", "2", SANDBOXD_WARM_POOL_SIZE="2")
    watcher = threading.Thread(target=churn, daemon=True)
    sessions = [cp.add_session(ScriptedSession(steps=[
        ToolStep(name="bash", input={"command": f"echo churn-{n}"}, expect=Expect(is_error=False,
                                                                                 contains=[f"churn-{n}"])),
    ])) for n in range(10)]
    watcher.start()
    try:
        cp.wait_for(lambda s: all(s["work"][x.work_id]["state"] == "stopped" for x in sessions), timeout=240)
        _wait_metric(address, "sandboxd_pool_ready", 2)
    finally:
        stop.set()
        watcher.join(10)
        harness.signal(run)
        harness.wait(run, timeout=60)
    state = cp.state_snapshot()
    # A kill can land on a member in the instant it is taken (before its assignment is recorded):
    # that session fails, and its item is still stopped exactly once. Every other session completes.
    passed = sum(state["sessions"][x.session_id]["passed"] for x in sessions)
    assert passed >= len(sessions) - peaks["killed"], (passed, peaks)
    assert all(len(state["work"][x.work_id]["stops"]) == 1 for x in sessions)
    assert peaks["killed"] >= 1, "the test killed pool members from outside"
    assert peaks["members"] <= 2, peaks
    assert peaks["all"] <= 2 + 2, peaks
    assert "pool_member_replaced" in run.output or "pool_member_not_ready" in run.output
    assert harness.leftovers() == {"containers": [], "volumes": []}


def test_restart_removes_stale_members_and_an_image_change_rolls_the_pool(harness: Harness, address: str) -> None:
    tag = f"{harness.worker_id}:pool"
    harness.docker.images.get(harness.image).tag(tag)
    try:
        first = harness.start("run", "--metrics-address", address, SANDBOXD_WARM_POOL_SIZE="1", SANDBOXD_IMAGE=tag)
        _wait_metric(address, "sandboxd_pool_ready", 1)
        stale = {c["Id"] for c in _members(harness)}
        first.process.kill()
        harness.wait(first, timeout=10)

        second = harness.start("run", "--metrics-address", address, SANDBOXD_WARM_POOL_SIZE="1", SANDBOXD_IMAGE=tag)
        try:
            _wait_metric(address, "sandboxd_pool_ready", 1)
            assert not stale & {c["Id"] for c in _containers(harness)}, "a restarted daemon removes stale members"
            old_image = harness.docker.images.get(tag).id
            # A new image under the same tag (a label-only build: instant, no network).
            harness.docker.images.build(fileobj=io.BytesIO(f"FROM {harness.image}\nLABEL rolled=yes\n".encode()),
                                        tag=tag, rm=True)
            new_image = harness.docker.images.get(tag).id
            assert new_image != old_image
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                members = _members(harness)
                if members and all(m["Labels"]["io.sandboxd.image-id"] == new_image for m in members):
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"the pool was not rolled to the new image:\n{second.output[-3000:]}")
        finally:
            harness.signal(second, signal.SIGTERM)
            harness.wait(second, timeout=60)
        assert "stale_sandbox_removed" in second.output and "pool_image_changed" in second.output
        assert harness.leftovers() == {"containers": [], "volumes": []}
    finally:
        for image in harness.docker.images.list(name=harness.worker_id):
            harness.docker.images.remove(image.id, force=True)
