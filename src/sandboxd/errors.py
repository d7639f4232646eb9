"""The exception tree of sandboxd, in one place so callers can tell a bad work item from a bug.

    SandboxdError
    ├── ConfigError          a setting is missing or wrong; the process exits 2 at start-up
    ├── EngineError          the Docker engine cannot be reached or refused a call
    │   └── LaunchError      a session's container could not be created or started (reason label)
    └── WorkItemError        one work item cannot be served (no usable secret, bad metadata, ...)
        └── WorkspaceError   the workspace could not be prepared (reason label); see sandboxd.workspace
            └── SnapshotError    a kept workspace could not be saved (sandboxd.workspace.snapshot);
                                 nothing is kept (no silent roll-back), the session is not failed for it

Anything else raised while serving a work item is a bug: it fails that item, is logged with its
traceback, and the daemon keeps serving the others.
"""

from __future__ import annotations


class SandboxdError(Exception):
    """Base of every error sandboxd raises on purpose."""


class ConfigError(SandboxdError):
    """A setting is missing or invalid; the message names the setting."""


class EngineError(SandboxdError):
    """The container engine failed a call."""


class LaunchError(EngineError):
    """A session container could not be created or started.

    `reason` is a short, bounded label (for example `image_missing`, `engine_unavailable`) used
    as a metric label, so it never contains ids or free text.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class WorkItemError(SandboxdError):
    """One work item cannot be served; it is force-stopped and the daemon goes on."""

    reason = "invalid_work_item"


class WorkspaceError(WorkItemError):
    """The session's workspace could not be prepared; `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
