"""Tool confirmations and custom tools on the local control plane, with the real SDK worker in-process.

A call under `always_ask` is an `agent.tool_use` with `evaluated_permission: "ask"` and a
`requires_action` idle naming it; the application (here the test, on the API key) answers with a
`user.tool_confirmation`: allowed, the worker runs it; denied, it never runs. A custom tool call
(`agent.custom_tool_use`) is the application's to answer: the worker, which does not own the tool,
posts nothing. The control plane records who posted every result and confirmation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
from anthropic import Anthropic, AsyncAnthropic, PermissionDeniedError
from anthropic.lib.environments import EnvironmentWorker

from sandboxd.controlplane import ControlPlane, Expect, Scenario, ScriptedSession, ToolStep
from sandboxd.controlplane.scenario import Confirmation
from tests.integration.test_controlplane import bearer, claim_all, token_of

BETA = {"anthropic-beta": "managed-agents-2026-04-01"}
RUNNER_LOG = "anthropic.lib.tools._beta_session_runner"


def ask(command: str, *contains: str, confirmation: Confirmation | None = None) -> ToolStep:
    """A bash call under `always_ask`."""
    expect = Expect(is_error=False, contains=list(contains), confirmation=confirmation)
    return ToolStep(name="bash", input={"command": command}, permission="ask", expect=expect)


def bash(command: str, *contains: str) -> ToolStep:
    return ToolStep(name="bash", input={"command": command}, expect=Expect(is_error=False, contains=list(contains)))


def custom(name: str, expected: str, **tool_input: Any) -> ToolStep:
    return ToolStep(name=name, input=tool_input, custom=True, expect=Expect(is_error=False, contains=[expected]))


@dataclass
class Application:
    """The user's side of a session, on the API key: it reads the session's events (as the docs'
    client loop does), confirms each `always_ask` call per `decide(command)` and answers each
    custom tool call with `answer(name, input)`. Run it with `start()`/`stop()` (a thread)."""

    control_plane: ControlPlane
    session_id: str
    decide: Callable[[str], str] = lambda command: "allow"
    answer: Callable[[str, dict[str, Any]], str] = lambda name, tool_input: f"{name} answered"
    deny_message: str | None = None
    handled: dict[str, str] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Application:
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"application-{self.session_id}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> Application:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        cp = self.control_plane
        try:
            with Anthropic(base_url=cp.url, api_key=cp.api_key, max_retries=0) as client:
                while not self._stop.is_set() and not self._step(client):
                    time.sleep(0.05)
        except BaseException as error:  # noqa: BLE001 - re-raised by stop()
            self.errors.append(error)

    def _step(self, client: Anthropic) -> bool:
        """Answer what the latest `requires_action` idle names; True once the session has ended."""
        events = list(client.beta.sessions.events.list(self.session_id, limit=1000))
        if any(e.type == "session.status_terminated" for e in events):
            return True
        idles = [e for e in events if e.type == "session.status_idle"]
        if not idles or idles[-1].stop_reason.type != "requires_action":
            return False
        by_id = {e.id: e for e in events}
        for event_id in idles[-1].stop_reason.event_ids:
            event = by_id.get(event_id)
            if event is None or event_id in self.handled:
                continue
            if event.type == "agent.tool_use" and event.evaluated_permission == "ask":
                decision = self.decide(str(event.input.get("command", "")))
                confirmation: dict[str, Any] = {"type": "user.tool_confirmation", "tool_use_id": event_id}
                confirmation["result"] = decision
                if decision == "deny" and self.deny_message:
                    confirmation["deny_message"] = self.deny_message
                client.beta.sessions.events.send(self.session_id, events=[confirmation])  # type: ignore[list-item]
                self.handled[event_id] = decision
            elif event.type == "agent.custom_tool_use":
                text = self.answer(event.name, dict(event.input))
                result = {
                    "type": "user.custom_tool_result",
                    "custom_tool_use_id": event_id,
                    "content": [{"type": "text", "text": text}],
                }
                client.beta.sessions.events.send(self.session_id, events=[result])  # type: ignore[list-item]
                self.handled[event_id] = "answered"
        return False


def runner_logged(caplog: pytest.LogCaptureFixture, text: str, count: int = 1, timeout: float = 10) -> None:
    """Wait (in the application's thread) until the SDK runner logged `text` `count` times."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(text in r.getMessage() for r in caplog.records if r.name == RUNNER_LOG) >= count:
            return
        time.sleep(0.05)


def runner_has_held(caplog: pytest.LogCaptureFixture, count: int) -> None:
    runner_logged(caplog, "tool call awaiting confirmation; holding", count)


async def wait_until(cp: ControlPlane, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(lambda: cp.wait_for(predicate, 15.0))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("ANTHROPIC_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    with ControlPlane(Scenario(lease_ttl_seconds=10)) as cp:
        yield cp


async def serve_one(cp: ControlPlane, workdir: Path, before: Callable[[str], Awaitable[None]] | None = None) -> None:
    """Claim the one queued item and serve it with the SDK's own worker, on its sessions token
    (after `before(sessions_token)`, if given)."""
    async with AsyncAnthropic(base_url=cp.url, api_key="unused") as client:
        (work,) = await claim_all(client, cp)
        if before is not None:
            await before(token_of(work))
        worker = EnvironmentWorker(client, workdir=workdir, max_idle=1)
        with anyio.fail_after(30):
            await worker.handle_item(
                work_id=work.id, environment_id=work.environment_id, session_id=work.data.id, work_secret=work.secret
            )


def assert_served_once(state: dict[str, Any], session_id: str) -> dict[str, Any]:
    record = state["sessions"][session_id]
    failures = [r for r in record["results"] if not r["passed"]]
    assert record["done"] and record["passed"], failures or record
    assert record["status"] == "terminated" and record["awaiting_user"] == []
    assert record["refused_events"] == [] and record["duplicates"] == [] and record["late_results"] == 0
    item = state["work"][record["work_id"]]
    assert item["stops"] == [{"credential": "sessions_token", "force": True}] and item["times_stopped"] == 1
    return dict(record)


@pytest.mark.anyio
async def test_an_allowed_call_runs_once_confirmed_and_a_denied_one_never_runs(
    plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    steps = [
        ask("echo confirmed > allowed.txt && cat allowed.txt", "confirmed", confirmation="allow"),
        ask("touch denied.txt && echo ran-anyway", confirmation="deny"),
        bash("test ! -e denied.txt && echo denied-call-never-ran", "denied-call-never-ran"),
    ]
    session_id, _ = plane.add_session(ScriptedSession(steps=steps))
    decisions: list[str] = []

    def decide(command: str) -> str:
        # Once the worker's runner holds the call (a confirmation read with the call is never held).
        runner_has_held(caplog, len(decisions) + 1)
        decisions.append("deny" if "denied.txt" in command else "allow")
        return decisions[-1]

    with Application(plane, session_id, decide=decide, deny_message="not in this workspace"):
        await serve_one(plane, tmp_path)
    record = assert_served_once(plane.state_snapshot(), session_id)

    allowed, denied, check = record["results"]
    assert (allowed["confirmation"], allowed["confirmed_by"], allowed["ran"]) == ("allow", "api_key", True)
    assert (allowed["text"], allowed["is_error"], allowed["posted_by"]) == ("confirmed", False, "sessions_token")
    assert (denied["confirmation"], denied["confirmed_by"], denied["ran"]) == ("deny", "api_key", False)
    assert denied["posted_by"] is None and denied["text"] is None
    assert check["text"] == "denied-call-never-ran" and check["confirmation"] is None
    assert [c["by"] for c in record["confirmations"]] == ["api_key", "api_key"]
    assert (tmp_path / "allowed.txt").read_text() == "confirmed\n" and not (tmp_path / "denied.txt").exists()
    # The worker read and answered on its sessions token; the application listed and sent on the API key.
    assert record["credentials_seen"]["events_send"] == ["api_key", "sessions_token"]
    assert record["credentials_seen"]["stream"] == ["sessions_token"]
    # The SDK's runner held both calls for a confirmation, and left the denied one alone.
    runner = [r.getMessage() for r in caplog.records if r.name == RUNNER_LOG]
    assert sum("awaiting confirmation; holding tool=bash" in m for m in runner) == 2, runner
    assert [m for m in runner if m.startswith("not executing tool")] == [
        f"not executing tool tool=bash tool_use_id={denied['tool_use_id']} confirmation=deny"
    ]


@pytest.mark.anyio
async def test_a_custom_tool_call_is_answered_by_the_application_never_by_the_worker(
    plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=RUNNER_LOG)
    steps = [
        custom("lookup_order", "order 42: shipped", order_id="42"),
        bash("echo after-the-custom-tool", "after-the-custom-tool"),
    ]
    session_id, _ = plane.add_session(ScriptedSession(steps=steps))

    def answer(name: str, tool_input: dict[str, Any]) -> str:
        # Once the worker's runner has seen the call (an answer read with the call is never dispatched).
        runner_logged(caplog, "not executing tool tool=lookup_order")
        return f"order {tool_input['order_id']}: shipped"

    with Application(plane, session_id, answer=answer) as application:
        await serve_one(plane, tmp_path)
    record = assert_served_once(plane.state_snapshot(), session_id)

    lookup, after = record["results"]
    assert (lookup["type"], lookup["name"]) == ("agent.custom_tool_use", "lookup_order")
    assert lookup["evaluated_permission"] is None and lookup["confirmation"] is None
    assert (lookup["text"], lookup["posted_by"]) == ("order 42: shipped", "api_key")
    assert (after["posted_by"], after["text"]) == ("sessions_token", "after-the-custom-tool")
    assert list(application.handled.values()) == ["answered"]
    # The SDK's runner saw the call and, not owning the tool, posted nothing for it.
    runner = [r.getMessage() for r in caplog.records if r.name == RUNNER_LOG]
    assert f"not executing tool tool=lookup_order tool_use_id={lookup['tool_use_id']} confirmation=None" in runner


@pytest.mark.anyio
async def test_decisions_made_before_the_worker_connects_are_honoured(plane: ControlPlane, tmp_path: Path) -> None:
    """The worker comes late: the denial and the approval are already in the history it reads."""
    steps = [
        ask("touch early-denied.txt", confirmation="deny"),
        ask("echo allowed-early", "allowed-early", confirmation="allow"),
        bash("test ! -e early-denied.txt && echo absent", "absent"),
    ]
    session_id, _ = plane.add_session(ScriptedSession(steps=steps))
    decide = lambda command: "deny" if "early-denied" in command else "allow"  # noqa: E731

    async def decide_first(token: str) -> None:
        headers = {"authorization": f"Bearer {token}", **BETA}
        async with httpx.AsyncClient(base_url=plane.url, headers=headers) as http:
            async with http.stream("GET", f"/v1/sessions/{session_id}/events/stream"):  # the script starts
                await wait_until(plane, lambda s: len(s["sessions"][session_id]["confirmations"]) == 2)

    with Application(plane, session_id, decide=decide):
        await serve_one(plane, tmp_path, before=decide_first)
    record = assert_served_once(plane.state_snapshot(), session_id)
    assert [(r["confirmation"], r["ran"], r["text"]) for r in record["results"]] == [
        ("deny", False, None), ("allow", True, "allowed-early"), (None, True, "absent")
    ]


@pytest.mark.anyio
async def test_a_call_the_server_denied_waits_for_nothing_and_never_runs(plane: ControlPlane, tmp_path: Path) -> None:
    refused = ToolStep(name="bash", input={"command": "touch refused.txt"}, permission="deny")
    steps = [refused, bash("test ! -e refused.txt && echo absent", "absent")]
    session_id, _ = plane.add_session(ScriptedSession(steps=steps))
    await serve_one(plane, tmp_path)
    record = assert_served_once(plane.state_snapshot(), session_id)
    assert [(r["evaluated_permission"], r["ran"]) for r in record["results"]] == [("deny", False), ("allow", True)]
    assert record["confirmations"] == [] and not (tmp_path / "refused.txt").exists()


@pytest.mark.anyio
async def test_the_api_rules_for_confirmations_and_results(plane: ControlPlane) -> None:
    steps = [ask("echo one"), custom("lookup_order", "x"), bash("echo three")]
    session_id, _ = plane.add_session(ScriptedSession(steps=steps))
    async with bearer(plane, plane.environment_key) as env_client:
        (work,) = await claim_all(env_client, plane)
    token = token_of(work)
    worker = {"authorization": f"Bearer {token}", **BETA}
    app = {"authorization": f"Bearer {plane.api_key}", **BETA}
    events_url = f"/v1/sessions/{session_id}/events"
    async with httpx.AsyncClient(base_url=plane.url) as http:
        async with http.stream("GET", f"{events_url}/stream", headers=worker) as stream:  # the script starts
            async for line in stream.aiter_lines():
                if line.startswith("event: session.status_idle"):
                    break
        listed = (await http.get(events_url, headers=app)).json()["data"]
        assert [e["type"] for e in listed] == ["session.status_running", "agent.tool_use", "session.status_idle"]
        tool_use, idle = listed[1], listed[2]
        assert (tool_use["evaluated_permission"], tool_use["evaluation"]) == ("ask", {"type": "always_ask"})
        assert idle["stop_reason"] == {"type": "requires_action", "event_ids": [tool_use["id"]]}
        state = plane.state_snapshot()["sessions"][session_id]
        assert state["status"] == "idle"
        assert state["awaiting_user"] == [
            {"event_id": tool_use["id"], "type": "agent.tool_use", "name": "bash", "awaiting": "user.tool_confirmation"}
        ]

        async def send(headers: dict[str, str], event: dict[str, Any]) -> int:
            return (await http.post(events_url, json={"events": [event]}, headers=headers)).status_code

        result = {"type": "user.tool_result", "tool_use_id": tool_use["id"], "content": [{"type": "text", "text": "1"}]}
        confirm = {"type": "user.tool_confirmation", "tool_use_id": tool_use["id"]}
        assert await send(worker, result) == 400  # not confirmed yet
        assert await send(app, {**confirm, "result": "maybe"}) == 400
        assert await send(app, {**confirm, "result": "allow", "deny_message": "no"}) == 400
        assert await send(app, {**confirm, "result": "allow"}) == 200
        assert await send(app, {**confirm, "result": "deny"}) == 400  # already confirmed
        assert plane.state_snapshot()["sessions"][session_id]["status"] == "running"
        assert await send(worker, result) == 200

        listed = (await http.get(events_url, headers=app)).json()["data"]
        custom_use = listed[-2]
        assert custom_use["type"] == "agent.custom_tool_use" and "evaluated_permission" not in custom_use
        assert listed[-1]["stop_reason"] == {"type": "requires_action", "event_ids": [custom_use["id"]]}
        wrong_type = {"type": "user.tool_result", "tool_use_id": custom_use["id"], "content": []}
        assert await send(worker, wrong_type) == 400
        answer = {"type": "user.custom_tool_result", "custom_tool_use_id": custom_use["id"], "content": []}
        assert await send(app, answer) == 200
        assert await send(app, {**confirm, "tool_use_id": custom_use["id"], "result": "allow"}) == 400

    record = plane.state_snapshot()["sessions"][session_id]
    assert [(r["type"], r["by"]) for r in record["refused_events"]] == [
        ("user.tool_result", "sessions_token"),
        ("user.tool_confirmation", "api_key"),
        ("user.tool_confirmation", "api_key"),
        ("user.tool_confirmation", "api_key"),
        ("user.tool_result", "sessions_token"),
        ("user.tool_confirmation", "api_key"),
    ]
    assert [r["posted_by"] for r in record["results"]] == ["sessions_token", "api_key"]
    assert record["awaiting_user"] == [] and record["status"] == "running"
    # The API key may list and send a session's events, but not read the session or its stream.
    async with bearer(plane, plane.api_key) as client:
        with pytest.raises(PermissionDeniedError):
            await client.beta.sessions.retrieve(session_id)
        with pytest.raises(PermissionDeniedError):
            await client.beta.sessions.events.stream(session_id)
