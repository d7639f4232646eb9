"""The warm pool with the fake engine: full but never over, only live and current members, no create loop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import sandboxd.pool as pool_module
from sandboxd.errors import LaunchError
from sandboxd.lifecycle import Lifecycle, LifecycleLimits
from sandboxd.metrics import Metrics
from sandboxd.pool import WarmPool
from tests.unit.fakes import FakeBackend, eventually

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def _pool(backend: FakeBackend, *, size: int = 2, max_age_seconds: float = 300) -> AsyncIterator[
        tuple[WarmPool, Metrics, anyio.CancelScope]]:
    metrics = Metrics()
    lifecycle = Lifecycle(backend, metrics, LifecycleLimits(  # type: ignore[arg-type]
        stop_timeout_seconds=1, container_log_lines=0, workspace_max_bytes=1 << 30))
    pool = WarmPool(lifecycle, metrics, size=size, max_age_seconds=max_age_seconds)
    lifecycle.pool = pool
    async with anyio.create_task_group() as tg:
        await tg.start(lifecycle.run)
        pool_scope = anyio.CancelScope()

        async def run_pool(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            with pool_scope:
                await pool.run(task_status=task_status)

        await tg.start(run_pool)
        yield pool, metrics, pool_scope
        tg.cancel_scope.cancel()


def _ready(metrics: Metrics) -> float:
    return float(metrics.pool_ready._value.get())


async def test_the_pool_fills_to_its_size_and_no_further() -> None:
    backend = FakeBackend(create_seconds=0.01)
    async with _pool(backend, size=3) as (pool, metrics, _):
        await eventually(lambda: _ready(metrics) == 3)
        await anyio.sleep(0.1)
        assert backend.create_calls == 3 and len(backend.live) == 3 and backend.peak == 3
        assert metrics.pool_size._value.get() == 3
        assert metrics.pool_creations.labels("ok")._value.get() == 3


async def test_a_take_returns_a_ready_member_and_the_pool_refills() -> None:
    backend = FakeBackend(create_seconds=0.01)
    async with _pool(backend, size=2) as (pool, metrics, _):
        await eventually(lambda: _ready(metrics) == 2)
        member = pool.take()
        assert member is not None and member.activity.ready.is_set() and not member.exited.is_set()
        assert member.sandbox.record is None, "a member holds no work until it is assigned"
        assert _ready(metrics) == 1
        await eventually(lambda: _ready(metrics) == 2)
        assert backend.create_calls == 3
        assert member.sandbox.name not in {m.sandbox.name for m in pool._ready}


async def test_an_empty_pool_answers_at_once() -> None:
    backend = FakeBackend(create_seconds=10)
    async with _pool(backend, size=2) as (pool, _, _scope):
        assert pool.take() is None


async def test_an_exited_member_is_never_handed_out_and_is_replaced() -> None:
    backend = FakeBackend()
    async with _pool(backend, size=2) as (pool, metrics, _):
        await eventually(lambda: _ready(metrics) == 2)
        dead, alive = pool._ready[0], pool._ready[1]
        backend.crash(dead.sandbox)
        await eventually(dead.exited.is_set)
        assert pool.take() is alive
        again = pool.take()  # only the dead one is left, unless a refill already came
        assert again is None or (again is not dead and not again.exited.is_set())
        await eventually(lambda: dead.sandbox.name in backend.removed)
        await eventually(lambda: _ready(metrics) == 2)
        assert all(not m.exited.is_set() for m in pool._ready)


async def test_a_member_older_than_its_max_age_is_replaced() -> None:
    backend = FakeBackend()
    real_clock = backend.clock
    backend.clock = lambda: real_clock() - 301  # the first member is born old
    async with _pool(backend, size=1, max_age_seconds=300) as (pool, metrics, _):
        await eventually(lambda: backend.create_calls >= 1)
        backend.clock = real_clock
        old = backend.created[0]
        await eventually(lambda: old.name in backend.removed)
        await eventually(lambda: _ready(metrics) == 1)
        member = pool.take()
        assert member is not None and member.sandbox.name != old.name
        assert time.time() - member.sandbox.created_at < 300


async def test_members_of_a_stale_image_are_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "IMAGE_CHECK_SECONDS", 0.0)
    backend = FakeBackend(image="sha256:one")
    async with _pool(backend, size=2) as (pool, metrics, _):
        await eventually(lambda: _ready(metrics) == 2)
        old = {m.sandbox.name for m in pool._ready}
        backend.image = "sha256:two"  # the `image` tag was re-pointed
        await eventually(lambda: old <= set(backend.removed) and _ready(metrics) == 2)
        member = pool.take()
        assert member is not None and member.sandbox.image_id == "sha256:two"
        assert {m.sandbox.image_id for m in pool._ready} == {"sha256:two"}


class _Clock:
    """Stands in for the pool module's `anyio`: every sleep is recorded and returns at once."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(anyio, name)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await anyio.lowlevel.checkpoint()


async def test_create_failures_back_off_exponentially(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(pool_module, "anyio", clock)
    backend = FakeBackend(launch_error=LaunchError("image_missing", "no such image"))
    async with _pool(backend, size=2) as (pool, metrics, _):
        await eventually(lambda: backend.create_calls >= 9)
        backend.launch_error = None
        await eventually(lambda: _ready(metrics) == 2)
    assert clock.slept[:8] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backend.create_calls == len(clock.slept) + 2, "one failed create per back-off, then two that worked"
    assert metrics.pool_creations.labels("failed")._value.get() == len(clock.slept)


async def test_create_failures_do_not_loop_in_real_time() -> None:
    backend = FakeBackend(launch_error=LaunchError("engine_unavailable", "engine down"))
    async with _pool(backend, size=2) as (_, metrics, _scope):
        await anyio.sleep(0.5)
    assert backend.create_calls == 1, "the first failure waits a second before the next create"
    assert _ready(metrics) == 0


async def test_closing_the_pool_removes_every_member() -> None:
    backend = FakeBackend()
    async with _pool(backend, size=3) as (pool, metrics, scope):
        await eventually(lambda: _ready(metrics) == 3)
        members = {m.sandbox.name for m in pool._ready}
        scope.cancel()
        await eventually(lambda: members <= set(backend.removed))
        assert backend.live == set() and _ready(metrics) == 0 and pool.take() is None
