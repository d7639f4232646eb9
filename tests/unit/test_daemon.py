"""The daemon's claim loop and session supervision, with an in-memory queue and container backend."""

from __future__ import annotations

import pytest

from sandboxd.daemon import Daemon, ExitStatus
from sandboxd.errors import LaunchError
from sandboxd.health import HealthState
from sandboxd.metrics import Metrics
from sandboxd.notify import Notifier
from sandboxd.outcome import Outcome
from sandboxd.protocol import ExitCode
from sandboxd.session import SessionLimits, SessionSupervisor
from sandboxd.workspace import Workspaces
from tests.unit.fakes import FakeBackend, FakeQueue, work_item

pytestmark = pytest.mark.anyio


def _daemon(queue: FakeQueue, backend: FakeBackend, *, max_sessions: int = 2, max_session_seconds: float = 30,
            allow_key: bool = False) -> tuple[Daemon, Metrics]:
    metrics = Metrics()
    limits = SessionLimits(max_session_seconds, stop_timeout_seconds=1, container_log_lines=5,
                           allow_environment_key_in_sandbox=allow_key)
    supervisor = SessionSupervisor(queue, backend, Workspaces(), metrics, limits, "sk-env-key")  # type: ignore[arg-type]
    daemon = Daemon(queue, supervisor, backend, metrics, HealthState(poll_window_seconds=5),  # type: ignore[arg-type]
                    Notifier(None), max_sessions=max_sessions, shutdown_grace_seconds=1)
    return daemon, metrics


def _finished(metrics: Metrics, outcome: Outcome) -> float:
    return metrics.sessions_finished.labels(outcome.value)._value.get()


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


async def test_allowed_environment_key_is_handed_over_on_stdin_only() -> None:
    queue = FakeQueue(items=[work_item(1, secret=None)])
    backend = FakeBackend()
    daemon, _ = _daemon(queue, backend, allow_key=True)

    summary = await daemon.run(drain=True)

    assert summary.results[0].outcome is Outcome.SUCCEEDED
    assert b'"environment_key":"sk-env-key"' in backend.sent[0]


@pytest.mark.parametrize(
    ("status", "outcome", "daemon_stops"),
    [
        (ExitCode.SERVED, Outcome.SUCCEEDED, False),
        (ExitCode.LEASE_LOST, Outcome.LEASE_LOST, False),  # the item belongs to someone else now
        (ExitCode.HEARTBEAT_REJECTED, Outcome.FAILED, False),
        (ExitCode.FAILED, Outcome.FAILED, False),  # the worker raised after stopping its item
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
    daemon, _ = _daemon(queue, backend)
    daemon._drain_timeout = 0.3

    summary = await daemon.run(drain=True)

    assert summary.drain_timed_out and summary.exit_code(drain=True) == ExitStatus.DRAIN_TIMEOUT
    assert [r.outcome for r in summary.results] == [Outcome.CANCELLED]
    assert backend.stopped == ["work_1"] and backend.removed == ["work_1"]


async def test_a_bug_while_serving_fails_that_item_only() -> None:
    class BuggyBackend(FakeBackend):
        async def launch(self, work_id: str, session_id: str, environment_id: str):  # type: ignore[no-untyped-def]
            if work_id == "work_1":
                raise RuntimeError("a bug")
            return await super().launch(work_id, session_id, environment_id)

    queue = FakeQueue(items=[work_item(1), work_item(2)])
    daemon, metrics = _daemon(queue, BuggyBackend())

    summary = await daemon.run(drain=True)

    assert [r.outcome for r in summary.results] == [Outcome.FAILED, Outcome.SUCCEEDED]
    assert "internal error" in summary.results[0].reason
    assert queue.stopped == ["work_1"], "the item the bug hit is stopped, not left to its lease"
    assert _finished(metrics, Outcome.FAILED) == 1
