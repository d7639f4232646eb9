"""Multi-turn sessions and fault injection of the local control plane, over real HTTP with the SDK.

A turn's work item ends stopped; then the user speaks again: the next turn's tool uses are
emitted and a new item with its own sessions token is queued, while the old token stops
authorizing the session. Faults (seeded 5xx, delays, dropped streams, revoked leases,
terminated sessions) are reversible, counted in the snapshot, and every stop call is logged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from anthropic import APITimeoutError, AsyncAnthropic, AuthenticationError, ConflictError, PermissionDeniedError
from anthropic.lib.environments import EnvironmentWorker
from anthropic.types.beta.environments import BetaSelfHostedWork

from sandboxd.controlplane import ControlPlane, Expect, FaultPlan, FaultRule, Scenario, ScriptedSession, ToolStep
from sandboxd.controlplane.faults import FaultInjector
from tests.integration.test_controlplane import bearer, token_of


@pytest.fixture(autouse=True)
def _no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("ANTHROPIC_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    with ControlPlane(Scenario(lease_ttl_seconds=3)) as cp:
        yield cp


async def claim_one(cp: ControlPlane) -> BetaSelfHostedWork:
    async with bearer(cp, cp.environment_key) as client:
        work = await client.beta.environments.work.poll(cp.environment_id)
        assert work is not None
        await client.beta.environments.work.ack(work.id, environment_id=cp.environment_id)
        return work


async def serve(cp: ControlPlane, work: BetaSelfHostedWork, workdir: Path, max_idle: float = 1) -> None:
    """One item through the SDK's own worker, on the item's sessions token."""
    async with AsyncAnthropic(base_url=cp.url, api_key="unused") as client:
        worker = EnvironmentWorker(client, workdir=workdir, max_idle=max_idle)
        with anyio.fail_after(30):
            await worker.handle_item(
                work_id=work.id, environment_id=work.environment_id, session_id=work.data.id, work_secret=work.secret
            )


async def start_script(cp: ControlPlane, token: str, session_id: str) -> None:
    """Connect to the event stream (the script starts then) until the first idle."""
    headers = {"authorization": f"Bearer {token}", "anthropic-beta": "managed-agents-2026-04-01"}
    async with httpx.AsyncClient(base_url=cp.url, headers=headers) as http:
        async with http.stream("GET", f"/v1/sessions/{session_id}/events/stream") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: session.status_idle"):
                    return


async def wait_until(cp: ControlPlane, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(lambda: cp.wait_for(predicate, 30.0))


def bash(command: str, *contains: str) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(is_error=False, contains=list(contains)))


@pytest.mark.anyio
async def test_each_turn_is_served_by_its_own_item_and_reads_what_the_last_one_wrote(
    plane: ControlPlane, tmp_path: Path
) -> None:
    write = ToolStep(name="write", input={"file_path": "notes/a.txt", "content": "turn one wrote this\n"})
    read = ToolStep(name="read", input={"file_path": "notes/a.txt"}, expect=Expect(contains=["turn one wrote this"]))
    turns = [[write], [read, bash("echo two >> notes/a.txt")], [bash("cat notes/a.txt", "turn one", "two")]]
    session_id, first = plane.add_session(ScriptedSession(turns=turns, end="terminate"))
    async with AsyncAnthropic(base_url=plane.url, api_key="unused") as client:
        worker = EnvironmentWorker(
            client, environment_id=plane.environment_id, environment_key=plane.environment_key,
            workdir=tmp_path, max_idle=1,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            state = await wait_until(plane, lambda s: s["sessions"][session_id]["status"] == "terminated"
                                     and all(w["state"] == "stopped" for w in s["work"].values()))
            tg.cancel_scope.cancel()
    record = state["sessions"][session_id]
    assert record["passed"] and record["done"] and record["turn"] == 3, record
    assert [t["work_id"] for t in record["turns"]] == record["work_ids"] and record["work_ids"][0] == first
    assert len(set(record["work_ids"])) == 3 and set(state["work"]) == set(record["work_ids"])
    assert [len(t["results"]) for t in record["turns"]] == [1, 2, 1]
    assert "turn one wrote this" in record["turns"][1]["results"][0]["text"]
    for work_id in record["work_ids"]:
        item = state["work"][work_id]
        assert (item["claims"], item["times_stopped"], item["heartbeat_412s"]) == (1, 1, 0)
        assert item["stop_log"][0] | {"at": None} == {
            "by": "sessions_token", "helper": "environments-worker", "force": True, "result": "stopped", "at": None,
        }
    assert state["stop_summary"] == {"items": 3, "stopped_once": 3, "stopped_more": [], "not_stopped": [],
                                     "redundant_stops_refused": 0}


@pytest.mark.anyio
async def test_an_old_items_token_stops_authorizing_the_session_once_the_next_turn_is_queued(
    plane: ControlPlane,
) -> None:
    session_id, _ = plane.add_session(ScriptedSession(turns=[[bash("true")], [bash("true")]], end="idle"))
    env = plane.environment_id
    first = await claim_one(plane)
    async with bearer(plane, token_of(first)) as old:
        await old.beta.environments.work.heartbeat(first.id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
        await start_script(plane, token_of(first), session_id)
        events = [e async for e in old.beta.sessions.events.list(session_id)]
        (use,) = [e for e in events if e.type == "agent.tool_use"]
        result = {"type": "user.tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "ok"}]}
        await old.beta.sessions.events.send(session_id, events=[result])  # type: ignore[list-item]
        assert plane.state_snapshot()["work"] == {first.id: plane.state_snapshot()["work"][first.id]}
        await old.beta.environments.work.stop(first.id, environment_id=env, force=True)
        second = await claim_one(plane)
        assert second.id != first.id and second.data.id == session_id and token_of(second) != token_of(first)
        with pytest.raises(AuthenticationError):
            await old.beta.sessions.retrieve(session_id)
        with pytest.raises(AuthenticationError):
            await old.beta.sessions.events.send(session_id, events=[result])  # type: ignore[list-item]
        with pytest.raises(PermissionDeniedError):
            await old.beta.environments.work.heartbeat(
                second.id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT"
            )
        with pytest.raises(ConflictError):  # still scoped to its own (stopped) item
            await old.beta.environments.work.stop(first.id, environment_id=env, force=True)
    async with bearer(plane, token_of(second)) as new:
        assert (await new.beta.sessions.retrieve(session_id)).status == "running"
        types = [e.type async for e in new.beta.sessions.events.list(session_id)]
    assert types[-4:] == ["user.message", "session.status_running", "agent.tool_use", "session.status_idle"]
    state = plane.state_snapshot()
    record = state["sessions"][session_id]
    assert [t["work_id"] for t in record["turns"]] == [first.id, second.id] and record["work_id"] == second.id
    assert (record["turn"], record["status"], record["done"]) == (2, "running", False)
    # The old token's late stop was refused (409): the item was stopped once, and one stop was redundant.
    assert state["work"][first.id]["times_stopped"] == 1 and state["stop_summary"]["stopped_more"] == []
    assert state["stop_summary"]["redundant_stops_refused"] == 1
    assert state["stop_summary"]["not_stopped"] == [second.id]


@pytest.mark.anyio
async def test_an_item_stopped_mid_turn_queues_no_next_turn(plane: ControlPlane) -> None:
    session_id, work_id = plane.add_session(ScriptedSession(turns=[[bash("true")], [bash("true")]]))
    work = await claim_one(plane)
    async with bearer(plane, plane.environment_key) as client:
        await client.beta.sessions.retrieve(session_id)
        await client.beta.environments.work.stop(work.id, environment_id=plane.environment_id, force=True)
    state = plane.state_snapshot()
    assert list(state["work"]) == [work_id] and state["sessions"][session_id]["turn"] == 1
    assert state["work"][work_id]["stop_log"][0]["by"] == "environment_key"
    assert state["work"][work_id]["stop_log"][0]["helper"] is None


@pytest.mark.anyio
async def test_seeded_5xx_on_heartbeats_and_event_sends_are_survived_and_counted(tmp_path: Path) -> None:
    plan = FaultPlan(seed=7, rules=[
        FaultRule(route="heartbeat", rate=0.3), FaultRule(route="events_send", rate=0.4, status=500),
    ])
    steps = [bash(f"echo step{n}", f"step{n}") for n in range(6)]
    with ControlPlane(Scenario(lease_ttl_seconds=10, faults=plan)) as cp:
        session_id, work_id = cp.add_session(ScriptedSession(steps=steps))
        await serve(cp, await claim_one(cp), tmp_path)
        state = cp.state_snapshot()
        async with httpx.AsyncClient(base_url=cp.url) as admin:
            assert (await admin.get("/_cp/faults")).json() == state["faults"]
            off = (await admin.post("/_cp/faults", json={})).json()
        assert off["plan"] == {"seed": 0, "rules": []} and off["injected"] == state["faults"]["injected"]
    assert state["sessions"][session_id]["passed"] and state["sessions"][session_id]["duplicates"] == []
    assert state["faults"]["injected"]["events_send.error"] >= 1
    assert state["work"][work_id]["times_stopped"] == 1
    # The same seed decides the same way for the same request order; another seed differs.
    injectors = [FaultInjector(FaultPlan(seed=s, rules=plan.rules)) for s in (7, 7, 8)]
    runs = [[i.pick("events_send", ("error", "delay")) is not None for _ in range(200)] for i in injectors]
    assert runs[0] == runs[1] != runs[2] and 40 <= sum(runs[0]) <= 120  # rate 0.4


@pytest.mark.anyio
async def test_a_request_delayed_past_the_callers_timeout_is_not_applied(plane: ControlPlane) -> None:
    plane.set_faults({"rules": [{"route": "stop", "kind": "delay", "rate": 1.0, "delay_seconds": 1.0}]})
    plane.add_healthcheck()
    work = await claim_one(plane)
    async with bearer(plane, plane.environment_key, timeout=0.3) as client:
        with pytest.raises(APITimeoutError):
            await client.beta.environments.work.stop(work.id, environment_id=plane.environment_id, force=True)
        await anyio.sleep(1.2)
        assert plane.state_snapshot()["work"][work.id]["stop_log"] == []
        plane.set_faults(FaultPlan())
        await client.beta.environments.work.stop(work.id, environment_id=plane.environment_id, force=True)
    state = plane.state_snapshot()
    assert state["work"][work.id]["times_stopped"] == 1 and state["faults"]["injected"] == {"stop.delay": 1}


@pytest.mark.anyio
async def test_a_revoked_lease_is_412_for_its_holder_and_the_next_holder_finishes(
    plane: ControlPlane, tmp_path: Path
) -> None:
    session_id, work_id = plane.add_session(ScriptedSession(steps=[bash("sleep 2; echo a", "a"), bash("echo b", "b")]))
    first = await claim_one(plane)
    (tmp_path / "a").mkdir()
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve, plane, first, tmp_path / "a")
        await wait_until(plane, lambda s: s["work"][work_id]["state"] == "active")
        async with httpx.AsyncClient(base_url=plane.url) as admin:
            revoked = (await admin.post(f"/_cp/work/{work_id}/revoke_lease")).json()
            assert revoked["state"] == "queued"
            assert (await admin.post(f"/_cp/work/{work_id}/revoke_lease")).status_code == 409
    item = plane.state_snapshot()["work"][work_id]
    assert item["heartbeat_412s"] >= 1 and item["stop_log"] == [], "a worker that lost its lease must not stop"
    (tmp_path / "b").mkdir()
    await serve(plane, await claim_one(plane), tmp_path / "b")
    state = plane.state_snapshot()
    assert state["sessions"][session_id]["done"], state["sessions"][session_id]
    item = state["work"][work_id]
    assert (item["claims"], item["lease_revocations"], item["times_stopped"]) == (2, 1, 1)
    assert state["faults"]["injected"] == {"lease_revoked": 1}


@pytest.mark.anyio
async def test_sessions_terminated_with_tool_calls_pending(plane: ControlPlane, tmp_path: Path) -> None:
    scripted, scripted_work = plane.add_session(
        ScriptedSession(steps=[bash("echo a"), bash("echo b"), bash("echo c")], terminate_after_results=1)
    )
    await serve(plane, await claim_one(plane), tmp_path)
    slow, slow_work = plane.add_session(ScriptedSession(steps=[bash("sleep 2"), bash("echo never")]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve, plane, await claim_one(plane), tmp_path)
        await wait_until(plane, lambda s: s["sessions"][slow]["events"] >= 3)
        async with httpx.AsyncClient(base_url=plane.url) as admin:
            body = (await admin.post(f"/_cp/sessions/{slow}/terminate")).json()
    assert body["status"] == "terminated" and body["terminated_by"] == "admin"
    state = plane.state_snapshot()
    for session_id, work_id, by in ((scripted, scripted_work, "scenario"), (slow, slow_work, "admin")):
        record = state["sessions"][session_id]
        assert (record["status"], record["terminated_by"], record["done"]) == ("terminated", by, False)
        assert record["pending_tool_uses"] == 1 and state["work"][work_id]["times_stopped"] == 1
    assert len(state["sessions"][scripted]["results"]) == 1
    assert state["faults"]["injected"] == {"session_terminated": 1}
    # A stream opened on an ended session starts with its terminal event, then ends.
    headers = {"authorization": f"Bearer {plane.environment_key}", "anthropic-beta": "managed-agents-2026-04-01"}
    async with httpx.AsyncClient(base_url=plane.url, headers=headers) as http:
        with anyio.fail_after(5):
            async with http.stream("GET", f"/v1/sessions/{slow}/events/stream") as stream:
                frames = [line async for line in stream.aiter_lines() if line.startswith("event:")]
    assert frames == ["event: session.status_terminated"]


@pytest.mark.anyio
async def test_dropped_streams_are_reconnected_and_the_session_completes(tmp_path: Path) -> None:
    plan = FaultPlan(seed=3, rules=[FaultRule(route="stream", kind="drop", rate=0.6, after_events=2)])
    steps = [bash(f"echo s{n}; sleep 0.3", f"s{n}") for n in range(5)]
    with ControlPlane(Scenario(lease_ttl_seconds=10, faults=plan)) as cp:
        session_id, _ = cp.add_session(ScriptedSession(steps=steps))
        work = await claim_one(cp)
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, cp, work, tmp_path)
            await wait_until(cp, lambda s: len(s["sessions"][session_id]["results"]) >= 2)
            async with httpx.AsyncClient(base_url=cp.url) as admin:
                dropped = (await admin.post(f"/_cp/sessions/{session_id}/drop_streams")).json()["dropped"]
        state = cp.state_snapshot()
    record = state["sessions"][session_id]
    assert record["passed"] and record["duplicates"] == [] and dropped in (0, 1)
    assert state["faults"]["injected"]["stream.drop"] >= 1
    assert record["streams_dropped"] >= 1
    assert state["requests"]["stream"] > state["faults"]["injected"]["stream.drop"]


def test_turns_and_steps_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        ScriptedSession(steps=[bash("true")], turns=[[bash("true")]])
    with pytest.raises(ValueError, match="stream"):
        FaultRule(route="heartbeat", kind="drop", rate=0.5)
    assert ScriptedSession(steps=[bash("true")]).script == [[bash("true")]]
