"""What a sandbox is to the daemon: its identity, its labels, and the assignment recorded on the engine.

Everything sandboxd creates on the engine carries `LABEL_MANAGED`, `LABEL_INSTANCE` (which daemon
owns it: `worker_id`) and `LABEL_SANDBOX` (which sandbox it belongs to), so a restarted daemon
finds its own and nothing else. The assignment record is what survives a daemon restart.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .settlement import ItemRef

LABEL_MANAGED = "io.sandboxd.managed"
LABEL_INSTANCE = "io.sandboxd.instance"
LABEL_SANDBOX = "io.sandboxd.sandbox"  # the container's name, on everything that belongs to it
LABEL_ROLE = "io.sandboxd.role"  # "workspace" or "assignment" on volumes
LABEL_IMAGE_ID = "io.sandboxd.image-id"
LABEL_CREATED = "io.sandboxd.created-at"
LABEL_WORK_ID = "io.sandboxd.work-id"
LABEL_SESSION_ID = "io.sandboxd.session-id"
LABEL_ENVIRONMENT_ID = "io.sandboxd.environment-id"
LABEL_STARTED = "io.sandboxd.started-at"
LABEL_DEADLINE = "io.sandboxd.deadline"
WORKSPACE = "/workspace"


@dataclass(frozen=True)
class AssignmentRecord:
    """What the daemon must know about an assigned sandbox after a restart.

    Kept on the engine, as the labels of a small volume created with the assignment, so it
    survives the daemon (and its state directory) as long as the sandbox does.
    """

    item: ItemRef
    started_at: float  # wall clock: the claim
    deadline: float  # wall clock: max_session_seconds after the claim

    def labels(self) -> dict[str, str]:
        return {
            LABEL_WORK_ID: self.item.work_id,
            LABEL_SESSION_ID: self.item.session_id,
            LABEL_ENVIRONMENT_ID: self.item.environment_id,
            LABEL_STARTED: f"{self.started_at:.3f}",
            LABEL_DEADLINE: f"{self.deadline:.3f}",
        }

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> AssignmentRecord | None:
        try:
            item = ItemRef(labels[LABEL_WORK_ID], labels[LABEL_ENVIRONMENT_ID], labels[LABEL_SESSION_ID])
            return cls(item, float(labels[LABEL_STARTED]), float(labels[LABEL_DEADLINE]))
        except (KeyError, ValueError):
            return None


@dataclass
class Sandbox:
    """One sandbox container with its workspace volume, its open stdin and (once assigned) its record."""

    container_id: str
    name: str
    image_id: str = ""
    created_at: float = 0.0  # wall clock
    stdin: socket.socket | None = None
    record: AssignmentRecord | None = None

    @property
    def volume(self) -> str:
        return self.name + "-workspace"

    @property
    def record_volume(self) -> str:
        return self.name + "-assignment"


@dataclass(frozen=True)
class Found:
    """A sandbox of this instance found on the engine at start-up."""

    sandbox: Sandbox
    running: bool
    exit_status: int
    oom_killed: bool


def parse_float(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0
