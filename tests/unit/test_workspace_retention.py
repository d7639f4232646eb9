"""Retention around the store (issue 18): saves and restores have limiters of their own, a failed save
drops the previous snapshot rather than roll the session back to it, and a snapshot the engine refuses
is discarded once and the session fetched afresh."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, cast

import anyio
import docker.errors
import pytest
import requests

from sandboxd.errors import EngineError, WorkspaceError
from sandboxd.lifecycle import Tracked
from sandboxd.metrics import Metrics
from sandboxd.outcome import Outcome
from sandboxd.retention import SAVE_THREADS, WorkspaceRetention
from sandboxd.sandbox import AssignmentRecord, Sandbox
from sandboxd.settlement import ItemRef, Settlement
from sandboxd.workspace.store import RestoreResult, WorkspaceStore

pytestmark = pytest.mark.anyio


def workspace(*files: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo("workspace")
        root.type = tarfile.DIRTYPE
        tar.addfile(root)
        for name, data in files:
            member = tarfile.TarInfo(f"workspace/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


class Engine:
    """The two calls retention makes of the backend: get_archive's stream, and put_archive."""

    def __init__(self) -> None:
        self.streams: dict[str, Callable[[], Iterator[bytes]]] = {}
        self.delivered: dict[str, bytes] = {}
        self.refusal: EngineError | None = None

    async def put_workspace(self, sandbox: Sandbox, archive: IO[bytes]) -> None:
        await anyio.lowlevel.checkpoint()
        if self.refusal is not None:
            raise self.refusal
        self.delivered[sandbox.name] = archive.read()

    def workspace_stream(self, sandbox: Sandbox) -> Iterator[bytes]:
        return self.streams[sandbox.name]()


class Queue:
    async def session_status(self, session_id: str) -> str | None:
        return None


def sandbox(name: str, session_id: str) -> Sandbox:
    record = AssignmentRecord(ItemRef(f"work_{name}", "env_test", session_id), time.time(), time.time() + 3600)
    return Sandbox(container_id=f"ctr_{name}", name=name, record=record)


def finished(box: Sandbox) -> Tracked:
    return Tracked(sandbox=box, workspace_ready=True)


SERVED = cast(Settlement, SimpleNamespace(outcome=Outcome.SUCCEEDED))  # all keep() reads of a settlement


@pytest.fixture
def store(tmp_path: Path) -> WorkspaceStore:
    return WorkspaceStore(tmp_path / "store", max_bytes=10 << 20, store_max_bytes=1 << 30, retention_seconds=86400,
                          uid=10001, gid=10001, max_members=1000, spool_dir=tmp_path)


def retention_of(store: WorkspaceStore, engine: Engine) -> tuple[WorkspaceRetention, Metrics]:
    metrics = Metrics()
    return WorkspaceRetention(store, engine, Queue(), metrics), metrics  # type: ignore[arg-type]


def result(store: WorkspaceStore, session_id: str) -> RestoreResult:
    with store.restore(session_id) as restored:
        return restored.result


def restores(metrics: Metrics, result: str) -> float:
    return float(metrics.workspace_restores.labels(result)._value.get())


async def test_saves_in_flight_never_hold_another_sessions_restore(store: WorkspaceStore) -> None:
    engine = Engine()
    retention, metrics = retention_of(store, engine)
    store.save("sesn_ready", [workspace(("kept", b"yes"))])
    release = threading.Event()
    started = threading.Semaphore(0)

    def stuck() -> Iterator[bytes]:  # an engine stream that hangs (until the test ends)
        started.release()
        release.wait(30)
        yield workspace(("late", b""))

    hostile = [sandbox(f"hostile{i}", f"sesn_hostile{i}") for i in range(SAVE_THREADS + 2)]
    for box in hostile:
        engine.streams[box.name] = stuck
    try:
        async with anyio.create_task_group() as tg:
            for box in hostile:
                tg.start_soon(retention.keep, finished(box), SERVED)
            for _ in range(SAVE_THREADS):  # every save thread is taken
                await anyio.to_thread.run_sync(started.acquire)
            with anyio.fail_after(10):
                assert await retention.restore("sesn_ready", sandbox("next", "sesn_ready"))
            release.set()
    finally:
        release.set()
    assert b"yes" in engine.delivered["next"] and restores(metrics, "hit") == 1
    assert all(result(store, f"sesn_hostile{i}") is RestoreResult.HIT for i in range(len(hostile)))


async def test_a_failed_save_deletes_the_previous_snapshot(
        store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine()
    retention, metrics = retention_of(store, engine)
    store.save("sesn_a", [workspace(("old", b"turn 1"))])
    box = sandbox("second", "sesn_a")
    engine.streams[box.name] = lambda: iter([workspace(*((f"f{i}", b"") for i in range(2000)))])  # max_members 1000
    await retention.keep(finished(box), SERVED)
    assert result(store, "sesn_a") is RestoreResult.MISS  # not the stale turn-1 workspace
    assert metrics.workspace_saves.labels("failed")._value.get() == 1
    assert "workspace_save_failed session_id=sesn_a reason=too_many_members" in caplog.text
    assert "the previous snapshot is deleted (files=2)" in caplog.text


async def test_an_engine_stream_that_breaks_is_a_failed_save(
        store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine()
    retention, _ = retention_of(store, engine)
    store.save("sesn_a", [workspace(("old", b"turn 1"))])
    box = sandbox("second", "sesn_a")

    def broken() -> Iterator[bytes]:
        yield workspace(("new", b"x"))[:1024]
        raise requests.ConnectionError("engine went away " + "x" * 10_000)

    engine.streams[box.name] = broken
    await retention.keep(finished(box), SERVED)
    assert result(store, "sesn_a") is RestoreResult.MISS
    line = next(r.getMessage() for r in caplog.records if "workspace_save_failed" in r.getMessage())
    assert "reason=source_failed" in line and len(line) < 700  # the error text is cut short


def api_error(status: int, explanation: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    kind = docker.errors.NotFound if status == 404 else docker.errors.APIError
    return kind(f"{status} Server Error", response=response, explanation=explanation)


async def test_a_snapshot_the_engine_refuses_is_discarded_and_the_item_fetches_afresh(
        store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine()
    retention, metrics = retention_of(store, engine)
    store.save("sesn_a", [workspace(("old", b"turn 1"))])
    refusal = api_error(500, 'Error processing tar file(exit status 1): invalid symlink "/workspace/up" -> "../../etc"')
    try:
        raise EngineError(f"put_archive failed: {refusal}") from refusal
    except EngineError as exc:
        engine.refusal = exc
    second = sandbox("second", "sesn_a")
    assert await retention.restore("sesn_a", second) is False
    assert result(store, "sesn_a") is RestoreResult.MISS  # deleted: the next item does not try it again
    await retention.keep(Tracked(sandbox=second), SERVED)  # its fetch failed too, say: nothing to keep
    assert restores(metrics, "discarded") == 1 and restores(metrics, "hit") == 0
    assert "workspace_restore result=discarded session_id=sesn_a reason=engine_refused files=2" in caplog.text
    assert await retention.restore("sesn_a", sandbox("third", "sesn_a")) is False  # once: now a plain miss
    assert restores(metrics, "miss") == 1 and restores(metrics, "discarded") == 1


@pytest.mark.parametrize("cause", [api_error(404, "No such container"), requests.ConnectionError("refused")],
                         ids=["container-gone", "engine-unreachable"])
async def test_a_restore_that_fails_for_the_sandboxs_sake_keeps_the_snapshot(
        store: WorkspaceStore, cause: Exception) -> None:
    engine = Engine()
    retention, metrics = retention_of(store, engine)
    store.save("sesn_a", [workspace(("old", b"turn 1"))])
    try:
        raise EngineError(f"put_archive failed: {cause}") from cause
    except EngineError as exc:
        engine.refusal = exc
    with pytest.raises(WorkspaceError) as caught:
        await retention.restore("sesn_a", sandbox("second", "sesn_a"))
    assert caught.value.reason == "delivery_failed"
    assert result(store, "sesn_a") is RestoreResult.HIT and restores(metrics, "discarded") == 0


async def test_a_restore_waits_for_its_own_sessions_save(store: WorkspaceStore) -> None:
    engine = Engine()
    retention, _ = retention_of(store, engine)
    first, second = sandbox("first", "sesn_a"), sandbox("second", "sesn_a")
    assert await retention.restore("sesn_a", first) is False
    gate = threading.Event()

    def slow() -> Iterator[bytes]:
        gate.wait(10)
        yield workspace(("from-first", b"1"))

    def open_gate_later() -> None:
        time.sleep(0.3)
        gate.set()

    engine.streams[first.name] = slow
    async with anyio.create_task_group() as tg:
        tg.start_soon(retention.keep, finished(first), SERVED)
        await anyio.sleep(0.1)
        tg.start_soon(anyio.to_thread.run_sync, open_gate_later)
        with anyio.fail_after(10):
            assert await retention.restore("sesn_a", second)
    assert b"from-first" in engine.delivered["second"]


def test_the_discarded_result_is_a_metric_series_from_the_start() -> None:
    assert restores(Metrics(), "discarded") == 0 and RestoreResult.DISCARDED.value == "discarded"
