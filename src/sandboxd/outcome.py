"""How a session ended, from the daemon's point of view: one bounded label set for logs and metrics."""

from __future__ import annotations

import enum

from .protocol import ExitCode


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LAUNCH_FAILED = "launch_failed"
    WORKSPACE_FAILED = "workspace_failed"
    LEASE_LOST = "lease_lost"
    CANCELLED = "cancelled"
    OOM_KILLED = "oom_killed"
    DISK_LIMIT = "disk_limit"
    HANDED_OFF = "handed_off"  # left running to the next daemon; it reports the real outcome

    @property
    def ok(self) -> bool:
        return self in (Outcome.SUCCEEDED, Outcome.HANDED_OFF)


# Exit statuses after which the container has force-stopped its own item (or must not: lease lost).
# After any other status (a crash, SIGKILL, OOM, a bad assignment) the daemon stops the item itself.
ITEM_SETTLED_BY_SANDBOX = frozenset(
    {
        ExitCode.SERVED,
        ExitCode.LEASE_LOST,
        ExitCode.ABORTED,
        ExitCode.HEARTBEAT_REJECTED,
        ExitCode.CANCELLED,
        ExitCode.FAILED,
    }
)


def outcome_for_exit(status: int) -> Outcome:
    """Map a sandbox's exit status to an outcome (timeouts and cancels are decided by the caller)."""
    if status == ExitCode.SERVED:
        return Outcome.SUCCEEDED
    if status == ExitCode.LEASE_LOST:
        return Outcome.LEASE_LOST
    if status == ExitCode.ABORTED:
        return Outcome.WORKSPACE_FAILED
    if status == ExitCode.CANCELLED:
        return Outcome.CANCELLED
    return Outcome.FAILED


def describe_exit(status: int) -> str:
    """A short human reason for a sandbox exit status ("" for a served session)."""
    try:
        return "" if status == ExitCode.SERVED else f"sandbox exit {status} ({ExitCode(status).name.lower()})"
    except ValueError:
        return f"sandbox exit {status}"
