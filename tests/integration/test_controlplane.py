"""The local control plane against the real, unmodified anthropic SDK over real HTTP on 127.0.0.1.

Covers the worker end to end (six tools, skills, sessions token), the run loop (healthcheck
items, the environment-key fallback), credentials per route, stop conflicts, graceful and forced
stops, heartbeat optimistic concurrency, lease expiry and reclaim, outages, the wire format details
the SDK depends on, and the `python -m sandboxd.controlplane` entry point.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx  # the HTTP client the anthropic SDK ships
import pytest
from anthropic import (
    APIStatusError,
    APITimeoutError,
    AsyncAnthropic,
    AuthenticationError,
    ConflictError,
    PermissionDeniedError,
)
from anthropic.lib.environments import EnvironmentWorker
from anthropic.types.beta.environments import BetaSelfHostedWork

from sandboxd.controlplane import (
    ControlPlane,
    Expect,
    Scenario,
    ScriptedSession,
    SkillSpec,
    ToolStep,
    six_tool_session,
)
from sandboxd.protocol import sessions_token_from_secret

BETA = {"anthropic-beta": "managed-agents-2026-04-01"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("ANTHROPIC_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    with ControlPlane(Scenario(lease_ttl_seconds=3)) as cp:
        yield cp


def bearer(cp: ControlPlane, token: str, **options: Any) -> AsyncAnthropic:
    """A client whose every request carries `Authorization: Bearer <token>` (api keys are Bearer too)."""
    return AsyncAnthropic(base_url=cp.url, api_key=token, max_retries=options.pop("max_retries", 0), **options)


def token_of(work: BetaSelfHostedWork) -> str:
    """The sessions token inside a work item's secret (the daemon's decoder, which mirrors the SDK's)."""
    token = sessions_token_from_secret(work.secret)
    assert token is not None
    return token


async def claim_all(client: AsyncAnthropic, cp: ControlPlane, **options: Any) -> list[BetaSelfHostedWork]:
    """Poll and ack everything queued with the SDK's own poller (drain mode)."""
    poller = client.beta.environments.work.poller(
        environment_id=cp.environment_id,
        environment_key=cp.environment_key,
        drain=True,
        auto_stop=options.pop("auto_stop", False),
        block_ms=None,
        **options,
    )
    return [work async for work in poller]


async def wait_until(cp: ControlPlane, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """`ControlPlane.wait_for` off the event loop, so the SDK keeps running meanwhile."""
    return await anyio.to_thread.run_sync(lambda: cp.wait_for(predicate, 15.0))


@pytest.mark.anyio
async def test_worker_runs_six_tools_and_a_skill_on_the_sessions_token(plane: ControlPlane, tmp_path: Path) -> None:
    session = six_tool_session("t1")
    session.skills = [SkillSpec(skill_id="skill_demo", name="demo-skill", files={"SKILL.md": "# demo 42\n"})]
    session.steps.append(
        ToolStep(name="bash", input={"command": "cat skills/demo-skill/SKILL.md"}, expect=Expect(contains=["demo 42"]))
    )
    session_id, work_id = plane.add_session(session)
    async with AsyncAnthropic(base_url=plane.url, api_key="unused") as client:
        (work,) = await claim_all(client, plane)
        assert (work.id, work.data.id, work.state) == (work_id, session_id, "queued")
        worker = EnvironmentWorker(client, workdir=tmp_path, max_idle=2)
        with anyio.fail_after(20):
            await worker.handle_item(
                work_id=work.id, environment_id=work.environment_id, session_id=session_id, work_secret=work.secret
            )
    state = plane.state_snapshot()
    record, item = state["sessions"][session_id], state["work"][work_id]
    assert record["passed"], record["results"]
    assert [r["name"] for r in record["results"]] == ["bash", "write", "read", "edit", "glob", "grep", "bash"]
    assert record["duplicates"] == [] and record["status"] == "terminated"
    assert set(record["credentials_seen"]) == {"session", "stream", "events_list", "events_send", "skills"}
    assert all(kinds == ["sessions_token"] for kinds in record["credentials_seen"].values())
    assert item["stops"] == [{"credential": "sessions_token", "force": True}]
    assert (item["state"], item["claims"], item["heartbeat_412s"], item["stop_conflicts"]) == ("stopped", 1, 0, 0)
    assert item["heartbeats"] >= 1 and item["heartbeat_credentials"] == ["sessions_token"]
    assert (tmp_path / "notes" / "hello.txt").read_text() == "hello t1\nedited t1\n"


@pytest.mark.anyio
async def test_run_loop_stops_healthchecks_and_falls_back_to_the_environment_key(
    plane: ControlPlane, tmp_path: Path
) -> None:
    check_id = plane.add_healthcheck()
    step = ToolStep(name="bash", input={"command": "exit 3"}, expect=Expect(is_error=True))
    session_id, work_id = plane.add_session(ScriptedSession(steps=[step], secret="none", end="idle"))
    async with AsyncAnthropic(base_url=plane.url, api_key="unused") as client:
        worker = EnvironmentWorker(
            client,
            environment_id=plane.environment_id,
            environment_key=plane.environment_key,
            workdir=tmp_path,
            max_idle=1,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            state = await wait_until(plane, lambda s: all(w["state"] == "stopped" for w in s["work"].values()))
            tg.cancel_scope.cancel()
    # The worker claims a healthcheck item with one heartbeat (the lease is its own), runs nothing, force-stops it.
    check = state["work"][check_id]
    assert check["stops"] == [{"credential": "environment_key", "force": True}]
    assert (check["heartbeats"], check["heartbeat_credentials"]) == (1, ["environment_key"])
    item, record = state["work"][work_id], state["sessions"][session_id]
    assert item["stops"] == [{"credential": "environment_key", "force": True}]
    assert item["heartbeat_credentials"] == ["environment_key"]
    assert record["passed"] and record["status"] == "idle", record
    assert state["workers_polling"] and state["stats"]["workers_polling"] == 1


@pytest.mark.anyio
async def test_terminated_sessions_garbage_secrets_and_failed_expectations(plane: ControlPlane, tmp_path: Path) -> None:
    done_id, done_work = plane.add_session(ScriptedSession(status="terminated", steps=[ToolStep(name="bash")]))
    wrong = ToolStep(name="bash", input={"command": "echo actual"}, expect=Expect(contains=["expected"]))
    garbled_id, garbled_work = plane.add_session(ScriptedSession(steps=[wrong], secret="garbage"))
    async with AsyncAnthropic(base_url=plane.url, api_key="unused") as client:
        worker = EnvironmentWorker(client, environment_key=plane.environment_key, workdir=tmp_path, max_idle=2)
        for work in await claim_all(client, plane):
            with anyio.fail_after(15):
                await worker.handle_item(
                    work_id=work.id,
                    environment_id=work.environment_id,
                    session_id=work.data.id,
                    work_secret=work.secret,
                )
    state = plane.state_snapshot()
    assert state["sessions"][done_id]["results"] == [] and state["sessions"][done_id]["events"] == 0
    assert state["work"][done_work]["stops"] == [{"credential": "sessions_token", "force": True}]
    (result,) = state["sessions"][garbled_id]["results"]
    assert (result["passed"], result["text"], result["reason"]) == (False, "actual", "missing ['expected']")
    assert state["sessions"][garbled_id]["done"] and not state["sessions"][garbled_id]["passed"]
    assert state["work"][garbled_work]["heartbeat_credentials"] == ["environment_key"]


@pytest.mark.anyio
async def test_poller_yields_healthcheck_items_and_auto_stops_them(plane: ControlPlane) -> None:
    check_id = plane.add_healthcheck()
    session_id, work_id = plane.add_session(ScriptedSession())
    async with AsyncAnthropic(base_url=plane.url, api_key="unused") as client:
        check, work = await claim_all(client, plane, auto_stop=True)
    assert (check.id, check.data.type, check.secret) == (check_id, "healthcheck", None)
    assert (work.id, work.data.id) == (work_id, session_id)
    state = plane.state_snapshot()["work"]
    # Auto-stop force-stops each item on its own sessions token, on the environment key when it has none.
    assert state[check_id]["stops"] == [{"credential": "environment_key", "force": True}]
    assert state[work_id]["stops"] == [{"credential": "sessions_token", "force": True}]
    assert [s["helper"] for s in state[work_id]["stop_log"]] == ["environments-work-poller"]
    assert state[check_id]["claims"] == state[work_id]["claims"] == 1


@pytest.mark.anyio
async def test_a_stop_without_force_is_a_graceful_shutdown_of_a_held_item(plane: ControlPlane) -> None:
    _, held_id = plane.add_session(ScriptedSession())
    _, queued_id = plane.add_session(ScriptedSession())
    env = plane.environment_id
    async with bearer(plane, plane.environment_key) as env_client:
        held = await env_client.beta.environments.work.poll(env)
        assert held is not None and held.id == held_id
        await env_client.beta.environments.work.ack(held_id, environment_id=env)
        async with bearer(plane, token_of(held)) as client:
            work = client.beta.environments.work
            first = await work.heartbeat(held_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
            asked = await env_client.beta.environments.work.stop(held_id, environment_id=env, force=False)
            assert (asked.state, asked.stopped_at) == ("stopping", None) and asked.stop_requested_at
            told = await work.heartbeat(held_id, environment_id=env, expected_last_heartbeat=first.last_heartbeat)
            assert (told.state, told.lease_extended) == ("stopping", False)
            stopped = await work.stop(held_id, environment_id=env, force=True)
            assert stopped.state == "stopped" and stopped.stopped_at
        # Nobody holds a queued item: a stop without force stops it at once.
        unheld = await env_client.beta.environments.work.stop(queued_id, environment_id=env)
        assert unheld.state == "stopped"
    state = plane.state_snapshot()
    item = state["work"][held_id]
    assert [(s["by"], s["force"], s["result"]) for s in item["stop_log"]] == [
        ("environment_key", False, "stopping"),
        ("sessions_token", True, "stopped"),
    ]
    assert item["stops"] == [{"credential": "sessions_token", "force": True}] and item["times_stopped"] == 1
    assert state["work"][queued_id]["stops"] == [{"credential": "environment_key", "force": False}]
    assert state["stop_summary"]["stopped_once"] == 2


@pytest.mark.anyio
async def test_the_sdk_worker_shuts_down_on_a_graceful_stop(plane: ControlPlane, tmp_path: Path) -> None:
    session_id, work_id = plane.add_session(ScriptedSession(steps=[ToolStep(name="bash")], end="idle"))
    async with AsyncAnthropic(base_url=plane.url, api_key="unused") as client:
        (work,) = await claim_all(client, plane)
        worker = EnvironmentWorker(client, workdir=tmp_path, max_idle=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: worker.handle_item(
                    work_id=work.id, environment_id=work.environment_id, session_id=session_id, work_secret=work.secret
                )
            )
            await wait_until(plane, lambda s: s["sessions"][session_id]["done"])
            async with bearer(plane, plane.environment_key) as env_client:
                await env_client.beta.environments.work.stop(work_id, environment_id=plane.environment_id)
            # The worker's next heartbeat (every ttl/2 = 1.5 s) says the lease was not extended.
            await wait_until(plane, lambda s: s["work"][work_id]["state"] == "stopped")
    item = plane.state_snapshot()["work"][work_id]
    assert [(s["by"], s["force"], s["result"]) for s in item["stop_log"]] == [
        ("environment_key", False, "stopping"),
        ("sessions_token", True, "stopped"),
    ]


@pytest.mark.anyio
async def test_credentials_are_checked_per_route(plane: ControlPlane) -> None:
    first, _ = plane.add_session(ScriptedSession())
    second, _ = plane.add_session(ScriptedSession())
    env = plane.environment_id
    async with bearer(plane, plane.environment_key) as env_client:
        works = {w.data.id: w for w in await claim_all(env_client, plane)}
        other = token_of(works[second])
        for token in ("sk-ant-wrong", plane.api_key, other):
            async with bearer(plane, token) as client:
                with pytest.raises(AuthenticationError):
                    await client.beta.environments.work.poll(env)
                with pytest.raises(AuthenticationError):
                    await client.beta.environments.work.ack(works[first].id, environment_id=env)
        async with bearer(plane, other) as client:
            with pytest.raises(PermissionDeniedError):
                await client.beta.sessions.retrieve(first)
            with pytest.raises(PermissionDeniedError):
                await client.beta.environments.work.heartbeat(works[first].id, environment_id=env)
            assert (await client.beta.sessions.retrieve(second)).id == second
        async with bearer(plane, plane.api_key) as client:
            with pytest.raises(PermissionDeniedError):
                await client.beta.sessions.retrieve(first)
        assert (await env_client.beta.sessions.retrieve(first)).status == "running"
        for token in (plane.environment_key, other):
            async with bearer(plane, token) as client:
                with pytest.raises(PermissionDeniedError):
                    await client.beta.environments.work.stats(env)


@pytest.mark.anyio
async def test_stats_count_queued_pending_and_polling_workers(plane: ControlPlane) -> None:
    _, first = plane.add_session(ScriptedSession())
    _, second = plane.add_session(ScriptedSession())
    env = plane.environment_id
    async with bearer(plane, plane.api_key) as api, bearer(plane, plane.environment_key) as worker:
        work = worker.beta.environments.work

        async def counts() -> tuple[int, int, int | None, bool]:
            s = await api.beta.environments.work.stats(env)
            return s.depth, s.pending, s.workers_polling, s.oldest_queued_at is not None

        assert await counts() == (2, 0, 0, True)
        polled = await work.poll(env, anthropic_worker_id="worker-a")
        assert polled is not None and polled.id == first
        assert await counts() == (1, 1, 1, True)
        await work.ack(first, environment_id=env)
        assert await counts() == (1, 0, 1, True)
        polled = await work.poll(env, block_ms=50, anthropic_worker_id="worker-b")
        assert polled is not None and polled.id == second
        await work.ack(second, environment_id=env)
        assert await counts() == (0, 0, 2, False)
        assert await work.poll(env, block_ms=100, anthropic_worker_id="worker-b") is None


@pytest.mark.anyio
async def test_second_stop_is_409_and_not_retried(plane: ControlPlane) -> None:
    plane.add_healthcheck()
    async with bearer(plane, plane.environment_key, max_retries=2) as client:
        (work,) = await claim_all(client, plane)
        stopped = await client.beta.environments.work.stop(work.id, environment_id=plane.environment_id, force=True)
        assert stopped.state == "stopped"
        with pytest.raises(ConflictError) as caught:
            await client.beta.environments.work.stop(work.id, environment_id=plane.environment_id, force=True)
    assert caught.value.response.headers["x-should-retry"] == "false"
    state = plane.state_snapshot()
    assert state["requests"]["stop"] == 2 and state["work"][work.id]["stop_conflicts"] == 1


@pytest.mark.anyio
async def test_heartbeat_optimistic_concurrency(plane: ControlPlane) -> None:
    session_id, work_id = plane.add_session(ScriptedSession())
    env = plane.environment_id
    async with bearer(plane, plane.environment_key) as env_client:
        unacked = await env_client.beta.environments.work.poll(env)
        assert unacked is not None
        async with bearer(plane, token_of(unacked)) as client:
            work = client.beta.environments.work
            with pytest.raises(APIStatusError) as early:
                await work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
            assert early.value.status_code == 412
            await env_client.beta.environments.work.ack(work_id, environment_id=env)
            first = await work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
            assert (first.state, first.lease_extended, first.ttl_seconds) == ("active", True, 3)
            with pytest.raises(APIStatusError) as stale:
                await work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
            second = await work.heartbeat(work_id, environment_id=env, expected_last_heartbeat=first.last_heartbeat)
            assert second.last_heartbeat > first.last_heartbeat
            plane.request_stop(work_id)
            stopping = await work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="anything")
            assert (stopping.state, stopping.lease_extended) == ("stopping", False)
    assert stale.value.status_code == 412
    assert stale.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": stale.value.body["error"]["message"],  # type: ignore[index]
            "details": {
                "error_code": "heartbeat_precondition_failed",
                "current_state": {
                    "state": "active",
                    "last_heartbeat": first.last_heartbeat,
                    "lease_extended": False,
                    "ttl_seconds": 3,
                },
            },
        },
    }
    assert early.value.body["error"]["details"]["current_state"]["state"] == "queued"  # type: ignore[index]
    item = plane.state_snapshot()["work"][work_id]
    assert (item["heartbeats"], item["heartbeat_412s"], item["state"]) == (3, 2, "stopping")
    assert session_id == item["session_id"]


@pytest.mark.anyio
async def test_scripted_heartbeat_status_rejects_the_lease(plane: ControlPlane) -> None:
    _, work_id = plane.add_session(ScriptedSession(heartbeat_status=403))
    async with bearer(plane, plane.environment_key) as client:
        await claim_all(client, plane)
        with pytest.raises(PermissionDeniedError):
            await client.beta.environments.work.heartbeat(
                work_id, environment_id=plane.environment_id, expected_last_heartbeat="NO_HEARTBEAT"
            )
    assert plane.state_snapshot()["work"][work_id]["heartbeat_errors"] == 1


@pytest.mark.anyio
async def test_expired_lease_requeues_the_item(plane: ControlPlane) -> None:
    plane.set_lease_ttl(1)
    _, work_id = plane.add_session(ScriptedSession())
    env = plane.environment_id
    async with bearer(plane, plane.environment_key) as client:
        work = client.beta.environments.work
        (claimed,) = await claim_all(client, plane)
        await anyio.sleep(1.3)
        state = plane.state_snapshot()["work"][work_id]
        assert (state["state"], state["lease_expiries"]) == ("queued", 1)
        with pytest.raises(APIStatusError) as late:
            await work.heartbeat(work_id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
        assert late.value.status_code == 412
        again = await work.poll(env)
        assert again is not None and again.id == work_id and again.secret == claimed.secret
        assert (await work.ack(work_id, environment_id=env)).state == "starting"
    assert plane.state_snapshot()["work"][work_id]["claims"] == 2


@pytest.mark.anyio
async def test_polled_but_unacked_items_are_reclaimed(plane: ControlPlane) -> None:
    _, work_id = plane.add_session(ScriptedSession())
    env = plane.environment_id
    async with bearer(plane, plane.environment_key) as client:
        work = client.beta.environments.work
        first = await work.poll(env, reclaim_older_than_ms=300)
        assert first is not None and first.id == work_id
        assert await work.poll(env, reclaim_older_than_ms=300) is None
        await anyio.sleep(0.35)
        again = await work.poll(env, reclaim_older_than_ms=300)
        assert again is not None and again.id == work_id and again.state == "queued"


@pytest.mark.anyio
async def test_long_poll_wakes_when_work_arrives(plane: ControlPlane) -> None:
    async with bearer(plane, plane.environment_key) as client:

        def enqueue_later() -> None:
            time.sleep(0.2)
            plane.add_healthcheck()

        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, enqueue_later)
            started = time.monotonic()
            work = await client.beta.environments.work.poll(plane.environment_id, block_ms=999)
        assert work is not None and time.monotonic() - started < 0.8


@pytest.mark.anyio
async def test_outage_modes(plane: ControlPlane) -> None:
    env = plane.environment_id
    async with bearer(plane, plane.environment_key, timeout=0.5) as client:
        plane.set_outage("hang")
        with pytest.raises(APITimeoutError):
            await client.beta.environments.work.poll(env)
        async with httpx.AsyncClient(base_url=plane.url) as admin:
            assert (await admin.get("/_cp/state")).json()["outage"] == "hang"
            assert (await admin.post("/_cp/outage", json={"mode": "error"})).json() == {"mode": "error"}
        with pytest.raises(APIStatusError) as caught:
            await client.beta.environments.work.poll(env)
        assert caught.value.status_code == 503
        plane.set_outage("off")
        assert await client.beta.environments.work.poll(env) is None


@pytest.mark.anyio
async def test_wire_format_details(plane: ControlPlane) -> None:
    session_id, _ = plane.add_session(ScriptedSession(steps=[ToolStep(name="bash", input={"command": "true"})]))
    env_auth = {"authorization": f"Bearer {plane.environment_key}"}
    poll_url = f"/v1/environments/{plane.environment_id}/work/poll"
    async with httpx.AsyncClient(base_url=plane.url, headers=env_auth) as http:
        no_beta = await http.get(f"/v1/sessions/{session_id}")
        assert no_beta.status_code == 400 and no_beta.json()["type"] == "error"
        assert (await http.get(poll_url, params={"block_ms": 0}, headers=BETA)).status_code == 400
        assert (await http.get(poll_url, headers=BETA)).json()["id"]
        empty = await http.get(poll_url, params={"block_ms": 10}, headers=BETA)
        assert (empty.status_code, empty.text, empty.headers["content-type"]) == (200, "null", "application/json")
        missing = await http.get("/v1/sessions/sesn_nope", headers=BETA)
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        frames: list[str] = []
        async with http.stream("GET", f"/v1/sessions/{session_id}/events/stream", headers=BETA) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                frames.append(line)
                if line.startswith("event: session.status_idle"):
                    break
        listed = (await http.get(f"/v1/sessions/{session_id}/events", params={"limit": 2}, headers=BETA)).json()
        tool_use_id = listed["data"][1]["id"]
        result = {"type": "user.tool_result", "tool_use_id": tool_use_id, "content": [{"type": "text", "text": "x"}]}
        for _ in range(2):
            sent = await http.post(f"/v1/sessions/{session_id}/events", json={"events": [result]}, headers=BETA)
            assert sent.status_code == 200 and sent.json()["data"][0]["tool_use_id"] == tool_use_id
        rest = (
            await http.get(f"/v1/sessions/{session_id}/events", params={"page": listed["next_page"]}, headers=BETA)
        ).json()
    assert [f for f in frames if f.startswith("event:")] == [
        "event: session.status_running",
        "event: agent.tool_use",
        "event: session.status_idle",
    ]
    tool_use = json.loads(frames[frames.index("event: agent.tool_use") + 1].removeprefix("data: "))
    assert tool_use["id"].startswith("sevt_tooluse_") and tool_use["evaluated_permission"] == "allow"
    assert [e["type"] for e in listed["data"]] == ["session.status_running", "agent.tool_use"]
    assert [e["type"] for e in rest["data"]][:2] == ["session.status_idle", "user.tool_result"]
    assert rest["next_page"] is None and rest["data"][-1]["type"] == "user.tool_result"
    record = plane.state_snapshot()["sessions"][session_id]
    assert record["done"] and len(record["duplicates"]) == 1 and record["status"] == "terminated"


def test_module_entry_point_serves_until_sigterm(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"environment_id": "env_cli", "sessions": [{"session_id": "sesn_cli"}]}))
    secrets_dir = tmp_path / "secrets"
    command = [sys.executable, "-m", "sandboxd.controlplane", "--scenario", str(scenario), "--port", "0"]
    process = subprocess.Popen(
        [*command, "--secrets-dir", str(secrets_dir)], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("controlplane url=http://127.0.0.1:") and line.endswith(" environment_id=env_cli")
        url = line.split()[1].removeprefix("url=")
        state = httpx.get(f"{url}/_cp/state").json()
        assert list(state["sessions"]) == ["sesn_cli"] and state["stats"]["depth"] == 1
        for name in ("environment_key", "api_key"):
            path = secrets_dir / name
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert path.read_text().strip() not in line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stdout.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
