"""Scripted sessions of the local control plane (no HTTP, no locking).

Owns one session's event log and its script, turn by turn: emit a step as
`agent.tool_use` plus a `requires_action` idle, check each posted
`user.tool_result` against the step's expectations, move on, and end a turn
with `agent.message` then an `end_turn` idle (the last turn: a termination or
that idle, per `end`). `advance` starts the next turn (the user speaks again).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from .clock import now_rfc3339
from .errors import ApiError
from .scenario import ScriptedSession, ToolStep

_event_numbers = itertools.count(1)


def _event_id(prefix: str = "sevt_") -> str:
    return f"{prefix}{next(_event_numbers):06d}"


def result_text(content: Any) -> str:
    """The text blocks of a tool result's `content`, joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
    return "\n".join(t for t in texts if isinstance(t, str))


def check_expectation(step: ToolStep, is_error: bool, text: str) -> str | None:
    """Why a result fails `step.expect`, or None when it passes."""
    expect = step.expect
    if expect.is_error is not None and is_error != expect.is_error:
        return f"is_error={is_error}, expected {expect.is_error}"
    missing = [s for s in expect.contains if s not in text]
    if missing:
        return f"missing {missing!r}"
    present = [s for s in expect.not_contains if s in text]
    if present:
        return f"unexpected {present!r}"
    return None


@dataclass
class TurnRecord:
    """One turn of a session: its steps, the work item that served it, and its results."""

    number: int
    steps: list[ToolStep]
    work_id: str | None = None
    step_index: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.results) >= len(self.steps)

    def snapshot(self) -> dict[str, Any]:
        return {
            "turn": self.number,
            "work_id": self.work_id,
            "steps": len(self.steps),
            "results": [dict(r) for r in self.results],
            "done": self.done,
            "passed": self.done and all(r["passed"] for r in self.results),
        }


@dataclass
class SessionRecord:
    """One session: its script (turn by turn), event log, results and who called what."""

    spec: ScriptedSession
    environment_id: str
    status: str
    created_at: str = field(default_factory=now_rfc3339)
    updated_at: str = field(default_factory=now_rfc3339)
    events: list[dict[str, Any]] = field(default_factory=list)
    started: bool = False
    turns: list[TurnRecord] = field(default_factory=list)
    turn_index: int = 0
    tool_uses: dict[str, tuple[int, int]] = field(default_factory=dict)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    late_results: list[dict[str, Any]] = field(default_factory=list)
    credentials_seen: dict[str, set[str]] = field(default_factory=dict)
    terminated_by: str | None = None
    stream_epoch: int = 0
    streams_open: int = 0
    streams_dropped: int = 0

    def __post_init__(self) -> None:
        if not self.turns:
            self.turns = [TurnRecord(n + 1, steps) for n, steps in enumerate(self.spec.script)]

    @property
    def id(self) -> str:
        return self.spec.session_id

    @property
    def turn(self) -> TurnRecord:
        return self.turns[self.turn_index]

    @property
    def work_id(self) -> str | None:
        """The work item of the current turn (the one its sessions token must belong to)."""
        return self.turn.work_id

    @property
    def results(self) -> list[dict[str, Any]]:
        return [r for t in self.turns for r in t.results]

    @property
    def done(self) -> bool:
        """Every tool result of every turn arrived."""
        return all(t.done for t in self.turns)

    @property
    def pending_tool_uses(self) -> list[str]:
        answered = {r["tool_use_id"] for r in self.results}
        return [use_id for use_id in self.tool_uses if use_id not in answered]

    @property
    def next_turn_due(self) -> bool:
        """The current turn ended (idle, every result in) and another turn follows."""
        return self.status == "idle" and self.turn.done and self.turn_index + 1 < len(self.turns)

    def terminal_index(self) -> int:
        """The index of the last `session.status_terminated` event (the end of the log if none)."""
        for index in range(len(self.events) - 1, -1, -1):
            if self.events[index]["type"] == "session.status_terminated":
                return index
        return len(self.events)

    def note_credential(self, route: str, credential: str) -> None:
        self.credentials_seen.setdefault(route, set()).add(credential)

    def to_json(self) -> dict[str, Any]:
        """The `BetaManagedAgentsSession` object (the fields the worker reads, and more)."""
        skills = [{"type": "custom", "skill_id": s.skill_id, "version": s.version} for s in self.spec.skills]
        return {
            "type": "session",
            "id": self.id,
            "status": self.status,
            "title": self.spec.title,
            "metadata": dict(self.spec.metadata),
            "agent": {"type": "agent", "id": "agent_local", "name": "local-agent", "skills": skills},
            "resources": [],
            "environment_id": self.environment_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "archived_at": None,
        }

    def _emit(self, event_type: str, event_id: str | None = None, **fields: Any) -> dict[str, Any]:
        event = {"type": event_type, "id": event_id or _event_id(), **fields, "processed_at": now_rfc3339()}
        self.events.append(event)
        self.updated_at = event["processed_at"]
        return event

    def start(self) -> None:
        """Begin the script on the first stream connect of a running session."""
        if self.started or self.status != "running":
            return
        self.started = True
        self._emit("session.status_running")
        self._emit_step_or_finish()

    def advance(self, work_id: str) -> None:
        """The user speaks again: the next turn begins, served by work item `work_id`."""
        self.turn_index += 1
        self.turn.work_id, self.status, self.started = work_id, "running", True
        self._emit("user.message", content=[{"type": "text", "text": f"turn {self.turn.number}, please"}])
        self._emit("session.status_running")
        self._emit_step_or_finish()

    def terminate(self, by: str) -> bool:
        """End the session now, whatever is pending; False if it had already ended."""
        if self.status == "terminated":
            return False
        self.status, self.terminated_by = "terminated", by
        self._emit("session.status_terminated")
        return True

    def drop_streams(self) -> int:
        """End every open event stream of this session (without a terminal event)."""
        self.stream_epoch += 1
        return self.streams_open

    def _emit_step_or_finish(self) -> None:
        turn = self.turn
        if turn.step_index >= len(turn.steps):
            self._finish_turn()
            return
        step = turn.steps[turn.step_index]
        tool_use = self._emit(
            "agent.tool_use",
            _event_id("sevt_tooluse_"),
            name=step.name,
            input=dict(step.input),
            evaluated_permission="allow",
        )
        self.tool_uses[tool_use["id"]] = (self.turn_index, turn.step_index)
        self._emit(
            "session.status_idle",
            stop_reason={"type": "requires_action", "event_ids": [tool_use["id"]]},
            stop_details=None,
        )
        if self.spec.terminate_after_results == len(self.results):
            self.terminate("scenario")

    def _finish_turn(self) -> None:
        if self.turn_index + 1 < len(self.turns):
            self._emit("agent.message", content=[{"type": "text", "text": f"finished turn {self.turn.number}"}])
            self.status = "idle"
            self._emit("session.status_idle", stop_reason={"type": "end_turn"}, stop_details=None)
            return
        steps = sum(len(t.steps) for t in self.turns)
        self._emit("agent.message", content=[{"type": "text", "text": f"finished {steps} step(s)"}])
        if self.spec.end == "idle":
            self.status = "idle"
            self._emit("session.status_idle", stop_reason={"type": "end_turn"}, stop_details=None)
        else:
            self.status = "terminated"
            self._emit("session.status_terminated")

    def post_events(self, events: Any) -> list[dict[str, Any]]:
        """Store the posted events (tool results drive the script); returns the stored events."""
        if not isinstance(events, list) or not events:
            raise ApiError(400, "events: a non-empty list is required")
        return [self._post_one(e) for e in events]

    def _post_one(self, event: Any) -> dict[str, Any]:
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ApiError(400, "each event needs a string `type`")
        if event["type"] not in ("user.tool_result", "user.custom_tool_result"):
            return self._emit(event["type"], **{k: v for k, v in event.items() if k not in ("type", "id")})
        use_id = event.get("tool_use_id") or event.get("custom_tool_use_id")
        if use_id not in self.tool_uses:
            raise ApiError(400, f"no tool use {use_id!r} in session {self.id}")
        stored = self._emit(event["type"], **{k: v for k, v in event.items() if k not in ("type", "id")})
        text, is_error = result_text(event.get("content")), event.get("is_error") is True
        if any(r["tool_use_id"] == use_id for r in self.results):
            self.duplicates.append({"tool_use_id": use_id, "is_error": is_error, "text": text})
            return stored
        if self.status == "terminated":  # too late: the session ended with this call pending
            self.late_results.append({"tool_use_id": use_id, "is_error": is_error, "text": text})
            return stored
        turn_index, step_index = self.tool_uses[str(use_id)]
        self._record_result(self.turns[turn_index], step_index, str(use_id), is_error, text)
        if turn_index == self.turn_index:
            self.turn.step_index += 1
            self._emit("session.status_running")
            self._emit_step_or_finish()
        return stored

    def _record_result(self, turn: TurnRecord, step_index: int, use_id: str, is_error: bool, text: str) -> None:
        step = turn.steps[step_index]
        reason = check_expectation(step, is_error, text)
        turn.results.append(
            {
                "tool_use_id": use_id,
                "name": step.name,
                "is_error": is_error,
                "text": text,
                "passed": reason is None,
                "reason": reason,
            }
        )

    def snapshot(self) -> dict[str, Any]:
        """The `/_cp/state` view of this session."""
        results = self.results
        return {
            "session_id": self.id,
            "work_id": self.work_id,
            "work_ids": [t.work_id for t in self.turns if t.work_id is not None],
            "status": self.status,
            "steps": sum(len(t.steps) for t in self.turns),
            "results": [dict(r) for r in results],
            "duplicates": [dict(d) for d in self.duplicates],
            "done": self.done,
            "passed": self.done and all(r["passed"] for r in results),
            "turn": self.turn.number,
            "turns": [t.snapshot() for t in self.turns],
            "terminated_by": self.terminated_by,
            "pending_tool_uses": len(self.pending_tool_uses),
            "late_results": len(self.late_results),
            "streams_dropped": self.streams_dropped,
            "events": len(self.events),
            "credentials_seen": {k: sorted(v) for k, v in sorted(self.credentials_seen.items())},
        }
