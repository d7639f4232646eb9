"""The contract between the daemon and the entrypoint inside a sandbox container.

The daemon starts the container first and only then writes JSON lines to its stdin (the attach
stream, which neither `docker inspect` nor `/proc/<pid>/environ` shows):

    {"type": "assignment", "work_id": ..., "environment_id": ..., "session_id": ..., "secret": ...}
    {"type": "workspace_ready"}                       tool calls may run now
    {"type": "abort", "reason": "..."}                 stop the item and exit (workspace failed)

The entrypoint claims the lease with its first heartbeat at once, and holds the session (so every
tool call) until `workspace_ready`: the lease never lapses while the daemon fetches the workspace.
End of stdin before `workspace_ready` means the daemon is gone and is treated as an abort.
The entrypoint's exit code tells the daemon how the item ended (`ExitCode`).

The other direction is the container's stdout (its log lines go to stderr): one JSON object per
line with an `event` (`Event`) and a wall-clock time `t`. The daemon follows it, also after a
restart (it re-reads the whole stream, so the state it derives is the same for an adopted sandbox):

    {"event": "ready", "t": ...}                        SDK imported; waiting for an assignment
    {"event": "heartbeat", "t": ..., "first": true}     a heartbeat was accepted (first: the lease is ours)
    {"event": "tool_start", "t": ..., "tool": "bash"}
    {"event": "tool_end", "t": ..., "tool": "bash", "outcome": "ok", "seconds": 0.4}
    {"event": "stopped", "t": ...}                      the worker stopped its item: never stop it again
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from dataclasses import dataclass
from typing import Any

ASSIGNMENT = "assignment"
EVENT_KEY = "event"
WORKSPACE_READY = "workspace_ready"
ABORT = "abort"


class ExitCode(enum.IntEnum):
    """How a sandbox's work item ended, as its entrypoint's exit status."""

    SERVED = 0  # the session ran and the container force-stopped its own item
    ERROR = 1  # a crash before or around the worker (Python's own status): the item may not be stopped
    BAD_ASSIGNMENT = 2  # stdin did not carry a valid assignment; nothing was claimed
    LEASE_LOST = 3  # a heartbeat met 412 or none succeeded for a TTL: the item belongs to someone else
    ABORTED = 4  # the daemon aborted the session (workspace failed); the item was force-stopped
    HEARTBEAT_REJECTED = 5  # the API refused the lease (4xx); the item was force-stopped
    CANCELLED = 6  # SIGTERM (shutdown or max session duration); the item was force-stopped
    FAILED = 7  # the worker raised, and the item was force-stopped (or its lease was gone)


@dataclass(frozen=True)
class Assignment:
    """One claimed work item, as handed to a sandbox. `secret` is never logged."""

    work_id: str
    environment_id: str
    session_id: str
    secret: str | None

    def to_line(self, environment_key: str | None = None) -> bytes:
        """The stdin line; `environment_key` only when the operator allowed it for secret-less items."""
        message: dict[str, Any] = {"type": ASSIGNMENT, **self.__dict__}
        if environment_key:
            message["environment_key"] = environment_key
        return _line(message)

    def __repr__(self) -> str:  # keep the secret out of reprs and tracebacks
        return f"Assignment(work_id={self.work_id!r}, session_id={self.session_id!r})"

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Assignment:
        fields = {}
        for name in ("work_id", "environment_id", "session_id"):
            value = message.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"assignment field {name!r} is missing or not a string")
            fields[name] = value
        secret = message.get("secret")
        if secret is not None and not isinstance(secret, str):
            raise ValueError("assignment field 'secret' is not a string")
        return cls(secret=secret, **fields)


def workspace_ready_line() -> bytes:
    return _line({"type": WORKSPACE_READY})


def abort_line(reason: str) -> bytes:
    return _line({"type": ABORT, "reason": reason})


class Event(enum.StrEnum):
    """What a sandbox tells the daemon on its stdout."""

    READY = "ready"
    HEARTBEAT = "heartbeat"
    TOOL_START = "tool_start"
    TOOL_END = "tool_end"
    STOPPED = "stopped"  # the worker's stop of its item was accepted (or was already done: 409)


def event_line(event: Event, at: float, **fields: Any) -> bytes:
    return _line({EVENT_KEY: event.value, "t": round(at, 3), **fields})


def parse_event(raw: bytes) -> dict[str, Any] | None:
    """One stdout line of a sandbox as an event, or None when it is not one (never raises)."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get(EVENT_KEY) not in set(Event):
        return None
    if not isinstance(message.get("t"), int | float):
        return None
    return message


def parse_line(raw: bytes) -> dict[str, Any]:
    """Decode one stdin line; raises ValueError when it is not a JSON object with a `type`."""
    message = json.loads(raw)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError("a control message must be a JSON object with a string `type`")
    return message


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def sessions_token_from_secret(secret: str | None) -> str | None:
    """The sessions token inside a work item's `secret` (url-safe base64 JSON), or None.

    Mirrors the SDK's own decoding so the daemon can tell, before launching anything, whether a
    sandbox will be able to run on the item's own credential.
    """
    if not secret:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    except (ValueError, TypeError, binascii.Error):
        return None
    token = payload.get("sessions_token") if isinstance(payload, dict) else None
    return token if isinstance(token, str) and token else None
