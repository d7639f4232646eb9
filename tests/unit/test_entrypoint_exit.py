"""The in-sandbox entrypoint's decisions: its exit code (first reason wins), tool events, non-dumpable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx2
import pytest
from anthropic.lib.tools.agent_toolset import AgentToolContext

from sandboxd import entrypoint
from sandboxd.entrypoint import ItemServer, _ItemWatch, observed_tools
from sandboxd.protocol import Event, ExitCode

WORK = "https://api.example.test/v1/environments/env_1/work/work_1"


@pytest.fixture
def stdout_events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The event lines the entrypoint writes to fd 1, parsed."""
    events: list[dict[str, Any]] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if fd != 1:
            return real_write(fd, data)
        for line in bytes(data).splitlines():
            events.append(json.loads(line))
        return len(data)

    monkeypatch.setattr("sandboxd.entrypoint.os.write", write)
    return events


def _seen(watch: _ItemWatch, route: str, status: int | None) -> None:
    request = httpx2.Request("POST", f"{WORK}/{route}")
    response = None if status is None else httpx2.Response(status, request=request)
    watch(request, response, None if response else OSError("reset"), 0.01)


# --- _ItemWatch: what the worker's requests said ----------------------------------------------------


def test_an_accepted_heartbeat_is_reported_on_stdout(stdout_events: list[dict[str, Any]]) -> None:
    watch = _ItemWatch()
    _seen(watch, "heartbeat", 200)
    assert [e["event"] for e in stdout_events] == ["heartbeat"] and isinstance(stdout_events[0]["t"], float)
    assert watch.end is None


@pytest.mark.parametrize(
    ("status", "end"),
    [
        (412, ExitCode.LEASE_LOST),
        (401, ExitCode.HEARTBEAT_REJECTED),
        (403, ExitCode.HEARTBEAT_REJECTED),
        (404, ExitCode.HEARTBEAT_REJECTED),
        (408, None),  # timeouts and throttling are retried by the SDK
        (429, None),
        (500, None),
        (503, None),
        (None, None),  # no response at all: a transport error, retried
    ],
)
def test_a_heartbeat_answer_decides_the_end(status: int | None, end: ExitCode | None,
                                            stdout_events: list[dict[str, Any]]) -> None:
    watch = _ItemWatch()
    _seen(watch, "heartbeat", status)
    assert watch.end is end and not watch.stopped
    assert stdout_events == []


@pytest.mark.parametrize(("status", "stopped"), [(200, True), (204, True), (409, True), (404, False), (500, False),
                                                 (None, False)])
def test_a_stop_that_landed_is_remembered(status: int | None, stopped: bool) -> None:
    watch = _ItemWatch()
    _seen(watch, "stop", status)
    assert watch.stopped is stopped and watch.end is None


def test_the_first_end_reason_wins() -> None:
    watch = _ItemWatch()
    _seen(watch, "heartbeat", 412)
    _seen(watch, "heartbeat", 403)
    watch.record(ExitCode.CANCELLED)
    assert watch.end is ExitCode.LEASE_LOST


def test_other_requests_say_nothing_about_the_item(stdout_events: list[dict[str, Any]]) -> None:
    watch = _ItemWatch()
    request = httpx2.Request("GET", "https://api.example.test/v1/sessions/sesn_1")
    watch(request, httpx2.Response(412, request=request), None, 0.01)
    assert watch.end is None and not watch.stopped and stdout_events == []


# --- ItemServer._exit_code ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("recorded", "stopped", "error", "code"),
    [
        (None, True, None, ExitCode.SERVED),
        (None, False, None, ExitCode.UNSTOPPED),  # the SDK ended the lease without a stop: the daemon stops it
        (None, True, RuntimeError("boom"), ExitCode.FAILED),
        (None, False, RuntimeError("boom"), ExitCode.UNSTOPPED),  # the item may still be held
        (ExitCode.CANCELLED, True, None, ExitCode.CANCELLED),
        (ExitCode.CANCELLED, False, None, ExitCode.UNSTOPPED),
        (ExitCode.ABORTED, True, RuntimeError("cancelled mid-fetch"), ExitCode.ABORTED),
        (ExitCode.LEASE_LOST, False, RuntimeError("412"), ExitCode.LEASE_LOST),
        (ExitCode.HEARTBEAT_REJECTED, True, RuntimeError("403"), ExitCode.HEARTBEAT_REJECTED),
        # anthropic 2.17 stops nothing after a refused lease: never claim it stopped
        (ExitCode.HEARTBEAT_REJECTED, False, None, ExitCode.UNSTOPPED),
    ],
)
async def test_the_exit_code_is_the_first_reason_recorded(recorded: ExitCode | None, stopped: bool,
                                                          error: BaseException | None, code: ExitCode,
                                                          tmp_path: Path) -> None:
    server = ItemServer(str(tmp_path), max_idle=1)
    if recorded is not None:
        server.watch.record(recorded)
    server.watch.stopped = stopped
    server.watch.lease_lost = recorded is ExitCode.LEASE_LOST  # what a 412 sets
    assert server._exit_code(error) is code
    assert server._exit_code(None) is code, "asking again changes nothing"


# --- tool events -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_tool_call_is_reported_with_its_outcome(tmp_path: Path,
                                                           stdout_events: list[dict[str, Any]]) -> None:
    tools = {tool.name: tool for tool in observed_tools(AgentToolContext(workdir=str(tmp_path)))}
    assert {"bash", "read", "write", "edit", "glob", "grep"} <= set(tools)

    assert await tools["glob"].call({"pattern": "nothing-*"}) is not None
    with pytest.raises(Exception, match="no such file"):
        await tools["read"].call({"file_path": str(tmp_path / "missing")})

    assert [(e["event"], e["tool"]) for e in stdout_events] == [
        ("tool_start", "glob"), ("tool_end", "glob"), ("tool_start", "read"), ("tool_end", "read")]
    ends = [e for e in stdout_events if e["event"] == "tool_end"]
    assert [e["outcome"] for e in ends] == ["ok", "error"]
    assert all(isinstance(e["seconds"], int | float) and e["seconds"] >= 0 for e in ends)
    assert all(e["t"] >= stdout_events[0]["t"] for e in stdout_events)


@pytest.mark.anyio
async def test_each_tool_is_wrapped_once_around_its_own_call(monkeypatch: pytest.MonkeyPatch,
                                                            stdout_events: list[dict[str, Any]]) -> None:
    calls: list[tuple[str, object]] = []

    class Tool:
        def __init__(self, name: str) -> None:
            self.name = name

        async def call(self, input: object) -> str:
            calls.append((self.name, input))
            return f"{self.name} done"

    monkeypatch.setattr(entrypoint, "beta_agent_toolset_20260401", lambda ctx: [Tool("bash"), Tool("grep")])
    bash, grep = observed_tools(object())  # type: ignore[arg-type]
    assert await grep.call({"pattern": "x"}) == "grep done"
    assert await bash.call({"command": "true"}) == "bash done"
    assert calls == [("grep", {"pattern": "x"}), ("bash", {"command": "true"})]
    assert [(e["event"], e["tool"]) for e in stdout_events] == [
        ("tool_start", "grep"), ("tool_end", "grep"), ("tool_start", "bash"), ("tool_end", "bash")]


def test_an_unreadable_stdout_never_breaks_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, data: bytes) -> int:
        raise BrokenPipeError

    monkeypatch.setattr("sandboxd.entrypoint.os.write", broken)
    entrypoint.emit(Event.HEARTBEAT)  # no exception


# --- non-dumpable ------------------------------------------------------------------------------------


def test_the_worker_makes_itself_non_dumpable() -> None:
    # In a child process: the test runner itself stays dumpable.
    script = textwrap.dedent("""
        import ctypes, json, os
        from sandboxd.entrypoint import make_non_dumpable
        libc = ctypes.CDLL(None, use_errno=True)
        before = libc.prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
        ok = make_non_dumpable()
        after = libc.prctl(3, 0, 0, 0, 0)
        print(json.dumps({"ok": ok, "before": before, "after": after,
                          "uid": os.getuid(), "environ_owner": os.stat("/proc/self/environ").st_uid}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True
    assert (result["before"], result["after"]) == (1, 0)
    if result["uid"] != 0:  # as root, /proc/self is root's either way
        assert result["environ_owner"] == 0
