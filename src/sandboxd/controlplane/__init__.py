"""A local stand-in for the Claude Managed Agents control plane (work queue, sessions, events, skills).

Serves, on 127.0.0.1, what the anthropic SDK's `EnvironmentWorker` speaks
(see /work/shared/reference/managed-agents-wire.md), driven by a `Scenario`
of scripted sessions, plus an unauthenticated `/_cp/...` admin surface.
Use `ControlPlane` in-process, or `python -m sandboxd.controlplane`.
"""

from .scenario import (
    Expect,
    FaultPlan,
    FaultRule,
    Scenario,
    ScriptedSession,
    SkillSpec,
    ToolStep,
    load_scenario,
    six_tool_session,
)
from .server import ControlPlane, EnqueuedSession, write_secret_files

__all__ = [
    "ControlPlane",
    "EnqueuedSession",
    "Expect",
    "FaultPlan",
    "FaultRule",
    "Scenario",
    "ScriptedSession",
    "SkillSpec",
    "ToolStep",
    "load_scenario",
    "six_tool_session",
    "write_secret_files",
]
