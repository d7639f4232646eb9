"""Scripted sessions of the local control plane (no HTTP, no locking).

Owns one session's event log and its script, turn by turn: emit a step as
`agent.tool_use` plus a `requires_action` idle, check each posted
`user.tool_result` against the step's expectations, move on, and end a turn
with `agent.message` then an `end_turn` idle (the last turn: a termination or
that idle, per `end`). `advance` starts the next turn (the user speaks again).

Calls that wait on the user, as the Managed Agents API documents them: a step
under `always_ask` is an `agent.tool_use` with `evaluated_permission: "ask"`
(and `evaluation: {"type": "always_ask"}`), a custom tool call an
`agent.custom_tool_use`; either is followed by a `session.status_idle` whose
`stop_reason` is `{"type": "requires_action", "event_ids": [<call id>]}`, and the
session's status is `idle` until the user resolves it. A `user.tool_confirmation`
(`tool_use_id`, `result` allow|deny, `deny_message` only with deny) is stored in
the log, where the worker's runner reads it, and the session goes back to
`running`: allowed, the call waits for the worker's `user.tool_result`; denied, it
never runs (a result for it is refused) and the agent goes on. A
`user.custom_tool_result` (`custom_tool_use_id`) answers a custom call the same
way a tool result answers a builtin one. A step whose `evaluated_permission` is
`deny` (refused by the server) waits for nothing. Each posted event is recorded
with the credential kind that posted it, so a test can tell the worker (its
sessions token) from the application (the API key); an event the API refuses
(wrong result type, a result for a denied or unconfirmed call, a second
confirmation) is a 400 and is kept in `refused_events`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from .clock import now_rfc3339
from .errors import ApiError
from .scenario import ScriptedSession, ToolStep

RESULT_KEYS = {"user.tool_result": "tool_use_id", "user.custom_tool_result": "custom_tool_use_id"}

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


def check_expectation(
    step: ToolStep, is_error: bool | None, text: str | None, confirmation: str | None = None
) -> str | None:
    """Why a call's outcome fails `step.expect`, or None when it passes.

    A denied call (`is_error`/`text` None: no result) is checked for its confirmation only."""
    expect = step.expect
    if expect.confirmation is not None and confirmation != expect.confirmation:
        return f"confirmation={confirmation}, expected {expect.confirmation}"
    if is_error is None or text is None:
        return None
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
class ToolUse:
    """One emitted call: where its step is, how the server evaluated it, and the user's decision."""

    turn_index: int
    step_index: int
    name: str
    custom: bool
    permission: str
    confirmation: str | None = None
    confirmed_by: str | None = None

    @property
    def event_type(self) -> str:
        return "agent.custom_tool_use" if self.custom else "agent.tool_use"

    @property
    def result_type(self) -> str:
        return "user.custom_tool_result" if self.custom else "user.tool_result"

    @property
    def denied(self) -> bool:
        return "deny" in (self.permission, self.confirmation)

    @property
    def unconfirmed(self) -> bool:
        return self.permission == "ask" and self.confirmation is None


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
    tool_uses: dict[str, ToolUse] = field(default_factory=dict)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    late_results: list[dict[str, Any]] = field(default_factory=list)
    confirmations: list[dict[str, Any]] = field(default_factory=list)
    refused_events: list[dict[str, Any]] = field(default_factory=list)
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
    def awaiting_user(self) -> list[dict[str, str]]:
        """The calls the session waits on the user for: a confirmation, or a custom tool's result."""
        if self.status == "terminated":
            return []
        waiting = []
        for use_id in self.pending_tool_uses:
            use = self.tool_uses[use_id]
            if use.custom or use.unconfirmed:
                needs = use.result_type if use.custom else "user.tool_confirmation"
                waiting.append({"event_id": use_id, "type": use.event_type, "name": use.name, "awaiting": needs})
        return waiting

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

    def _agent_tools(self) -> list[dict[str, Any]]:
        """The agent's `tools`: the toolset (always_ask for the tools the script asks about) and custom tools."""
        steps = [s for turn in self.spec.script for s in turn]
        asked = sorted({s.name for s in steps if s.permission == "ask"})
        custom = sorted({s.name for s in steps if s.custom})
        ask = {"type": "always_ask"}
        toolset = {
            "type": "agent_toolset_20260401",
            "default_config": {"enabled": True, "permission_policy": {"type": "always_allow"}},
            "configs": [{"type": n, "name": n, "enabled": True, "permission_policy": ask} for n in asked],
        }
        schema = {"type": "object", "properties": {}}
        return [toolset, *({"type": "custom", "name": n, "description": n, "input_schema": schema} for n in custom)]

    def to_json(self) -> dict[str, Any]:
        """The `BetaManagedAgentsSession` object (the fields the worker reads, and more)."""
        skills = [{"type": "custom", "skill_id": s.skill_id, "version": s.version} for s in self.spec.skills]
        return {
            "type": "session",
            "id": self.id,
            "status": self.status,
            "title": self.spec.title,
            "metadata": dict(self.spec.metadata),
            "agent": {
                "type": "agent", "id": "agent_local", "name": "local-agent", "skills": skills,
                "tools": self._agent_tools(),
            },
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
        """Emit the current step's call and the idle that waits on it (a refused call waits for
        nothing: the next step follows); after the last step, finish the turn."""
        turn = self.turn
        while turn.step_index < len(turn.steps):
            step = turn.steps[turn.step_index]
            use_id = self._emit_call(step)
            if step.permission == "deny":
                self._record_result(turn, turn.step_index, use_id, None, None, None)
                turn.step_index += 1
                continue
            if step.custom or step.permission == "ask":
                self.status = "idle"  # the session waits on the user
            self._emit(
                "session.status_idle",
                stop_reason={"type": "requires_action", "event_ids": [use_id]},
                stop_details=None,
            )
            if self.spec.terminate_after_results == len(self.results):
                self.terminate("scenario")
            return
        self._finish_turn()

    def _emit_call(self, step: ToolStep) -> str:
        """The step's `agent.custom_tool_use`, or its `agent.tool_use` with the server's evaluation."""
        if step.custom:
            event = self._emit(
                "agent.custom_tool_use", _event_id("sevt_customtool_"), name=step.name, input=dict(step.input)
            )
        else:
            # A refusal before any policy applied has no `evaluation` (the API reference).
            policy = {"allow": "always_allow", "ask": "always_ask"}.get(step.permission)
            evaluation = {"evaluation": {"type": policy}} if policy else {}
            event = self._emit(
                "agent.tool_use",
                _event_id("sevt_tooluse_"),
                name=step.name,
                input=dict(step.input),
                evaluated_permission=step.permission,
                **evaluation,
            )
        turn = self.turn
        self.tool_uses[event["id"]] = ToolUse(self.turn_index, turn.step_index, step.name, step.custom, step.permission)
        return str(event["id"])

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

    def post_events(self, events: Any, by: str = "unknown") -> list[dict[str, Any]]:
        """Store the posted events (results and confirmations drive the script); returns the stored events.

        `by` is the kind of credential that posted them (recorded with each result and confirmation)."""
        if not isinstance(events, list) or not events:
            raise ApiError(400, "events: a non-empty list is required")
        return [self._post_one(e, by) for e in events]

    def _refuse(self, event: dict[str, Any], use_id: Any, by: str, reason: str) -> ApiError:
        self.refused_events.append({"type": event["type"], "tool_use_id": use_id, "by": by, "reason": reason})
        return ApiError(400, reason)

    def _post_one(self, event: Any, by: str) -> dict[str, Any]:
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise ApiError(400, "each event needs a string `type`")
        if event["type"] == "user.tool_confirmation":
            return self._confirm(event, by)
        if event["type"] not in RESULT_KEYS:
            return self._emit(event["type"], **{k: v for k, v in event.items() if k not in ("type", "id")})
        use_id = event.get(RESULT_KEYS[event["type"]])
        if use_id not in self.tool_uses:
            raise self._refuse(event, use_id, by, f"no tool use {use_id!r} in session {self.id}")
        use = self.tool_uses[str(use_id)]
        if event["type"] != use.result_type:
            raise self._refuse(event, use_id, by, f"{use_id} is an {use.event_type}: answer it with {use.result_type}")
        if use.denied:
            raise self._refuse(event, use_id, by, f"tool use {use_id} was denied: it has no result")
        if use.unconfirmed:
            raise self._refuse(event, use_id, by, f"tool use {use_id} awaits a user.tool_confirmation")
        stored = self._emit(event["type"], **{k: v for k, v in event.items() if k not in ("type", "id")})
        text, is_error = result_text(event.get("content")), event.get("is_error") is True
        if any(r["tool_use_id"] == use_id for r in self.results):
            self.duplicates.append({"tool_use_id": use_id, "is_error": is_error, "text": text, "posted_by": by})
            return stored
        if self.status == "terminated":  # too late: the session ended with this call pending
            self.late_results.append({"tool_use_id": use_id, "is_error": is_error, "text": text, "posted_by": by})
            return stored
        self._record_result(self.turns[use.turn_index], use.step_index, str(use_id), is_error, text, by)
        if use.turn_index == self.turn_index:
            self._next_step()
        return stored

    def _confirm(self, event: dict[str, Any], by: str) -> dict[str, Any]:
        """A `user.tool_confirmation`: allow lets the worker run the call; deny skips it for good."""
        use_id, result, message = event.get("tool_use_id"), event.get("result"), event.get("deny_message")
        if result not in ("allow", "deny"):
            raise self._refuse(event, use_id, by, "result must be `allow` or `deny`")
        if message is not None and (result != "deny" or not isinstance(message, str)):
            raise self._refuse(event, use_id, by, "deny_message: a string, only allowed when result is `deny`")
        use = self.tool_uses.get(str(use_id))
        if use is None or use.custom:
            raise self._refuse(event, use_id, by, f"no agent.tool_use {use_id!r} in session {self.id}")
        if use.permission != "ask":
            raise self._refuse(event, use_id, by, f"tool use {use_id} does not require confirmation")
        if use.confirmation is not None:
            raise self._refuse(event, use_id, by, f"tool use {use_id} was already confirmed ({use.confirmation})")
        stored = self._emit("user.tool_confirmation", **{k: v for k, v in event.items() if k not in ("type", "id")})
        if self.status == "terminated":
            self.late_results.append({"tool_use_id": use_id, "confirmation": result, "posted_by": by})
            return stored
        use.confirmation, use.confirmed_by = result, by
        self.confirmations.append({"tool_use_id": use_id, "result": result, "by": by})
        if result == "deny":
            self._record_result(self.turns[use.turn_index], use.step_index, str(use_id), None, None, None)
            if use.turn_index == self.turn_index:
                self._next_step()
                return stored
        self.status = "running"
        self._emit("session.status_running")
        return stored

    def _next_step(self) -> None:
        """The current step is resolved: the session runs again, and the next step follows."""
        self.turn.step_index += 1
        self.status = "running"
        self._emit("session.status_running")
        self._emit_step_or_finish()

    def _record_result(
        self, turn: TurnRecord, step_index: int, use_id: str, is_error: bool | None, text: str | None, by: str | None
    ) -> None:
        """A call's outcome: its result (posted `by`), or none when it was denied."""
        step, use = turn.steps[step_index], self.tool_uses[use_id]
        reason = check_expectation(step, is_error, text, use.confirmation)
        turn.results.append(
            {
                "tool_use_id": use_id,
                "name": step.name,
                "type": use.event_type,
                "evaluated_permission": None if use.custom else use.permission,
                "confirmation": use.confirmation,
                "confirmed_by": use.confirmed_by,
                "ran": by is not None,
                "is_error": is_error,
                "text": text,
                "posted_by": by,
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
            "awaiting_user": self.awaiting_user,
            "confirmations": [dict(c) for c in self.confirmations],
            "refused_events": [dict(r) for r in self.refused_events],
            "late_results": len(self.late_results),
            "streams_dropped": self.streams_dropped,
            "events": len(self.events),
            "credentials_seen": {k: sorted(v) for k, v in sorted(self.credentials_seen.items())},
        }
