"""Scenario types for the local control plane (pydantic, loadable from JSON).

Owns what a run is scripted with: the environment and its keys, lease and
reclaim timings, and the scripted sessions (tool steps with expectations, how
the session ends, its secret and skills). Also builds the six-tool demo session.
No HTTP and no mutable run state here.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SessionEnd = Literal["terminate", "idle"]
SecretMode = Literal["token", "none", "garbage"]
SessionStatus = Literal["running", "idle", "terminated"]


def _environment_key() -> str:
    return f"sk-ant-oat01-local-{secrets.token_hex(16)}"


def _api_key() -> str:
    return f"sk-ant-api03-local-{secrets.token_hex(16)}"


def new_session_id() -> str:
    """A fresh `sesn_...` id."""
    return f"sesn_{secrets.token_hex(12)}"


class Expect(BaseModel):
    """What a tool result must look like; `None`/empty means "not checked"."""

    model_config = ConfigDict(extra="forbid")

    is_error: bool | None = None
    contains: list[str] = Field(default_factory=list)
    not_contains: list[str] = Field(default_factory=list)


class ToolStep(BaseModel):
    """One scripted `agent.tool_use`: tool name, input, and the expected result."""

    model_config = ConfigDict(extra="forbid")

    name: str
    input: dict[str, Any] = Field(default_factory=dict)
    expect: Expect = Field(default_factory=Expect)


class SkillSpec(BaseModel):
    """A custom skill attached to a session's agent, served as a zip archive."""

    model_config = ConfigDict(extra="forbid")

    skill_id: str
    version: str = "1"
    name: str
    description: str = ""
    files: dict[str, str] = Field(default_factory=lambda: {"SKILL.md": "# skill\n"})


class ScriptedSession(BaseModel):
    """A session whose agent emits `steps` one at a time, then ends per `end`."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(default_factory=new_session_id)
    title: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    steps: list[ToolStep] = Field(default_factory=list)
    end: SessionEnd = "terminate"
    secret: SecretMode = "token"
    skills: list[SkillSpec] = Field(default_factory=list)
    heartbeat_status: int | None = Field(default=None, ge=400, le=599)
    status: SessionStatus = "running"


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
