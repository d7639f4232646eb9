"""A wait and a log follow that outlive an engine restart (DockerBackend.wait, .events) on a fake engine.

The engine "goes away" as dockerd 20.10 does on SIGTERM with live-restore: a pending wait ends with
a broken chunked response, a log follow ends cleanly or breaks, and `ping` fails until it is back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import docker.errors
import pytest
import requests

from sandboxd.containers import LogPosition, Sandbox
from sandboxd.errors import EngineError
from sandboxd.lifecycle import Lifecycle, LifecycleLimits
from sandboxd.metrics import Metrics
from tests.unit.fake_engine import FakeAPI, backend, engine_gone
from tests.unit.fakes import FakeBackend, eventually, record_for

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sandboxd.containers.RECONNECT_FIRST_SECONDS", 0.01)
    monkeypatch.setattr("sandboxd.containers.RECONNECT_MAX_SECONDS", 0.04)


def _assigned(deadline_in: float = 30.0) -> Sandbox:
    return Sandbox("c1", "sandboxd-test", "sha256:img", time.time(), record=record_for(1, deadline_in=deadline_in))


def _frame(second: int, nanos: int, text: str) -> bytes:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{nanos:09d}Z"
    return f"{stamp} {text}\n".encode()


async def _back_after(api: FakeAPI, seconds: float) -> None:
    await anyio.sleep(seconds)
    api.up = True


# --- wait ---------------------------------------------------------------------------------------------


async def test_a_wait_the_engine_broke_off_goes_on_once_it_answers() -> None:
    api = FakeAPI(up=False, wait_script=[engine_gone, lambda: {"StatusCode": 7}])
    engine = backend(api)
    api.containers["c1"] = {"HostConfig": {}}
    async with anyio.create_task_group() as tg:
        tg.start_soon(_back_after, api, 0.2)
        assert await engine.wait(_assigned()) == (7, False), "the exit status reached meanwhile"
    assert api.pings >= 2 and api.wait_script == []


async def test_a_container_the_restarted_engine_no_longer_has_is_not_waited_for() -> None:
    def gone() -> dict[str, object]:
        raise docker.errors.NotFound("No such container: c1")

    engine = backend(FakeAPI(wait_script=[engine_gone, gone]))
    with pytest.raises(docker.errors.NotFound):
        await engine.wait(_assigned())


async def test_the_engine_is_awaited_only_until_the_sessions_deadline() -> None:
    api = FakeAPI(up=False, wait_script=[engine_gone])
    began = time.monotonic()
    with pytest.raises(EngineError, match="before the session's deadline"):
        await backend(api).wait(_assigned(deadline_in=0.3))
    assert time.monotonic() - began < 1.0 and api.pings >= 2


async def test_a_pool_member_is_lost_with_the_engine_its_stdin_went_with() -> None:
    api = FakeAPI(wait_script=[engine_gone])
    unassigned = Sandbox("c1", "sandboxd-pooled", "sha256:img", time.time())
    with pytest.raises(EngineError, match="before the sandbox was assigned"):
        await backend(api).wait(unassigned)
    assert api.pings == 0


async def test_an_error_about_the_container_is_not_an_outage() -> None:
    def refused() -> dict[str, object]:
        raise docker.errors.APIError("409 Client Error: Conflict")

    api = FakeAPI(wait_script=[refused])
    with pytest.raises(docker.errors.APIError):
        await backend(api).wait(_assigned())
    assert api.pings == 0


# --- the stdout follow --------------------------------------------------------------------------------


async def _read(engine_events: object) -> list[bytes]:
    chunks = []
    with anyio.fail_after(5):
        async for chunk in engine_events:  # type: ignore[attr-defined]
            chunks.append(chunk)
    return chunks


async def test_the_follow_resumes_from_the_last_chunk_without_repeating_it() -> None:
    now = int(time.time()) - 60
    first, second, third = _frame(now, 1, "one"), _frame(now + 1, 5, "two"), _frame(now + 1, 9, "three")

    def broken() -> Iterator[bytes]:
        yield first
        yield second
        raise requests.exceptions.ChunkedEncodingError("Response ended prematurely")

    api = FakeAPI(up=False)

    def resumed() -> Iterator[bytes]:
        api.running = False  # and it exits after its third line
        yield second  # `since` is whole seconds: the engine sends `two` again
        yield third
        yield _frame(now + 2, 0, "four")

    api.logs_script = [broken, resumed]
    api.containers["c1"] = {"HostConfig": {}}
    engine = backend(api)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_back_after, api, 0.1)
        chunks = await _read(engine.events(_assigned()))
    assert chunks == [b"one\n", b"two\n", b"three\n", b"four\n"]
    assert [call.get("since") for call in api.logs_calls] == [None, now + 1]
    assert all(call["timestamps"] and call["follow"] for call in api.logs_calls)


async def test_a_stream_the_engine_ends_while_the_container_runs_is_opened_again() -> None:
    now = int(time.time()) - 60
    api = FakeAPI()
    api.containers["c1"] = {"HostConfig": {}}

    def cut() -> Iterator[bytes]:
        yield _frame(now, 1, "one")  # then a clean end: dockerd closed its log readers on the way down

    def rest() -> Iterator[bytes]:
        api.running = False
        yield _frame(now, 1, "one")
        yield _frame(now, 2, "two")

    api.logs_script = [cut, rest]
    assert await _read(backend(api).events(_assigned())) == [b"one\n", b"two\n"]


async def test_a_stream_that_ends_with_the_container_is_read_once() -> None:
    api = FakeAPI(running=False)
    api.containers["c1"] = {"HostConfig": {}}
    api.logs_script = [lambda: iter([_frame(100, 1, "only")])]
    assert await _read(backend(api).events(_assigned())) == [b"only\n"]
    assert len(api.logs_calls) == 1


async def test_a_pool_members_follow_ends_with_the_engine() -> None:
    def broken() -> Iterator[bytes]:
        yield _frame(100, 1, "ready")
        raise requests.ConnectionError("engine down")

    api = FakeAPI(logs_script=[broken])
    unassigned = Sandbox("c1", "sandboxd-pooled", "sha256:img", time.time())
    assert await _read(backend(api).events(unassigned)) == [b"ready\n"]
    assert len(api.logs_calls) == 1 and api.pings == 0


def test_the_position_skips_what_was_read_and_nothing_newer() -> None:
    position = LogPosition()
    assert position.since() is None
    assert position.after(b"2026-12-01T21:38:00.000000005Z a\n") == b"a\n"
    assert position.since() == 1796161080
    assert position.after(b"2026-12-01T21:38:00.000000001Z old\n") is None
    assert position.after(b"2026-12-01T21:38:00.000000005Z a\n") is None
    assert position.after(b"2026-12-01T21:38:00.000000006Z b\n") == b"b\n"
    # Once past, a clock stepping back does not hide lines.
    assert position.after(b"2026-12-01T21:37:59.000000000Z c\n") == b"c\n"
    garbled = LogPosition(last=b"not-a-time")
    assert garbled.since() is None and garbled.skipping  # read from the start, skipping by stamp


# --- the lifecycle's watches while the engine is away --------------------------------------------------


class _AwayBackend(FakeBackend):
    """The fake engine, away: no disk sizes, no answers."""

    async def workspace_bytes(self) -> dict[str, int] | None:  # type: ignore[override]
        await anyio.lowlevel.checkpoint()
        return None if self.engine_down else dict(self.disk)


async def test_neither_the_disk_watch_nor_the_stall_watch_stops_a_session_while_the_engine_is_away() -> None:
    backend, metrics = _AwayBackend(run_seconds=30), Metrics()
    limits = LifecycleLimits(stop_timeout_seconds=1, container_log_lines=5, workspace_max_bytes=1000,
                             disk_check_interval_seconds=0.01, stall_silence_seconds=0.05)
    lifecycle = Lifecycle(backend, metrics, limits)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(lifecycle.run)
        tracked = await lifecycle.acquire()
        await backend.assign(tracked.sandbox, record_for(1), b"{}\n")
        backend.engine_down = True
        backend.disk = {tracked.sandbox.name: 10**9}  # what it would measure
        await anyio.sleep(0.3)  # many disk rounds, six stall rounds
        assert not tracked.stop_requested.is_set() and not tracked.exited.is_set()
        assert metrics.disk_check_failures._value.get() > 0 and tracked.activity.stalled, "flagged, not stopped"
        backend.engine_down = False  # back: the watch measures again
        await eventually(tracked.stop_requested.is_set)
        tg.cancel_scope.cancel()
