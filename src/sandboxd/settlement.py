"""The one owner of "every work item ends stopped exactly once".

A claimed item is stopped by exactly one party: the sandbox's own worker (with its own sessions
token) once the item was handed to it, or the daemon (with the environment key) when no sandbox
took it or the sandbox could not stop it (a crash, SIGKILL, OOM, a bad assignment, a sandbox
that vanished). `Settlement` records who owns the stop and why the session ended — the first
recorded outcome wins, like the SDK's `_Lease` — and its exit is the single, shielded place that
sends the daemon's stop. Fresh, pooled and adopted sandboxes all go through it. A hand-off to
the next daemon leaves the item alone: its sandbox still holds the lease.

Whether the sandbox did stop its item is never taken on the sandbox's word: with a broker
(`Evidence`), the daemon believes only the stop (or the 412) it relayed itself. When in doubt it
stops the item: a redundant force-stop is answered 409 and costs nothing.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import anyio

from .outcome import ITEM_SETTLED_BY_SANDBOX, Outcome, describe_exit, outcome_for_exit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemRef:
    """What it takes to stop an item and to say whose it was; it survives a daemon restart."""

    work_id: str
    environment_id: str
    session_id: str


@dataclass(frozen=True)
class Evidence:
    """What the daemon itself saw of the item's API traffic (its broker relays every call)."""

    stopped: bool  # the worker's stop was accepted, or the item was already stopped (409)
    lease_lost: bool  # a heartbeat met 412: another worker holds the item, which must not be stopped


class Stopper(Protocol):
    async def force_stop(self, item: ItemRef) -> None: ...


class Owner(enum.Enum):
    DAEMON = "daemon"  # nothing else will stop the item
    SANDBOX = "sandbox"  # the sandbox's worker stops it (or its lease was lost: then nobody may)
    NEXT_DAEMON = "next_daemon"  # handed off with a running sandbox: not ours to settle any more


class Settlement:
    """Use as `async with Settlement(queue, ref) as s:`; the exit stops the item if the daemon owns it."""

    def __init__(self, queue: Stopper, item: ItemRef, *, owner: Owner = Owner.DAEMON) -> None:
        self.item = item
        self.owner = owner
        self.outcome: Outcome | None = None
        self.reason = ""
        self.stopped_by_daemon = False
        self.exit_seen = False  # the sandbox's exit (or loss) already decided who stops the item
        self._queue = queue

    def record(self, outcome: Outcome, reason: str = "") -> None:
        """Why the session ended; the first call wins (a timeout stays a timeout after the stop)."""
        if self.outcome is None:
            self.outcome, self.reason = outcome, reason

    def handed_to_sandbox(self) -> None:
        """The assignment reached the sandbox: from now on its worker stops the item."""
        if self.owner is Owner.DAEMON:
            self.owner = Owner.SANDBOX

    def sandbox_exited(self, status: int, *, oom_killed: bool = False, evidence: Evidence | None = None) -> None:
        """Take the sandbox's exit: the daemon owns the stop again unless the item is known settled.

        With `evidence` (the broker's), only what the daemon saw go by counts: an accepted stop, or
        a 412. Without a broker (the operator gave sandboxes a network), the exit status decides;
        the entrypoint claims a settled item only when it saw the stop accepted.
        """
        self.exit_seen = True
        settled = (evidence.stopped or evidence.lease_lost) if evidence is not None \
            else status in ITEM_SETTLED_BY_SANDBOX
        if not settled:
            log.warning("sandbox_ended_unstopped work_id=%s exit=%s%s; stopping the item", self.item.work_id, status,
                        " (oom killed)" if oom_killed else "")
            self.owner = Owner.DAEMON
            if oom_killed:  # the worker itself was killed (a tool's OOM kill is that tool's error)
                self.record(Outcome.OOM_KILLED, f"the sandbox ran out of memory (exit {status})")
        if evidence is not None and evidence.lease_lost:
            self.record(Outcome.LEASE_LOST, "a heartbeat met 412: the item belongs to another worker")
        self.record(outcome_for_exit(status), describe_exit(status))

    def sandbox_lost(self, why: str) -> None:
        """The sandbox's fate is unknown (gone, engine unreachable): stopping again is harmless (409)."""
        self.exit_seen = True
        self.owner = Owner.DAEMON
        self.record(Outcome.FAILED, why)

    def hand_off(self) -> None:
        """Leave a running sandbox, and so its item, to the next daemon on this engine."""
        self.owner = Owner.NEXT_DAEMON

    async def __aenter__(self) -> Settlement:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """Settle; a bug (any Exception) fails this item only and is swallowed, cancellation propagates."""
        if exc is not None and self.owner is not Owner.NEXT_DAEMON:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                self.record(Outcome.CANCELLED, "stopped by the daemon's shutdown")
            else:
                # A bug while serving: the sandbox (if any) was removed without its worker's stop.
                log.error("session_crashed work_id=%s", self.item.work_id, exc_info=(kind, exc, tb))  # type: ignore[arg-type]
                if not self.exit_seen:
                    self.owner = Owner.DAEMON
                self.record(Outcome.FAILED, "internal error (traceback in the log)")
        if self.owner is Owner.DAEMON and not self.stopped_by_daemon:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await self._queue.force_stop(self.item)
                self.stopped_by_daemon = True
        return isinstance(exc, Exception)
