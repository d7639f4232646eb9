"""The daemon's claim loop and session supervision, with an in-memory queue and container backend."""

from __future__ import annotations

import logging
from functools import partial

import anyio
import pytest

from sandboxd.containers import AssignmentRecord, Sandbox
from sandboxd.daemon import Daemon, ExitStatus
from sandboxd.errors import LaunchError
from sandboxd.health import HealthState
from sandboxd.images import ImagePolicy
from sandboxd.lifecycle import Lifecycle, LifecycleLimits, Tracked
from sandboxd.metrics import Metrics
from sandboxd.notify import Notifier
from sandboxd.outcome import Outcome
from sandboxd.pool import WarmPool
from sandboxd.protocol import ExitCode
from sandboxd.session import Retention, SessionLimits, SessionSupervisor
from sandboxd.settlement import Settlement
from sandboxd.workspace import Workspaces
from tests.unit.fakes import FakeBackend, FakeQueue, eventually, record_for, work_item

pytestmark = pytest.mark.anyio


def _daemon(queue: FakeQueue, backend: FakeBackend, *, max_sessions: int = 2, max_session_seconds: float = 30,
            allow_key: bool = False, pool_size: int = 0, workspace_max_bytes: int = 1 << 30,
            disk_check_interval_seconds: float = 2.0, drain_timeout_seconds: float | None = None,
            retention: Retention | None = None, images: ImagePolicy | None = None) -> tuple[Daemon, Metrics]:
    """Wired as sandboxd.assembly.run_daemon wires it, with the fakes for queue and engine."""
    metrics = Metrics()
    lifecycle = Lifecycle(backend, metrics, LifecycleLimits(  # type: ignore[arg-type]
        stop_timeout_seconds=1, container_log_lines=5, workspace_max_bytes=workspace_max_bytes,
        disk_check_interval_seconds=disk_check_interval_seconds))
    pool = None
    if pool_size:
        pool = WarmPool(lifecycle, metrics, size=pool_size, max_age_seconds=300)
        lifecycle.pool = pool
    limits = SessionLimits(max_session_seconds, allow_environment_key_in_sandbox=allow_key)
    supervisor = SessionSupervisor(queue, lifecycle, Workspaces(), metrics, limits, "sk-env-key",  # type: ignore[arg-type]
                                   retention, images)
    daemon = Daemon(queue, supervisor, lifecycle, metrics, HealthState(poll_window_seconds=5),  # type: ignore[arg-type]
                    Notifier(None), max_sessions=max_sessions, shutdown_grace_seconds=1,
                    drain_timeout_seconds=drain_timeout_seconds, pool=pool)
    return daemon, metrics


class _StuckRestore:
    """Retention whose restore never returns: the session is caught while its workspace is delivered."""

    async def restore(self, session_id: str, sandbox: Sandbox) -> bool:
        await anyio.sleep_forever()
        return False  # pragma: no cover

    async def keep(self, tracked: Tracked, settlement: Settlement) -> None:
        pass


def _finished(metrics: Metrics, outcome: Outcome) -> float:
    return float(metrics.sessions_finished.labels(outcome.value)._value.get())


async def test_capacity_slot_is_taken_before_an_item_is_claimed() -> None:
    queue = FakeQueue(items=[work_item(n) for n in range(7)])
    backend = FakeBackend(run_seconds=0.05)
    daemon, metrics = _daemon(queue, backend, max_sessions=3)
    queue.running = lambda: daemon._running

    summary = await daemon.run(drain=True)

    assert summary.exit_code(drain=True) == ExitStatus.OK
    assert len(summary.results) == 7 and all(r.outcome is Outcome.SUCCEEDED for r in summary.results)
    assert backend.peak == 3
    assert max(queue.claimed_while) < 3, "an item was claimed while every slot was taken"
    assert _finished(metrics, Outcome.SUCCEEDED) == 7
    assert queue.stopped == [], "sandboxes stop their own items"


async def test_health_check_is_stopped_without_a_sandbox() -> None:
    queue = FakeQueue(items=[work_item(1, kind="healthcheck"), work_item(2)])
    backend = FakeBackend()
    daemon, metrics = _daemon(queue, backend)

    summary = await daemon.run(drain=True)

    assert queue.stopped == ["work_1"]
    assert backend.removed == ["work_2"]
    assert summary.healthchecks == 1 and len(summary.results) == 1
    assert metrics.work_items_claimed.labels("healthcheck")._value.get() == 1


async def test_launch_failure_stops_the_item_and_the_daemon_goes_on() -> None:
    queue = FakeQueue(items=[work_item(1), work_item(2)])
    backend = FakeBackend(launch_error=LaunchError("image_missing", "sandbox image 'x' not found"))
    daemon, metrics = _daemon(queue, backend)

    summary = await daemon.run(drain=True)

    assert queue.stopped == ["work_1", "work_2"]
    assert [r.outcome for r in summary.results] == [Outcome.LAUNCH_FAILED] * 2
    assert summary.exit_code(drain=True) == ExitStatus.SESSIONS_FAILED
    assert metrics.launch_errors.labels("image_missing")._value.get() == 2
    assert "launch_failed: 2" in summary.render()


async def test_item_without_secret_is_refused_before_any_sandbox() -> None:
    queue = FakeQueue(items=[work_item(1, secret=None)])
    backend = FakeBackend()
    daemon, _ = _daemon(queue, backend)

    summary = await daemon.run(drain=True)

    assert queue.stopped == ["work_1"] and backend.peak == 0
    assert summary.results[0].outcome is Outcome.FAILED
    assert "allow_environment_key_in_sandbox" in summary.results[0].reason


async def test_allowed_environment_key_is_handed_over_on_stdin_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    queue = FakeQueue(items=[work_item(1, secret=None)])
    backend = FakeBackend()
    daemon, _ = _daemon(queue, backend, allow_key=True)

    summary = await daemon.run(drain=True)

    assert summary.results[0].outcome is Outcome.SUCCEEDED
    assert b'"environment_key":"sk-env-key"' in backend.sent[0]
    assert [line for line in backend.sent if b"sk-env-key" in line] == [backend.sent[0]]
    record = backend.created[0].record
    assert record is not None and "sk-env-key" not in repr(record.labels())
    assert "sk-env-key" not in caplog.text


async def test_a_sessions_token_never_reaches_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    item = work_item(1)
    queue = FakeQueue(items=[item])
    backend = FakeBackend(exit_status=ExitCode.ERROR)  # a failing session logs the most
    daemon, _ = _daemon(queue, backend)

    await daemon.run(drain=True)

    assert str(item.secret).encode() in backend.sent[0], "the secret goes to the sandbox, on stdin"
    assert "tok_1" not in caplog.text and str(item.secret) not in caplog.text
    assert "work_1" in caplog.text


@pytest.mark.parametrize(
    ("status", "outcome", "daemon_stops"),
    [
        (ExitCode.SERVED, Outcome.SUCCEEDED, False),
        (ExitCode.LEASE_LOST, Outcome.LEASE_LOST, False),  # the item belongs to someone else now
        (ExitCode.HEARTBEAT_REJECTED, Outcome.FAILED, False),
        (ExitCode.FAILED, Outcome.FAILED, False),  # the worker raised after stopping its item
        (ExitCode.ABORTED, Outcome.WORKSPACE_FAILED, False),
        (ExitCode.CANCELLED, Outcome.CANCELLED, False),
        (ExitCode.ERROR, Outcome.FAILED, True),  # a crash: the item may still be held
        (137, Outcome.FAILED, True),  # SIGKILL/OOM: the sandbox could not stop its item
        (ExitCode.BAD_ASSIGNMENT, Outcome.FAILED, True),
    ],
)
async def test_exit_status_decides_outcome_and_who_stops_the_item(status: int, outcome: Outcome,
                                                                    daemon_stops: bool) -> None:
    queue = FakeQueue(items=[work_item(1)])
    daemon, _ = _daemon(queue, FakeBackend(exit_status=status))

    summary = await daemon.run(drain=True)

    assert summary.results[0].outcome is outcome
    assert queue.stopped == (["work_1"] if daemon_stops else [])


async def test_an_oom_killed_sandbox_is_reported_and_its_item_stopped_by_the_daemon() -> None:
    queue = FakeQueue(items=[work_item(1)])
    daemon, metrics = _daemon(queue, FakeBackend(exit_status=137, oom_killed=True))

    summary = await daemon.run(drain=True)

    assert summary.results[0].outcome is Outcome.OOM_KILLED and "memory" in summary.results[0].reason
    assert queue.stopped == ["work_1"]
    assert _finished(metrics, Outcome.OOM_KILLED) == 1


async def test_a_session_over_its_disk_limit_is_stopped() -> None:
    class FullDisk(FakeBackend):
        async def workspace_bytes(self) -> dict[str, int]:
            return {s.name: 2000 for s in self.created if s.record is not None}

    queue = FakeQueue(items=[work_item(1)])
    backend = FullDisk(run_seconds=10)
    daemon, metrics = _daemon(queue, backend, workspace_max_bytes=1000, disk_check_interval_seconds=0.02)

    summary = await daemon.run(drain=True)

    assert summary.results[0].outcome is Outcome.DISK_LIMIT and "workspace_max_bytes=1000" in summary.results[0].reason
    assert backend.stopped == ["work_1"] and backend.removed == ["work_1"]
    assert queue.stopped == [], "the sandbox's worker stopped its item on SIGTERM"
    assert metrics.disk_limit_stops._value.get() == 1


async def test_session_over_its_time_limit_is_stopped() -> None:
    queue = FakeQueue(items=[work_item(1)])
    backend = FakeBackend(run_seconds=10)
    daemon, metrics = _daemon(queue, backend, max_session_seconds=0.2)

    summary = await daemon.run(drain=True)

    assert summary.results[0].outcome is Outcome.TIMED_OUT
    assert backend.stopped == ["work_1"] and backend.removed == ["work_1"]
    assert _finished(metrics, Outcome.TIMED_OUT) == 1


async def test_drain_timeout_stops_sessions_and_reports_it() -> None:
    queue = FakeQueue(items=[work_item(1)])
    backend = FakeBackend(run_seconds=10)
    daemon, _ = _daemon(queue, backend, drain_timeout_seconds=0.3)

    summary = await daemon.run(drain=True)

    assert summary.drain_timed_out and summary.exit_code(drain=True) == ExitStatus.DRAIN_TIMEOUT
    assert [r.outcome for r in summary.results] == [Outcome.CANCELLED]
    assert backend.stopped == ["work_1"] and backend.removed == ["work_1"]


async def test_a_bug_while_serving_fails_that_item_only() -> None:
    class BuggyBackend(FakeBackend):
        async def assign(self, sandbox: Sandbox, record: AssignmentRecord, line: bytes) -> None:
            if record.item.work_id == "work_1":
                raise RuntimeError("a bug")
            await super().assign(sandbox, record, line)

    queue = FakeQueue(items=[work_item(1), work_item(2)])
    daemon, metrics = _daemon(queue, BuggyBackend())

    summary = await daemon.run(drain=True)

    assert [r.outcome for r in summary.results] == [Outcome.FAILED, Outcome.SUCCEEDED]
    assert "internal error" in summary.results[0].reason
    assert queue.stopped == ["work_1"], "the item the bug hit is stopped, not left to its lease"
    assert _finished(metrics, Outcome.FAILED) == 1


# --- adoption: what an earlier daemon of this instance left on the engine ---------------------------


async def test_a_running_adopted_sandbox_is_supervised_to_its_end_and_holds_a_slot() -> None:
    queue = FakeQueue(items=[work_item(1)])
    backend = FakeBackend()
    left = backend.leave(record_for(9), running=True, run_seconds=0.2)
    daemon, metrics = _daemon(queue, backend, max_sessions=1)
    queue.running = lambda: daemon._running

    summary = await daemon.run(drain=True)

    assert [(r.work_id, r.outcome) for r in summary.results] == [("work_9", Outcome.SUCCEEDED),
                                                                  ("work_1", Outcome.SUCCEEDED)]
    assert summary.adopted == 1 and metrics.sessions_adopted._value.get() == 1
    assert queue.claimed_while == [0], "an item was claimed while the adopted session held the only slot"
    assert backend.peak == 1
    assert backend.label(left) in backend.removed and backend.live == set()
    assert queue.stopped == [], "the adopted sandbox stopped its own item"
    # The replayed tool call (before the adoption) was counted by the earlier daemon, not again.
    assert metrics.tool_calls.labels("bash", "ok")._value.get() == 0


@pytest.mark.parametrize(
    ("status", "oom", "outcome", "daemon_stops"),
    [
        (ExitCode.SERVED, False, Outcome.SUCCEEDED, False),
        (ExitCode.LEASE_LOST, False, Outcome.LEASE_LOST, False),
        (ExitCode.CANCELLED, False, Outcome.CANCELLED, False),
        (ExitCode.ERROR, False, Outcome.FAILED, True),
        (137, False, Outcome.FAILED, True),
        (137, True, Outcome.OOM_KILLED, True),
    ],
)
@pytest.mark.parametrize("running", [True, False], ids=["running", "exited"])
async def test_an_adopted_sandbox_is_settled_by_its_exit_status(status: int, oom: bool, outcome: Outcome,
                                                                 daemon_stops: bool, running: bool) -> None:
    queue = FakeQueue()
    backend = FakeBackend(oom_killed=oom)
    left = backend.leave(record_for(9), running=running, exit_status=status, oom_killed=oom)
    daemon, _ = _daemon(queue, backend)

    summary = await daemon.run(drain=True)

    assert [(r.work_id, r.outcome) for r in summary.results] == [("work_9", outcome)]
    assert queue.stopped == (["work_9"] if daemon_stops else [])
    assert backend.removed == [backend.label(left)] and backend.stopped == []


async def test_unassigned_sandboxes_are_removed_at_start() -> None:
    queue = FakeQueue()
    backend = FakeBackend()
    pooled = backend.leave(None, running=True)  # a pool member of the earlier run
    never_assigned = backend.leave(None, running=False, exit_status=143)
    daemon, _ = _daemon(queue, backend)

    summary = await daemon.run(drain=True)

    assert sorted(backend.removed) == sorted([pooled.name, never_assigned.name])
    assert summary.adopted == 0 and summary.results == []
    assert queue.stopped == [] and backend.stopped == [] and backend.live == set()


async def test_an_assignment_whose_container_vanished_is_removed_and_its_item_stopped() -> None:
    queue = FakeQueue()
    backend = FakeBackend()
    # The record volume survived, the container did not (removed by hand while no daemon ran):
    # no worker is left to stop the item, so the daemon must (a second stop is a harmless 409).
    vanished = backend.leave(record_for(8), running=False, container_id="")
    daemon, _ = _daemon(queue, backend)

    await daemon.run(drain=True)

    assert backend.removed == [backend.label(vanished)] and backend.live == set()
    assert queue.stopped == ["work_8"], "an item whose sandbox vanished is stopped by the daemon"


async def test_a_hand_off_leaves_running_sandboxes_and_their_items_alone() -> None:
    queue = FakeQueue(items=[work_item(1)])
    backend = FakeBackend(run_seconds=30)
    left = backend.leave(record_for(9), running=True, run_seconds=30)
    daemon, metrics = _daemon(queue, backend)
    ready_line = b'{"type":"workspace_ready"}\n'

    async with anyio.create_task_group() as tg:
        async def run() -> None:
            daemon.summary = await daemon.run(drain=False)

        tg.start_soon(run)
        await eventually(lambda: daemon._running == 2 and ready_line in backend.sent)
        daemon._hand_off("SIGUSR2", reexec=False)

    summary = daemon.summary
    assert summary.handed_off and not summary.reexec
    assert sorted(r.work_id for r in summary.results) == ["work_1", "work_9"]
    assert {r.outcome for r in summary.results} == {Outcome.HANDED_OFF}
    assert backend.stopped == [] and backend.removed == [], "a handed-off sandbox is the next daemon's"
    assert queue.stopped == [], "its worker still holds the lease"
    assert len(backend.live) == 2 and not backend.exited(left)
    assert _finished(metrics, Outcome.HANDED_OFF) == 2
    assert summary.exit_code(drain=False) == ExitStatus.OK


async def test_a_daemon_with_a_warm_pool_leaves_nothing_behind() -> None:
    queue = FakeQueue(items=[work_item(n) for n in range(3)])
    backend = FakeBackend()
    daemon, metrics = _daemon(queue, backend, max_sessions=1, pool_size=1)

    summary = await daemon.run(drain=True)

    assert [r.outcome for r in summary.results] == [Outcome.SUCCEEDED] * 3
    hits = metrics.pool_acquisitions.labels("hit")._value.get()
    assert hits + metrics.pool_acquisitions.labels("miss")._value.get() == 3
    assert backend.live == set(), "pool members and session sandboxes are all removed"
    assert queue.stopped == []


# --- every path retires its sandbox ---------------------------------------------------------------


async def test_a_bug_while_serving_leaves_no_sandbox_behind() -> None:
    class BuggyBackend(FakeBackend):
        async def assign(self, sandbox: Sandbox, record: AssignmentRecord, line: bytes) -> None:
            raise RuntimeError("a bug")

    queue = FakeQueue(items=[work_item(1)])
    backend = BuggyBackend()
    daemon, _ = _daemon(queue, backend)

    summary = await daemon.run(drain=True)

    assert summary.results[0].outcome is Outcome.FAILED and queue.stopped == ["work_1"]
    assert backend.live == set(), "the sandbox the bug hit is removed, not left running on the engine"


@pytest.mark.parametrize(("stop_status", "daemon_stops"), [(ExitCode.CANCELLED, False), (137, True)])
async def test_a_shutdown_while_the_workspace_is_delivered_stops_the_sandbox_and_settles_by_its_exit(
        stop_status: int, daemon_stops: bool) -> None:
    queue = FakeQueue(items=[work_item(1)])
    # 137: SIGKILLed after the stop timeout, so its worker never stopped the item.
    backend = FakeBackend(run_seconds=30, stop_status=stop_status)
    daemon, _ = _daemon(queue, backend, drain_timeout_seconds=0.3, retention=_StuckRestore())

    summary = await daemon.run(drain=True)

    assert summary.drain_timed_out and [r.outcome for r in summary.results] == [Outcome.CANCELLED]
    assert backend.stopped == ["work_1"], "the sandbox's worker must be told to stop its item"
    assert backend.removed == ["work_1"] and backend.live == set()
    assert queue.stopped == (["work_1"] if daemon_stops else []), "the exit status decides, as at a session's end"


async def test_an_adopted_sandbox_that_already_exited_is_not_reported_as_timed_out() -> None:
    queue = FakeQueue()
    backend = FakeBackend()
    # The earlier daemon went away; the session finished (exit 0) and its deadline passed since.
    backend.leave(record_for(9, deadline_in=-1), running=False, exit_status=ExitCode.SERVED)
    daemon, _ = _daemon(queue, backend)

    summary = await daemon.run(drain=True)

    assert [r.outcome for r in summary.results] == [Outcome.SUCCEEDED]
    assert queue.stopped == [] and backend.stopped == []


async def test_a_cold_sandbox_is_not_counted_as_a_pool_hit_in_the_heartbeat_histogram() -> None:
    class SlowQueue(FakeQueue):
        async def session_metadata(self, item: object) -> dict[str, str]:
            await anyio.sleep(0.1)  # the cold sandbox reports `ready` meanwhile
            return {}

    queue = SlowQueue(items=[work_item(1)])
    daemon, metrics = _daemon(queue, FakeBackend())

    await daemon.run(drain=True)

    assert metrics.pool_acquisitions.labels("hit")._value.get() == 0
    def observed(source: str) -> float | None:
        return metrics.registry.get_sample_value("sandboxd_claim_to_first_heartbeat_seconds_count",
                                                 {"source": source})

    assert (observed("cold"), observed("pool")) == (1, 0), "a cold start observed under source=pool"


async def test_nothing_is_claimed_while_the_engine_is_down() -> None:
    queue = FakeQueue(items=[work_item(1)])
    backend = FakeBackend(run_seconds=0.05)
    backend.engine_down = True
    daemon, metrics = _daemon(queue, backend)
    queue.running = lambda: daemon._running
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(daemon.run, drain=True))
        await anyio.sleep(0.5)
        assert queue.claimed_while == [], "an item was claimed while the engine was down"
        backend.engine_down = False
    assert [r.outcome for r in daemon.summary.results] == [Outcome.SUCCEEDED]
