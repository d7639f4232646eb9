"""The lifecycle's view of a sandbox: its events (Activity), stalls and the disk limit, with the fake engine."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from sandboxd.errors import LaunchError
from sandboxd.lifecycle import Activity, Lifecycle, LifecycleLimits, Tracked
from sandboxd.metrics import Metrics
from sandboxd.protocol import Event, SandboxEvent, parse_event
from tests.unit.fakes import FakeBackend, eventually, record_for

pytestmark = pytest.mark.anyio


def _limits(**overrides: float) -> LifecycleLimits:
    values: dict[str, float] = {"stop_timeout_seconds": 1, "container_log_lines": 5, "workspace_max_bytes": 1000}
    values.update(overrides)
    return LifecycleLimits(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def _running(backend: FakeBackend, metrics: Metrics, **limits: float) -> AsyncIterator[Lifecycle]:
    lifecycle = Lifecycle(backend, metrics, _limits(**limits))  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(lifecycle.run)
        yield lifecycle
        tg.cancel_scope.cancel()


def _event(kind: Event, at: float, **fields: object) -> SandboxEvent:
    event = parse_event(json.dumps({"event": kind.value, "t": at, **fields}).encode())
    assert isinstance(event, SandboxEvent)
    return event


def _count(metrics: Metrics, tool: str, outcome: str) -> float:
    return float(metrics.tool_calls.labels(tool, outcome)._value.get())


def _observed(metrics: Metrics, tool: str) -> tuple[float, float]:
    """(count, sum) of the tool-duration histogram."""
    child = metrics.tool_duration.labels(tool)
    count = sum(bucket.get() for bucket in child._buckets)
    return count, child._sum.get()


# --- Activity.feed ---------------------------------------------------------------------------------


async def test_ready_and_the_first_heartbeat_are_remembered() -> None:
    activity, now = Activity(), time.time()
    activity.feed(_event(Event.READY, now), None)
    assert activity.ready.is_set() and not activity.heartbeat.is_set()
    activity.feed(_event(Event.HEARTBEAT, now + 1, first=True), None)
    activity.feed(_event(Event.HEARTBEAT, now + 2), None)
    assert activity.heartbeat.is_set() and activity.first_heartbeat == now + 1
    assert activity.last_event == now + 2
    activity.feed(_event(Event.HEARTBEAT, now - 5), None)  # a late line never moves time backwards
    assert activity.last_event == now + 2


async def test_tool_calls_are_counted_and_timed_by_tool_and_outcome() -> None:
    activity, metrics, now = Activity(), Metrics(), time.time()
    activity.feed(_event(Event.TOOL_START, now, tool="bash"), metrics)
    assert (activity.tool, activity.tool_started) == ("bash", now)
    activity.feed(_event(Event.TOOL_END, now + 2, tool="bash", outcome="ok", seconds=2.0), metrics)
    assert activity.tool is None and activity.tool_started is None
    activity.feed(_event(Event.TOOL_END, now + 3, tool="bash", outcome="error", seconds=0.5), metrics)
    activity.feed(_event(Event.TOOL_END, now + 4, tool="mcp__jira__search", outcome="weird", seconds=1), metrics)
    activity.feed(_event(Event.TOOL_END, now + 5, tool="read", outcome="ok"), metrics)  # no duration given

    assert (_count(metrics, "bash", "ok"), _count(metrics, "bash", "error")) == (1, 1)
    assert _count(metrics, "other", "error") == 1, "unknown tools and outcomes map onto bounded labels"
    assert _count(metrics, "read", "ok") == 1
    assert _observed(metrics, "bash") == (2, 2.5)
    assert _observed(metrics, "other") == (1, 1)
    assert _observed(metrics, "read") == (0, 0)


async def test_replayed_events_of_an_adopted_sandbox_are_not_counted_again() -> None:
    backend, metrics = FakeBackend(), Metrics()
    left = backend.leave(record_for(9), running=True, run_seconds=30)  # replays a bash call from before
    async with _running(backend, metrics) as lifecycle:
        tracked = await lifecycle.adopt(left, None)
        await eventually(tracked.activity.heartbeat.is_set)
        await anyio.sleep(0.01)
        assert _count(metrics, "bash", "ok") == 0
        backend.emit(left, Event.TOOL_END, tool="bash", outcome="ok", seconds=0.25)
        await eventually(lambda: _count(metrics, "bash", "ok") == 1)
        assert _observed(metrics, "bash") == (1, 0.25)
        assert tracked.activity.ready.is_set() and tracked.activity.first_heartbeat is not None


async def test_claim_to_first_heartbeat_is_observed_once_with_its_source() -> None:
    backend, metrics = FakeBackend(run_seconds=30), Metrics()
    async with _running(backend, metrics) as lifecycle:
        tracked = await lifecycle.acquire()
        claimed = time.time()
        await backend.assign(tracked.sandbox, record_for(1), b"{}\n")
        tracked.claimed("cold", claimed, metrics)
        await eventually(tracked.activity.heartbeat.is_set)
        tracked.observe_first_heartbeat()
        histogram = metrics.claim_to_first_heartbeat.labels("cold")
        assert sum(b.get() for b in histogram._buckets) == 1
        assert 0 <= histogram._sum.get() < 1


# --- stalls ------------------------------------------------------------------------------------------


def _tracked(activity: Activity) -> Tracked:
    backend = FakeBackend()
    sandbox = backend.leave(record_for(1))
    return Tracked(sandbox, activity=activity)


def test_a_long_tool_call_is_a_stall_and_its_end_un_stalls() -> None:
    lifecycle = Lifecycle(FakeBackend(), Metrics(), _limits(stall_tool_seconds=60, stall_silence_seconds=300))  # type: ignore[arg-type]
    now = time.time()
    tracked = _tracked(Activity(last_event=now))
    tracked.activity.feed(_event(Event.TOOL_START, now - 61, tool="bash"), None)
    tracked.activity.last_event = now - 1  # heartbeats keep coming: only the tool call is long
    lifecycle._check_stall(tracked, now)
    assert "tool call bash" in tracked.activity.stalled
    tracked.activity.feed(_event(Event.TOOL_END, now, tool="bash", outcome="ok", seconds=61), None)
    lifecycle._check_stall(tracked, now + 1)
    assert tracked.activity.stalled == ""


def test_silence_is_a_stall_and_the_next_event_un_stalls() -> None:
    lifecycle = Lifecycle(FakeBackend(), Metrics(), _limits(stall_tool_seconds=60, stall_silence_seconds=30))  # type: ignore[arg-type]
    now = time.time()
    tracked = _tracked(Activity(last_event=now - 29))
    lifecycle._check_stall(tracked, now)
    assert tracked.activity.stalled == "", "within the silence allowance"
    lifecycle._check_stall(tracked, now + 2)
    assert "no event" in tracked.activity.stalled
    tracked.activity.feed(_event(Event.HEARTBEAT, now + 2), None)
    lifecycle._check_stall(tracked, now + 3)
    assert tracked.activity.stalled == ""


def test_a_short_tool_call_is_no_stall() -> None:
    lifecycle = Lifecycle(FakeBackend(), Metrics(), _limits(stall_tool_seconds=60, stall_silence_seconds=30))  # type: ignore[arg-type]
    now = time.time()
    tracked = _tracked(Activity(last_event=now))
    tracked.activity.feed(_event(Event.TOOL_START, now - 59, tool="bash"), None)
    tracked.activity.last_event = now
    lifecycle._check_stall(tracked, now)
    assert tracked.activity.stalled == ""


async def test_time_a_member_waited_in_the_pool_is_not_silence_of_its_session() -> None:
    backend, metrics = FakeBackend(run_seconds=30), Metrics()
    limits = {"stall_silence_seconds": 300, "stall_tool_seconds": 900}
    async with _running(backend, metrics, **limits) as lifecycle:
        tracked = await lifecycle.acquire()
        await eventually(tracked.activity.ready.is_set)
        later = time.time() + 400  # the member waited in the pool for longer than the silence allowance
        tracked.sandbox.record = record_for(1)  # assigned at `later`; its first heartbeat is on its way
        tracked.claimed("pool", later, metrics)
        lifecycle._check_stall(tracked, later + 0.5)
        assert tracked.activity.stalled == "", "a session assigned half a second ago is not stalled"


async def test_the_stall_watch_reports_the_count_and_clears_it() -> None:
    backend, metrics = FakeBackend(run_seconds=30), Metrics()
    counts: list[int] = []
    async with _running(backend, metrics, stall_silence_seconds=0.2, stall_tool_seconds=60) as lifecycle:
        lifecycle.on_stalled = counts.append
        tracked = await lifecycle.acquire()
        await backend.assign(tracked.sandbox, record_for(1), b"{}\n")
        await eventually(lambda: bool(counts) and counts[-1] == 1)
        assert metrics.sessions_stalled._value.get() == 1 and tracked.activity.stalled
        backend.emit(tracked.sandbox, Event.HEARTBEAT)
        await eventually(lambda: counts[-1] == 0)
        assert tracked.activity.stalled == ""


# --- the disk limit ----------------------------------------------------------------------------------


async def test_only_an_assigned_sandbox_over_the_workspace_limit_is_asked_to_stop() -> None:
    backend, metrics = FakeBackend(run_seconds=30), Metrics()
    async with _running(backend, metrics, workspace_max_bytes=1000, disk_check_interval_seconds=0.01) as lifecycle:
        over, under, unknown, pooled = [await lifecycle.acquire() for _ in range(4)]
        for n, tracked in enumerate((over, under, unknown), start=1):
            await backend.assign(tracked.sandbox, record_for(n), b"{}\n")
        backend.disk = {over.sandbox.name: 1001, under.sandbox.name: 1000, pooled.sandbox.name: 10**9}
        await eventually(over.stop_requested.is_set)
        await anyio.sleep(0.05)  # a few more checks: one stop request, counted once

        assert "workspace_max_bytes=1000" in over.stop_reason and "1001" in over.stop_reason
        assert not any(t.stop_requested.is_set() for t in (under, unknown, pooled))
        assert metrics.disk_limit_stops._value.get() == 1
        assert backend.stopped == [], "the session decides how to stop; the watcher only asks"


async def test_stop_and_wait_and_retire() -> None:
    backend, metrics = FakeBackend(run_seconds=30), Metrics()
    async with _running(backend, metrics) as lifecycle:
        tracked = await lifecycle.acquire()
        await backend.assign(tracked.sandbox, record_for(1), b"{}\n")
        assert lifecycle.assigned() == [tracked]
        assert await lifecycle.stop_and_wait(tracked)
        assert backend.stopped == ["work_1"] and tracked.exited.is_set() and lifecycle.assigned() == []
        await lifecycle.retire(tracked, verbose=True)
        assert backend.removed == ["work_1"] and backend.live == set()


async def test_a_removal_the_engine_could_not_take_is_retried_until_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sandboxd.lifecycle.REMOVAL_RETRY_SECONDS", 0.05)
    backend, metrics = FakeBackend(run_seconds=30), Metrics()
    async with _running(backend, metrics) as lifecycle:
        tracked = await lifecycle.acquire()
        backend.engine_down = True  # dockerd restarting
        await lifecycle.remove(tracked)
        assert backend.label(tracked.sandbox) not in backend.removed
        await anyio.sleep(0.2)
        assert backend.label(tracked.sandbox) not in backend.removed, "still down: nothing removed yet"
        backend.engine_down = False
        await eventually(lambda: backend.label(tracked.sandbox) in backend.removed)


async def test_a_sandbox_claimed_as_the_engine_went_away_is_created_once_it_is_back() -> None:
    backend, metrics = FakeBackend(), Metrics()
    backend.launch_error = LaunchError("engine_unavailable", "the engine went away")
    answers = iter([False, False, True])

    async def ping() -> bool:
        if next(answers, True):
            backend.launch_error = None  # back, and taking creations again
            return True
        return False

    backend.ping = ping  # type: ignore[method-assign]
    async with _running(backend, metrics) as lifecycle:
        tracked = await lifecycle.acquire()
    assert tracked.sandbox.container_id and backend.create_calls == 2


async def test_other_launch_errors_are_not_retried() -> None:
    backend, metrics = FakeBackend(), Metrics()
    backend.launch_error = LaunchError("image_missing", "no such image")
    async with _running(backend, metrics) as lifecycle:
        with pytest.raises(LaunchError):
            await lifecycle.acquire()
    assert backend.create_calls == 1
