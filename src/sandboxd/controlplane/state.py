"""The in-memory model of the local control plane (no HTTP).

Owns `ControlPlaneState`: the key ring, work queue, sessions and fault
injector behind one lock, so the routes (on the server's event loop) and
tests (on any thread) see a consistent model. Every API operation
authenticates, applies lazy lease expiry, mutates, and wakes waiters; a
stopped item whose turn ended queues the session's next turn (a new item
with a new sessions token); `snapshot()` is `/_cp/state`.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from typing import Any, Literal

from .auth import Caller, KeyRing
from .clock import monotonic, now_rfc3339
from .errors import ApiError
from .faults import FaultInjector
from .scenario import FaultPlan, Scenario, ScriptedSession, SkillSpec
from .sessions import SessionRecord
from .skills import find_skill, skill_zip, version_json
from .wakeup import ChangeSignal
from .work import WorkItem, WorkQueue

OutageMode = Literal["off", "hang", "error"]
WORKER_WINDOW_SECONDS = 30.0


def encode_secret(payload: dict[str, Any]) -> str:
    """The work-item `secret`: unpadded URL-safe base64 of a JSON object."""
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


class ControlPlaneState:
    """Thread-safe facade over the key ring, the work queue and the sessions."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.signal = ChangeSignal()
        self.outage: OutageMode = "off"
        self.closing = False
        self._lock = threading.RLock()
        self._keys = KeyRing(scenario.environment_key, scenario.api_key)
        self._queue = WorkQueue(scenario.environment_id, scenario.lease_ttl_seconds, scenario.reclaim_older_than_ms)
        self._sessions: dict[str, SessionRecord] = {}
        self._workers: dict[str, float] = {}
        self._requests: Counter[str] = Counter()
        self.faults = FaultInjector(scenario.faults)
        for spec in scenario.sessions:
            self.add_session(spec)
        for _ in range(scenario.healthchecks):
            self.add_healthcheck()

    # -- admin ----------------------------------------------------------------------------------

    def add_session(self, spec: ScriptedSession) -> tuple[str, str]:
        """Register a scripted session and enqueue its work item; returns (session_id, work_id)."""
        with self._lock:
            if spec.session_id in self._sessions:
                raise ApiError(409, f"session {spec.session_id} already exists")
            record = SessionRecord(spec=spec, environment_id=self.scenario.environment_id, status=spec.status)
            item = self._new_item(spec)
            record.turn.work_id = item.id
            self._sessions[spec.session_id] = record
        self.signal.notify()
        return spec.session_id, item.id

    def _new_item(self, spec: ScriptedSession) -> WorkItem:
        """Queue a work item for `spec`'s session, with a sessions token of its own in the secret."""
        item = self._queue.enqueue(
            "session", spec.session_id, secret=None, session_id=spec.session_id, heartbeat_status=spec.heartbeat_status
        )
        token = self._keys.new_sessions_token(spec.session_id, item.id)
        item.secret = {
            "token": encode_secret({"sessions_token": token}),
            "none": None,
            "garbage": base64.urlsafe_b64encode(b"not json {").decode(),
        }[spec.secret]
        return item

    def add_healthcheck(self) -> str:
        """Enqueue a `healthcheck` work item; returns its work_id."""
        with self._lock:
            item = self._queue.enqueue(
                "healthcheck", f"hc_{len(self._queue.items) + 1:04d}", secret=None, session_id=None
            )
        self.signal.notify()
        return item.id

    def set_outage(self, mode: OutageMode) -> None:
        self.outage = mode
        self.signal.notify()

    def set_lease_ttl(self, seconds: int) -> None:
        with self._lock:
            self._queue.lease_ttl_seconds = seconds

    def request_stop(self, work_id: str) -> dict[str, Any]:
        """Mark a held item `stopping`; its holder sees that on the next heartbeat."""
        with self._lock:
            item = self._queue.request_stop(self._queue.get(work_id))
            body = item.to_json(self.scenario.environment_id)
        self.signal.notify()
        return body

    def revoke_lease(self, work_id: str) -> dict[str, Any]:
        """Take a held item's lease away (back to the queue): its holder's next heartbeat is 412."""
        with self._lock:
            self._tick()
            item = self._queue.revoke_lease(self._queue.get(work_id))
            self.faults.count("lease_revoked")
            body = item.to_json(self.scenario.environment_id)
        self.signal.notify()
        return body

    def terminate_session(self, session_id: str) -> dict[str, Any]:
        """Terminate a session now, tool calls pending or not (its worker's runner stops at once)."""
        with self._lock:
            record = self._session(session_id)
            if record.terminate("admin"):
                self.faults.count("session_terminated")
            body = record.snapshot()
        self.signal.notify()
        return body

    def drop_streams(self, session_id: str) -> int:
        """End the session's open event streams mid-session; returns how many were open."""
        with self._lock:
            dropped = self._session(session_id).drop_streams()
            if dropped:
                self.faults.count("stream_dropped")
        self.signal.notify()
        return dropped

    def set_faults(self, plan: FaultPlan) -> dict[str, Any]:
        """Replace the fault plan (an empty plan turns rate-based faults off); counters are kept."""
        self.faults.set_plan(plan)
        return self.faults.snapshot()

    def close(self) -> None:
        """Release hanging requests and end open streams (server shutdown)."""
        self.closing, self.outage = True, "off"
        self.signal.notify()

    def count_request(self, route: str) -> None:
        with self._lock:
            self._requests[route] += 1

    # -- helpers --------------------------------------------------------------------------------

    def _tick(self) -> None:
        """Lazy timers: re-queue expired leases (called under the lock by every operation)."""
        changed, stopped = self._queue.expire_leases(monotonic())
        for item in stopped:
            self._after_stop(item)
        if changed:
            self.signal.notify()

    def _after_stop(self, item: WorkItem) -> None:
        """A stopped item whose turn ended lets the user speak again: the next turn gets a new item.

        An item stopped mid-turn (tool calls pending) ends its session's script there."""
        record = self._sessions.get(item.session_id) if item.session_id else None
        if item.state == "stopped" and record is not None and record.work_id == item.id and record.next_turn_due:
            record.advance(self._new_item(record.spec).id)

    def _check_environment(self, environment_id: str) -> None:
        if environment_id != self.scenario.environment_id:
            raise ApiError(404, f"environment {environment_id} not found")

    def _session(self, session_id: str) -> SessionRecord:
        record = self._sessions.get(session_id)
        if record is None:
            raise ApiError(404, f"session {session_id} not found")
        return record

    def _session_access(self, token: str | None, session_id: str, route: str) -> SessionRecord:
        return self._session_caller(token, session_id, route)[0]

    def _session_caller(self, token: str | None, session_id: str, route: str) -> tuple[SessionRecord, Caller]:
        self._keys.identify(token)  # 401 before 404
        record = self._session(session_id)
        application = route in ("events_list", "events_send")
        caller = self._keys.require_session(token, session_id, record.work_id, application=application)
        record.note_credential(route, caller.kind)
        return record, caller

    def _item_access(self, token: str | None, environment_id: str, work_id: str) -> tuple[WorkItem, Caller]:
        self._keys.identify(token)
        self._check_environment(environment_id)
        item = self._queue.get(work_id)
        return item, self._keys.require_item(token, work_id)

    def _workers_polling(self) -> list[str]:
        now = monotonic()
        return sorted(w for w, seen in self._workers.items() if now - seen <= WORKER_WINDOW_SECONDS)

    # -- work API -------------------------------------------------------------------------------

    def poll(
        self, token: str | None, environment_id: str, worker_id: str | None, reclaim_ms: int | None
    ) -> dict[str, Any] | None:
        with self._lock:
            self._keys.require_environment_key(token)
            self._check_environment(environment_id)
            if worker_id:
                self._workers[worker_id] = monotonic()
            self._tick()
            item = self._queue.poll(reclaim_ms)
            return item.to_json(environment_id, with_secret=True) if item else None

    def ack(self, token: str | None, environment_id: str, work_id: str) -> dict[str, Any]:
        with self._lock:
            self._keys.require_environment_key(token)
            self._check_environment(environment_id)
            self._tick()
            body = self._queue.ack(work_id).to_json(environment_id)
        self.signal.notify()
        return body

    def heartbeat(self, token: str | None, environment_id: str, work_id: str, expected: str | None) -> dict[str, Any]:
        with self._lock:
            item, caller = self._item_access(token, environment_id, work_id)
            self._tick()
            return self._queue.heartbeat(item, expected, caller.kind)

    def stop(
        self, token: str | None, environment_id: str, work_id: str, force: bool, helper: str | None = None
    ) -> dict[str, Any]:
        with self._lock:
            item, caller = self._item_access(token, environment_id, work_id)
            self._tick()
            body = self._queue.stop(item, caller.kind, force, helper).to_json(environment_id)
            self._after_stop(item)
        self.signal.notify()
        return body

    def stats(self, token: str | None, environment_id: str) -> dict[str, Any]:
        with self._lock:
            self._keys.require_api_key(token)
            self._check_environment(environment_id)
            self._tick()
            return self._queue.stats(len(self._workers_polling()))

    # -- sessions and skills API ----------------------------------------------------------------

    def get_session(self, token: str | None, session_id: str) -> dict[str, Any]:
        with self._lock:
            return self._session_access(token, session_id, "session").to_json()

    def open_stream(self, token: str | None, session_id: str) -> tuple[int, int]:
        """Authorise a stream; start the script if needed.

        Returns the index of the first event to send and the session's stream epoch. A stream
        streams live events only, but one opened on an ended session starts with its terminal
        event: the runner stops on a terminal event from the stream, never from the history, so
        a stream cut just before the termination would otherwise leave it waiting forever."""
        with self._lock:
            record = self._session_access(token, session_id, "stream")
            start = record.terminal_index() if record.status == "terminated" else len(record.events)
            record.streams_open += 1
            record.start()
        self.signal.notify()
        return start, record.stream_epoch

    def stream_batch(
        self, token: str | None, session_id: str, epoch: int, index: int
    ) -> tuple[list[dict[str, Any]] | None, bool]:
        """The events from `index` on for an open stream, or None when it must end; and whether
        it ends because it was dropped (the session's stream epoch moved on)."""
        with self._lock:
            record = self._session(session_id)
            if record.stream_epoch != epoch:
                return None, True
            try:
                self._keys.require_session(token, session_id, record.work_id)
            except ApiError:  # its work item is no longer the current one: the token has expired
                return None, False
            return [dict(e) for e in record.events[index:]], False

    def stream_closed(self, session_id: str, dropped: bool) -> None:
        with self._lock:
            record = self._session(session_id)
            record.streams_open -= 1
            if dropped:
                record.streams_dropped += 1

    def events_since(self, session_id: str, index: int) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._session(session_id).events[index:]]

    def list_events(self, token: str | None, session_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._session_access(token, session_id, "events_list").events]

    def post_events(self, token: str | None, session_id: str, events: Any) -> list[dict[str, Any]]:
        with self._lock:
            record, caller = self._session_caller(token, session_id, "events_send")
            stored = record.post_events(events, caller.kind)
        self.signal.notify()
        return stored

    def _skill_access(self, token: str | None, skill_id: str, version: str) -> SkillSpec:
        caller = self._keys.identify(token)
        records = list(self._sessions.values())
        if caller.kind == "sessions_token":
            records = [r for r in records if r.id == caller.session_id]
        elif caller.kind != "environment_key":
            raise ApiError(403, "skills need the environment key or a sessions token")
        skill = find_skill([s for r in records for s in r.spec.skills], skill_id, version)
        for record in records:
            if skill in record.spec.skills:
                record.note_credential("skills", caller.kind)
        return skill

    def skill_version(self, token: str | None, skill_id: str, version: str) -> dict[str, Any]:
        with self._lock:
            return version_json(self._skill_access(token, skill_id, version), now_rfc3339())

    def skill_content(self, token: str | None, skill_id: str, version_id: str) -> bytes:
        with self._lock:
            return skill_zip(self._skill_access(token, skill_id, version_id))

    # -- inspection -----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The `/_cp/state` document.

        `work`: {work_id: `WorkItem.snapshot()`} — id, session_id, type, state, last_heartbeat,
        polls, claims (acks), heartbeats (successful), heartbeat_412s, heartbeat_errors (scripted
        statuses), lease_expiries, lease_revocations, heartbeat_credentials, stops [{credential,
        force}] (the one stop that took effect), stop_conflicts (409s), stop_log [{by, helper,
        force, result: stopped|stopping|conflict, at}] (every stop call — `stopping` for a graceful
        stop of a held item —, and a lease expiry that ended a `stopping` item, by "lease_expiry")
        and times_stopped (the entries that stopped the item: a refused 409 is not a stop, nor is a
        graceful request).
        `sessions`: {session_id: `SessionRecord.snapshot()`} — work_id (current turn's item),
        work_ids (one per turn served so far), status, steps (all turns), results [{tool_use_id,
        name, is_error, text, passed, reason}] (all turns), duplicates, done (every result of every
        turn arrived), passed, turn (current, from 1), turns [{turn, work_id, steps, results, done,
        passed}], terminated_by (null, "scenario", "admin"), pending_tool_uses, late_results
        (results posted after a termination, not counted), streams_dropped,
        events, credentials_seen {route: [kind]}. Each result also has type (agent.tool_use or
        agent.custom_tool_use), evaluated_permission, confirmation (allow, deny or null),
        confirmed_by, ran (a result arrived; false for a denied call) and posted_by (the credential
        kind that posted it: sessions_token or environment_key is the worker, api_key the
        application); awaiting_user [{event_id, type, name, awaiting}] (the calls the session waits
        on the user for: `user.tool_confirmation` or `user.custom_tool_result`), confirmations
        [{tool_use_id, result, by}], refused_events [{type, tool_use_id, by, reason}] (posts the API
        refused with 400: a result for a denied or unconfirmed call, of the wrong type, ...).
        `faults`: {plan, injected: {"route.kind" or one-shot name: count}}. `stop_summary`: {items,
        stopped_once, stopped_more: [work_id], not_stopped: [work_id]}. Plus `stats` (as the stats
        endpoint), `workers_polling` (ids seen in the last 30 s), `requests` ({route: count} of /v1
        calls), `outage`, timings.
        """
        with self._lock:
            self._tick()
            workers = self._workers_polling()
            return {
                "environment_id": self.scenario.environment_id,
                "lease_ttl_seconds": self._queue.lease_ttl_seconds,
                "reclaim_older_than_ms": self._queue.reclaim_older_than_ms,
                "outage": self.outage,
                "work": {i.id: i.snapshot() for i in self._queue.items.values()},
                "sessions": {s.id: s.snapshot() for s in self._sessions.values()},
                "stats": self._queue.stats(len(workers)),
                "workers_polling": workers,
                "requests": dict(sorted(self._requests.items())),
                "faults": self.faults.snapshot(),
                "stop_summary": self._queue.stop_summary(),
            }
