"""The work queue of the local control plane (no HTTP, no locking).

Owns the work items and their lifecycle: queued → (polled, "pending") →
starting (ack) → active (heartbeat) → stopping/stopped, the lease clock, the
reclaim of polled-but-unacked items, lease expiry back to the queue, the
heartbeat optimistic concurrency (412 body), the stop log (every stop call,
by whom, so "stopped exactly once" is checkable), a revoked lease (the item
goes back to the queue; its holder's next heartbeat is 412) and the queue stats.

Stop is the API's "graceful or forced shutdown": `force` stops the item at once;
without it a held item becomes `stopping`, and its holder learns that from its
next heartbeat (`lease_extended: false`, the SDK's shutdown signal) and then
force-stops it, or the lease runs out. An item nobody holds stops at once either way.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from .clock import monotonic, now_rfc3339, unique_rfc3339
from .errors import ApiError

WorkState = Literal["queued", "starting", "active", "stopping", "stopped"]
HELD_STATES: tuple[WorkState, ...] = ("starting", "active", "stopping")
NO_HEARTBEAT = "NO_HEARTBEAT"
_sequence = itertools.count(1)


@dataclass
class WorkItem:
    """One work item and the counters the tests read back."""

    id: str
    kind: str
    data_id: str
    secret: str | None
    session_id: str | None
    heartbeat_status: int | None = None
    state: WorkState = "queued"
    created_at: str = field(default_factory=now_rfc3339)
    queued_at: str = field(default_factory=now_rfc3339)
    queued_order: int = field(default_factory=lambda: next(_sequence))
    polled_mono: float | None = None
    acknowledged_at: str | None = None
    started_at: str | None = None
    latest_heartbeat_at: str | None = None
    stop_requested_at: str | None = None
    stopped_at: str | None = None
    last_heartbeat: str | None = None
    lease_deadline: float | None = None
    polls: int = 0
    claims: int = 0
    heartbeats: int = 0
    heartbeat_412s: int = 0
    heartbeat_errors: int = 0
    lease_expiries: int = 0
    stop_conflicts: int = 0
    lease_revocations: int = 0
    stops: list[dict[str, Any]] = field(default_factory=list)
    stop_log: list[dict[str, Any]] = field(default_factory=list)
    heartbeat_credentials: set[str] = field(default_factory=set)

    @property
    def times_stopped(self) -> int:
        """Stops that stopped the item (a 409 refused a redundant one; a graceful one only asked)."""
        return sum(1 for s in self.stop_log if s["result"] == "stopped")

    def log_stop(self, by: str, force: bool, result: str, helper: str | None = None) -> None:
        self.stop_log.append({"by": by, "helper": helper, "force": force, "result": result, "at": now_rfc3339()})

    def to_json(self, environment_id: str, *, with_secret: bool = False) -> dict[str, Any]:
        """The `BetaSelfHostedWork` object; only the poll response carries `secret`."""
        return {
            "type": "work",
            "id": self.id,
            "environment_id": environment_id,
            "state": self.state,
            "data": {"type": self.kind, "id": self.data_id},
            "metadata": {},
            "created_at": self.created_at,
            "acknowledged_at": self.acknowledged_at,
            "started_at": self.started_at,
            "latest_heartbeat_at": self.latest_heartbeat_at,
            "stop_requested_at": self.stop_requested_at,
            "stopped_at": self.stopped_at,
            "secret": self.secret if with_secret else None,
        }

    def snapshot(self) -> dict[str, Any]:
        """The `/_cp/state` view of this item."""
        return {
            "id": self.id,
            "session_id": self.session_id,
            "type": self.kind,
            "state": self.state,
            "last_heartbeat": self.last_heartbeat,
            "polls": self.polls,
            "claims": self.claims,
            "heartbeats": self.heartbeats,
            "heartbeat_412s": self.heartbeat_412s,
            "heartbeat_errors": self.heartbeat_errors,
            "lease_expiries": self.lease_expiries,
            "heartbeat_credentials": sorted(self.heartbeat_credentials),
            "lease_revocations": self.lease_revocations,
            "stops": [dict(s) for s in self.stops],
            "stop_conflicts": self.stop_conflicts,
            "stop_log": [dict(s) for s in self.stop_log],
            "times_stopped": self.times_stopped,
        }

    def lease_state(self, ttl: int) -> dict[str, Any]:
        """`BetaWorkLeaseState`: the lease as the server holds it (412 details)."""
        return {
            "state": self.state,
            "last_heartbeat": self.last_heartbeat,
            "lease_extended": False,
            "ttl_seconds": ttl,
        }


class WorkQueue:
    """All work items of one environment. Callers serialise access (see `state`)."""

    def __init__(self, environment_id: str, lease_ttl_seconds: int, reclaim_older_than_ms: int) -> None:
        self.environment_id = environment_id
        self.lease_ttl_seconds = lease_ttl_seconds
        self.reclaim_older_than_ms = reclaim_older_than_ms
        self.items: dict[str, WorkItem] = {}

    def enqueue(
        self,
        kind: str,
        data_id: str,
        *,
        secret: str | None,
        session_id: str | None,
        heartbeat_status: int | None = None,
    ) -> WorkItem:
        item = WorkItem(
            id=f"work_{secrets.token_hex(12)}",
            kind=kind,
            data_id=data_id,
            secret=secret,
            session_id=session_id,
            heartbeat_status=heartbeat_status,
        )
        self.items[item.id] = item
        return item

    def get(self, work_id: str) -> WorkItem:
        item = self.items.get(work_id)
        if item is None:
            raise ApiError(404, f"work item {work_id} not found")
        return item

    def is_pending(self, item: WorkItem, now: float, reclaim_ms: int | None = None) -> bool:
        """Polled but not acked, and not yet old enough to be handed out again."""
        if item.state != "queued" or item.polled_mono is None:
            return False
        window = (reclaim_ms if reclaim_ms is not None else self.reclaim_older_than_ms) / 1000
        return now - item.polled_mono < window

    def expire_leases(self, now: float) -> tuple[bool, list[WorkItem]]:
        """Re-queue held items whose lease deadline passed (a `stopping` one becomes stopped).

        Returns whether anything changed, and the items this stopped."""
        changed, stopped = False, []
        for item in self.items.values():
            if item.state in HELD_STATES and item.lease_deadline is not None and now > item.lease_deadline:
                item.lease_expiries += 1
                if item.state == "stopping":
                    item.state, item.stopped_at, item.lease_deadline = "stopped", now_rfc3339(), None
                    item.log_stop("lease_expiry", False, "stopped")
                    stopped.append(item)
                else:
                    self._requeue(item)
                changed = True
        return changed, stopped

    def revoke_lease(self, item: WorkItem) -> WorkItem:
        """Take a held item's lease away: it is queued again, and its holder's next heartbeat is 412."""
        if item.state not in ("starting", "active"):
            raise ApiError(409, f"work item {item.id} is {item.state}, not starting or active")
        item.lease_revocations += 1
        self._requeue(item)
        return item

    def _requeue(self, item: WorkItem) -> None:
        """Back to the queue, keeping its place: the oldest work is handed out first."""
        item.state, item.queued_at = "queued", now_rfc3339()
        item.last_heartbeat = item.lease_deadline = item.polled_mono = None
        item.acknowledged_at = item.started_at = item.latest_heartbeat_at = None

    def poll(self, reclaim_ms: int | None) -> WorkItem | None:
        """Hand out the oldest visible queued item (it stays `queued` until acked)."""
        now = monotonic()
        visible = [i for i in self.items.values() if i.state == "queued" and not self.is_pending(i, now, reclaim_ms)]
        if not visible:
            return None
        item = min(visible, key=lambda i: i.queued_order)
        item.polled_mono, item.polls = now, item.polls + 1
        return item

    def ack(self, work_id: str) -> WorkItem:
        item = self.get(work_id)
        if item.state != "queued":
            raise ApiError(409, f"work item {work_id} is {item.state}, not queued", headers={"x-should-retry": "false"})
        item.state, item.acknowledged_at, item.claims = "starting", now_rfc3339(), item.claims + 1
        item.polled_mono, item.last_heartbeat = None, None
        item.lease_deadline = monotonic() + self.lease_ttl_seconds
        return item

    def heartbeat(self, item: WorkItem, expected: str | None, credential: str) -> dict[str, Any]:
        """Extend the lease of a held item whose last heartbeat is `expected`; else 412."""
        ttl = self.lease_ttl_seconds
        if item.heartbeat_status is not None and item.heartbeat_status != 412:
            item.heartbeat_errors += 1
            raise ApiError(item.heartbeat_status, "heartbeat rejected (scripted)")
        current = item.last_heartbeat or NO_HEARTBEAT
        compared = item.state != "stopping"
        if item.heartbeat_status == 412 or item.state not in HELD_STATES or (compared and expected != current):
            item.heartbeat_412s += 1
            raise ApiError(
                412,
                f"Heartbeat precondition failed: expected_last_heartbeat={expected!r} does not "
                f"match the work item's lease",
                details={
                    "error_code": "heartbeat_precondition_failed",
                    "current_state": item.lease_state(ttl),
                },
            )
        stamp = unique_rfc3339()
        if item.state == "starting":
            item.state, item.started_at = "active", stamp
        # A stopping item's lease is not extended: that is how its holder learns to shut down.
        extended = item.state != "stopping"
        item.last_heartbeat = item.latest_heartbeat_at = stamp
        if extended:
            item.lease_deadline = monotonic() + ttl
        item.heartbeats += 1
        item.heartbeat_credentials.add(credential)
        return {
            "type": "work_heartbeat",
            "last_heartbeat": stamp,
            "lease_extended": extended,
            "state": item.state,
            "ttl_seconds": ttl,
        }

    def stop(self, item: WorkItem, credential: str, force: bool, helper: str | None = None) -> WorkItem:
        """Stop the item (any state but stopped); a stop of a stopped item is 409, never retried.

        Without `force` a held item only becomes `stopping` (graceful shutdown, see above).
        Every call lands in `stop_log`, `by` the credential kind; `helper` is the SDK's
        `x-stainless-helper` (`environments-worker` for a worker's stop, none for a direct call)."""
        if item.state == "stopped":
            item.stop_conflicts += 1
            item.log_stop(credential, force, "conflict", helper)
            raise ApiError(409, f"work item {item.id} is already stopped", headers={"x-should-retry": "false"})
        if not force and item.state in HELD_STATES:
            item.state, item.stop_requested_at = "stopping", item.stop_requested_at or now_rfc3339()
            item.log_stop(credential, force, "stopping", helper)
            return item
        stamp = now_rfc3339()
        item.state, item.stopped_at = "stopped", stamp
        item.stop_requested_at = item.stop_requested_at or stamp
        item.lease_deadline = item.polled_mono = None
        item.stops.append({"credential": credential, "force": force})
        item.log_stop(credential, force, "stopped", helper)
        return item

    def request_stop(self, item: WorkItem) -> WorkItem:
        """Ask the holder to stop: a held item becomes `stopping` (seen on its next heartbeat)."""
        if item.state not in HELD_STATES:
            raise ApiError(409, f"work item {item.id} is {item.state}, not held")
        item.state, item.stop_requested_at = "stopping", now_rfc3339()
        return item

    def stop_summary(self) -> dict[str, Any]:
        """How often each item was stopped: once, more than once, not yet; and the refused redundant stops."""
        counts = {i.id: i.times_stopped for i in self.items.values()}
        return {
            "items": len(counts),
            "stopped_once": sum(1 for n in counts.values() if n == 1),
            "stopped_more": sorted(w for w, n in counts.items() if n > 1),
            "redundant_stops_refused": sum(i.stop_conflicts for i in self.items.values()),
            "not_stopped": sorted(i.id for i in self.items.values() if i.state != "stopped"),
        }

    def stats(self, workers_polling: int) -> dict[str, Any]:
        """`work_queue_stats`: depth = queued and visible to a poll; pending = polled, not acked."""
        now = monotonic()
        queued = [i for i in self.items.values() if i.state == "queued"]
        pending = sum(1 for i in queued if self.is_pending(i, now))
        oldest = min(queued, key=lambda i: i.queued_order).queued_at if queued else None
        return {
            "type": "work_queue_stats",
            "depth": len(queued) - pending,
            "pending": pending,
            "oldest_queued_at": oldest,
            "workers_polling": workers_polling,
        }
