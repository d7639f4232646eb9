"""Scenario types for the local control plane (pydantic, loadable from JSON).

Owns what a run is scripted with: the environment and its keys, lease and
reclaim timings, the scripted sessions (turns of tool steps with expectations,
each an agent-toolset call under a permission policy or a custom tool call; how
the session ends, its secret and skills) and the fault plan (seeded API
errors, delays and dropped streams). Also builds the six-tool demo session.
No HTTP and no mutable run state here.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SessionEnd = Literal["terminate", "idle"]
SecretMode = Literal["token", "none", "garbage"]
SessionStatus = Literal["running", "idle", "terminated"]
Permission = Literal["allow", "ask", "deny"]
Confirmation = Literal["allow", "deny"]
FaultRoute = Literal[
    "poll", "ack", "heartbeat", "stop", "stats", "session", "stream", "events_list", "events_send",
    "skill_version", "skill_content",
]
FaultKind = Literal["error", "delay", "drop"]


def _environment_key() -> str:
    return f"sk-ant-oat01-local-{secrets.token_hex(16)}"


def _api_key() -> str:
    return f"sk-ant-api03-local-{secrets.token_hex(16)}"


def new_session_id() -> str:
    """A fresh `sesn_...` id."""
    return f"sesn_{secrets.token_hex(12)}"


class Expect(BaseModel):
    """What a tool result must look like; `None`/empty means "not checked".

    `confirmation` (steps with permission `ask`): the user's decision the step expects. The result
    checks apply only to a result that arrived: a denied call has none.
    """

    model_config = ConfigDict(extra="forbid")

    is_error: bool | None = None
    contains: list[str] = Field(default_factory=list)
    not_contains: list[str] = Field(default_factory=list)
    confirmation: Confirmation | None = None


class ToolStep(BaseModel):
    """One scripted tool call: tool name, input, how it is governed, and the expected result.

    An agent-toolset call (`agent.tool_use`) carries the server's `evaluated_permission`:
    `allow` (always_allow: the environment's worker runs it at once), `ask` (always_ask: the
    session goes idle until the user sends a `user.tool_confirmation`; allow lets the worker run
    it, deny means it never runs and the agent goes on) or `deny` (refused by the server: never
    runs, nothing waits for it). `custom=True` makes it an `agent.custom_tool_use` instead, which
    the application answers with a `user.custom_tool_result` (permission policies do not apply).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    expect: Expect = Field(default_factory=Expect)
    permission: Permission = "allow"
    custom: bool = False

    @model_validator(mode="after")
    def _custom_tools_have_no_policy(self) -> ToolStep:
        if self.custom and self.permission != "allow":
            raise ValueError("permission policies do not apply to custom tools")
        if self.expect.confirmation is not None and self.permission != "ask":
            raise ValueError("expect.confirmation applies to steps with permission `ask` only")
        return self


class SkillSpec(BaseModel):
    """A custom skill attached to a session's agent, served as a zip archive."""

    model_config = ConfigDict(extra="forbid")

    skill_id: str
    version: str = "1"
    name: str
    description: str = ""
    files: dict[str, str] = Field(default_factory=lambda: {"SKILL.md": "# skill\n"})


class ScriptedSession(BaseModel):
    """A session whose agent emits its tool steps one at a time, turn by turn, then ends per `end`.

    `steps` is a one-turn script; `turns` a multi-turn one (give one or the other). Each turn is
    served by its own work item: once a finished turn's item is stopped, the user "speaks again",
    the next turn's tool uses are emitted and a new item (with a new sessions token) is queued.
    `terminate_after_results=n` terminates the session right after emitting the tool use that
    follows the n-th result, so it ends with that call still pending.
    """

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(default_factory=new_session_id)
    title: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    steps: list[ToolStep] = Field(default_factory=list)
    turns: list[list[ToolStep]] = Field(default_factory=list)
    end: SessionEnd = "terminate"
    secret: SecretMode = "token"
    skills: list[SkillSpec] = Field(default_factory=list)
    heartbeat_status: int | None = Field(default=None, ge=400, le=599)
    status: SessionStatus = "running"
    terminate_after_results: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _steps_or_turns(self) -> ScriptedSession:
        if self.steps and self.turns:
            raise ValueError("give `steps` (one turn) or `turns`, not both")
        return self

    @property
    def script(self) -> list[list[ToolStep]]:
        """Every turn's steps; a `steps` session is one turn."""
        return [list(t) for t in self.turns] if self.turns else [list(self.steps)]


class FaultRule(BaseModel):
    """Inject a fault into a fraction `rate` of one route's requests.

    `error`: answer `status` before the request is applied. `delay`: hold the request
    `delay_seconds` first (a caller that gave up meanwhile is not applied, as if the request
    never arrived). `drop` (route `stream` only): end the event stream, without a terminal
    event, after `after_events` live events.
    """

    model_config = ConfigDict(extra="forbid")

    route: FaultRoute
    kind: FaultKind = "error"
    rate: float = Field(ge=0.0, le=1.0)
    status: int = Field(default=503, ge=400, le=599)
    delay_seconds: float = Field(default=1.0, ge=0.0, le=600.0)
    after_events: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _drop_is_for_streams(self) -> FaultRule:
        if self.kind == "drop" and self.route != "stream":
            raise ValueError("kind `drop` applies to route `stream` only")
        return self


class FaultPlan(BaseModel):
    """The seeded fault rules; a request's fate depends only on (seed, rule, route, request number)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    rules: list[FaultRule] = Field(default_factory=list)


class Scenario(BaseModel):
    """Everything a control-plane run starts from. Keys are never shown in `repr`."""

    model_config = ConfigDict(extra="forbid")

    environment_id: str = "env_local"
    environment_key: str = Field(default_factory=_environment_key, repr=False)
    api_key: str = Field(default_factory=_api_key, repr=False)
    lease_ttl_seconds: int = Field(default=60, ge=1)
    reclaim_older_than_ms: int = Field(default=5000, ge=1)
    sessions: list[ScriptedSession] = Field(default_factory=list)
    healthchecks: int = Field(default=0, ge=0)
    faults: FaultPlan = Field(default_factory=FaultPlan)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario JSON file."""
    return Scenario.model_validate_json(Path(path).read_text(encoding="utf-8"))


def six_tool_session(tag: str, *, end: SessionEnd = "terminate", directory: str = "notes") -> ScriptedSession:
    """A session that runs bash, write, read, edit, glob and grep once each.

    Paths are relative (`notes/hello.txt`), so they resolve inside the worker's
    workdir (the SDK's file tools confine paths to it). `tag` makes the file
    content and the bash marker unique to this session.
    """
    path = f"{directory}/hello.txt"
    marker, line, edited = f"sandboxd-bash-{tag}", f"hello {tag}", f"edited {tag}"
    steps = [
        ToolStep(
            name="bash",
            input={"command": f"echo {marker} && pwd"},
            expect=Expect(is_error=False, contains=[marker]),
        ),
        ToolStep(
            name="write",
            input={"file_path": path, "content": f"{line}\nsecond line\n"},
            expect=Expect(is_error=False, contains=["wrote", path]),
        ),
        ToolStep(
            name="read",
            input={"file_path": path},
            expect=Expect(is_error=False, contains=[line, "second line"]),
        ),
        ToolStep(
            name="edit",
            input={"file_path": path, "old_string": "second line", "new_string": edited},
            expect=Expect(is_error=False, contains=["1 replacement"]),
        ),
        ToolStep(
            name="glob",
            input={"pattern": f"{directory}/*.txt"},
            expect=Expect(is_error=False, contains=["hello.txt"], not_contains=["no matches"]),
        ),
        ToolStep(
            name="grep",
            input={"pattern": edited, "path": directory},
            expect=Expect(is_error=False, contains=[edited, "hello.txt"], not_contains=["second line"]),
        ),
    ]
    return ScriptedSession(title=f"six tools {tag}", metadata={"tag": tag}, steps=steps, end=end)
