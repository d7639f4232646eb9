"""Settlement: the first outcome wins, one owner of the stop at a time, one shielded stop at the exit."""

from __future__ import annotations

import anyio
import pytest

from sandboxd.outcome import ITEM_SETTLED_BY_SANDBOX, Outcome
from sandboxd.protocol import ExitCode
from sandboxd.settlement import Evidence, ItemRef, Owner, Settlement

pytestmark = pytest.mark.anyio

REF = ItemRef("work_1", "env_test", "sesn_1")


class Stops:
    """A queue that records each force-stop, optionally taking its time (to be cancelled meanwhile)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.items: list[ItemRef] = []
        self.seconds = seconds

    async def force_stop(self, item: ItemRef) -> None:
        await anyio.sleep(self.seconds)
        self.items.append(item)


def test_the_first_recorded_outcome_wins() -> None:
    settlement = Settlement(Stops(), REF)
    settlement.record(Outcome.TIMED_OUT, "exceeded max_session_seconds=30")
    settlement.record(Outcome.CANCELLED, "stopped")
    settlement.sandbox_exited(ExitCode.CANCELLED)
    settlement.sandbox_lost("gone")
    assert (settlement.outcome, settlement.reason) == (Outcome.TIMED_OUT, "exceeded max_session_seconds=30")


def owner_of(settlement: Settlement) -> Owner:
    """Read afresh: mypy would keep `settlement.owner` narrowed across the calls that change it."""
    return settlement.owner


def test_the_daemon_owns_the_stop_until_the_hand_over_then_the_sandbox() -> None:
    settlement = Settlement(Stops(), REF)
    assert owner_of(settlement) is Owner.DAEMON
    settlement.handed_to_sandbox()
    assert owner_of(settlement) is Owner.SANDBOX
    settlement.sandbox_exited(ExitCode.SERVED)
    assert owner_of(settlement) is Owner.SANDBOX and settlement.outcome is Outcome.SUCCEEDED


@pytest.mark.parametrize("status", sorted(ITEM_SETTLED_BY_SANDBOX))
def test_an_exit_the_sandbox_settled_leaves_the_stop_to_it(status: int) -> None:
    settlement = Settlement(Stops(), REF, owner=Owner.SANDBOX)
    settlement.sandbox_exited(status)
    assert settlement.owner is Owner.SANDBOX


@pytest.mark.parametrize("status", [ExitCode.ERROR, ExitCode.BAD_ASSIGNMENT, 137, 143, -1, 255])
def test_an_exit_the_sandbox_could_not_settle_gives_the_stop_back_to_the_daemon(status: int) -> None:
    settlement = Settlement(Stops(), REF, owner=Owner.SANDBOX)
    settlement.sandbox_exited(status)
    assert settlement.owner is Owner.DAEMON and settlement.outcome is Outcome.FAILED
    assert str(status) in settlement.reason


def test_an_oom_kill_is_the_daemons_to_stop_and_is_reported_as_such() -> None:
    settlement = Settlement(Stops(), REF, owner=Owner.SANDBOX)
    settlement.sandbox_exited(137, oom_killed=True)
    assert settlement.owner is Owner.DAEMON and settlement.outcome is Outcome.OOM_KILLED


def test_a_lost_sandbox_is_the_daemons_to_stop() -> None:
    settlement = Settlement(Stops(), REF, owner=Owner.SANDBOX)
    settlement.sandbox_lost("the engine lost the sandbox")
    assert settlement.owner is Owner.DAEMON
    assert (settlement.outcome, settlement.reason) == (Outcome.FAILED, "the engine lost the sandbox")


def test_a_hand_over_does_not_take_the_stop_from_the_next_daemon() -> None:
    settlement = Settlement(Stops(), REF)
    settlement.hand_off()
    settlement.handed_to_sandbox()
    assert settlement.owner is Owner.NEXT_DAEMON


@pytest.mark.parametrize("owner", list(Owner))
async def test_a_hand_off_never_stops_the_item(owner: Owner) -> None:
    stops = Stops()
    async with Settlement(stops, REF, owner=owner) as settlement:
        settlement.hand_off()
    assert stops.items == [] and not settlement.stopped_by_daemon

    with anyio.CancelScope() as scope:
        async with Settlement(stops, REF, owner=owner) as settlement:
            settlement.hand_off()
            scope.cancel()
            await anyio.sleep_forever()
    assert stops.items == [] and settlement.owner is Owner.NEXT_DAEMON


async def test_the_exit_stops_an_item_the_daemon_owns_exactly_once() -> None:
    stops = Stops()
    settlement = Settlement(stops, REF)
    async with settlement:
        settlement.record(Outcome.LAUNCH_FAILED, "image missing")
    async with settlement:  # a second exit (a caller's retry path) must not stop it again
        pass
    assert stops.items == [REF] and settlement.stopped_by_daemon


async def test_the_exit_leaves_an_item_the_sandbox_owns_to_it() -> None:
    stops = Stops()
    async with Settlement(stops, REF) as settlement:
        settlement.handed_to_sandbox()
        settlement.sandbox_exited(ExitCode.SERVED)
    assert stops.items == [] and not settlement.stopped_by_daemon


async def test_the_stop_is_shielded_from_the_cancellation_that_ended_the_session() -> None:
    stops = Stops(seconds=0.05)
    with anyio.CancelScope() as scope:
        async with Settlement(stops, REF) as settlement:
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught, "cancellation propagates out of the settlement"
    assert stops.items == [REF] and settlement.stopped_by_daemon
    assert settlement.outcome is Outcome.CANCELLED and "shutdown" in settlement.reason


async def test_cancellation_keeps_an_earlier_outcome_and_a_sandbox_owned_item_unstopped() -> None:
    stops = Stops()
    with anyio.CancelScope() as scope:
        async with Settlement(stops, REF) as settlement:
            settlement.handed_to_sandbox()
            settlement.record(Outcome.TIMED_OUT, "exceeded max_session_seconds=1")
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert settlement.outcome is Outcome.TIMED_OUT and stops.items == []


async def test_a_bug_is_swallowed_fails_the_item_and_the_daemon_stops_it(caplog: pytest.LogCaptureFixture) -> None:
    stops = Stops()
    async with Settlement(stops, REF) as settlement:
        settlement.handed_to_sandbox()  # even after the hand-over: the sandbox was not stopped by its worker
        raise RuntimeError("a bug")
    assert settlement.outcome is Outcome.FAILED and "internal error" in settlement.reason
    assert settlement.owner is Owner.DAEMON and stops.items == [REF]
    assert "session_crashed work_id=work_1" in caplog.text and "RuntimeError: a bug" in caplog.text


async def test_a_bug_keeps_the_earlier_outcome() -> None:
    stops = Stops()
    async with Settlement(stops, REF) as settlement:
        settlement.record(Outcome.WORKSPACE_FAILED, "not_found: no such repo")
        raise KeyError("a bug")
    assert settlement.outcome is Outcome.WORKSPACE_FAILED and stops.items == [REF]


async def test_a_stop_that_hangs_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    real_move_on_after = anyio.move_on_after
    monkeypatch.setattr(anyio, "move_on_after", lambda seconds: real_move_on_after(min(seconds, 0.05)))
    stops = Stops(seconds=60)
    with anyio.fail_after(2):
        async with Settlement(stops, REF) as settlement:
            pass
    assert stops.items == [] and not settlement.stopped_by_daemon


async def test_an_item_the_broker_saw_stopped_is_never_stopped_again_whatever_killed_the_sandbox() -> None:
    stops = Stops()
    async with Settlement(stops, REF) as settlement:
        settlement.handed_to_sandbox()
        # the worker's stop went through the broker, then the engine shut down
        settlement.sandbox_exited(143, evidence=Evidence(stopped=True, lease_lost=False))
    assert stops.items == []
    async with Settlement(stops, REF) as settlement:
        settlement.handed_to_sandbox()
        settlement.sandbox_exited(143)
    assert stops.items == [REF]


@pytest.mark.parametrize("status",
                         [ExitCode.SERVED, ExitCode.CANCELLED, ExitCode.HEARTBEAT_REJECTED, ExitCode.LEASE_LOST])
async def test_with_a_broker_only_what_it_saw_settles_the_item_never_the_exit_status(status: int) -> None:
    stops = Stops()
    async with Settlement(stops, REF) as settlement:
        settlement.handed_to_sandbox()
        settlement.sandbox_exited(status, evidence=Evidence(stopped=False, lease_lost=False))
    assert stops.items == [REF], "no stop went by: the daemon stops the item (a redundant stop is a 409)"


async def test_a_412_the_broker_saw_leaves_the_item_to_its_new_holder() -> None:
    stops = Stops()
    async with Settlement(stops, REF) as settlement:
        settlement.handed_to_sandbox()
        settlement.sandbox_exited(ExitCode.UNSTOPPED, evidence=Evidence(stopped=False, lease_lost=True))
    assert stops.items == [] and settlement.outcome is Outcome.LEASE_LOST


async def test_an_unstopped_exit_without_a_broker_is_stopped_by_the_daemon() -> None:
    stops = Stops()
    async with Settlement(stops, REF) as settlement:
        settlement.handed_to_sandbox()
        settlement.sandbox_exited(ExitCode.UNSTOPPED)
    assert stops.items == [REF] and settlement.outcome is Outcome.FAILED
