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

Tools run as the same user as the worker and can write to this stream too (through
/proc/1/fd/1), so it is hostile input: `parse_event` is total and bounded, and nothing in it
decides the fate of the work item. That comes from the API traffic the daemon relays itself (the
broker, `sandboxd.network.broker`), or, without a broker, from the worker's exit status.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
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
    LEASE_LOST = 3  # a heartbeat met 412: the item belongs to someone else
    ABORTED = 4  # the daemon aborted the session (workspace failed); the item was force-stopped
    HEARTBEAT_REJECTED = 5  # the API refused the lease (4xx); the item was force-stopped
    CANCELLED = 6  # SIGTERM (shutdown or max session duration); the item was force-stopped
    FAILED = 7  # the worker raised, and the item was force-stopped
    UNSTOPPED = 8  # the worker ended without a stop of its item being accepted: the daemon stops it


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
    """What a sandbox tells the daemon on its stdout: advisory only (metrics, stall hints)."""

    READY = "ready"
    HEARTBEAT = "heartbeat"  # believed only without a broker (network_mode other than none)
    TOOL_START = "tool_start"
    TOOL_END = "tool_end"


class Dropped(enum.StrEnum):
    """Why a stdout line was not taken as an event (the `reason` of sandboxd_sandbox_output_dropped_total)."""

    MALFORMED = "malformed"  # not JSON, or not a JSON object
    OVERSIZED = "oversized"  # longer than MAX_EVENT_LINE
    NOT_AN_EVENT = "not_an_event"  # JSON, but not an event this daemon knows, or a field out of bounds
    RATE_LIMITED = "rate_limited"  # more events per second than a worker makes (a tool forging them)


MAX_EVENT_LINE = 4096
_MAX_NAME = 64
_LATEST_TIME = 1e11  # wall clock seconds: year 5138


@dataclass(frozen=True)
class SandboxEvent:
    """One event as the daemon takes it: every field typed and bounded."""

    kind: Event
    at: float  # wall clock, as the sandbox claims it
    tool: str = ""
    ok: bool = False
    seconds: float | None = None


def event_line(event: Event, at: float, **fields: Any) -> bytes:
    return _line({EVENT_KEY: event.value, "t": round(at, 3), **fields})


def parse_event(raw: bytes) -> SandboxEvent | Dropped:
    """One stdout line of a sandbox as an event, or why it is none. Total: never raises, whatever `raw` is."""
    if len(raw) > MAX_EVENT_LINE:
        return Dropped.OVERSIZED
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return Dropped.MALFORMED
    if not isinstance(message, dict):
        return Dropped.MALFORMED
    kind, at = message.get(EVENT_KEY), _number(message.get("t"))
    if not isinstance(kind, str) or kind not in _EVENTS or at is None or not 0 <= at < _LATEST_TIME:
        return Dropped.NOT_AN_EVENT
    tool = message.get("tool")
    seconds = _number(message.get("seconds"))
    return SandboxEvent(
        Event(kind), at,
        tool=tool if isinstance(tool, str) and len(tool) <= _MAX_NAME else "",
        ok=message.get("outcome") == "ok",
        seconds=seconds if seconds is not None and 0 <= seconds < _LATEST_TIME else None,
    )


_EVENTS = frozenset(e.value for e in Event)


def _number(value: object) -> float | None:
    """A finite float from a JSON number (bools and huge integers are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class LineSplitter:
    """Splits a byte stream into lines of at most MAX_EVENT_LINE bytes; longer ones come out as OVERSIZED.

    Memory stays bounded whatever arrives: an endless line is dropped as it streams past.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[bytes | Dropped]:
        out: list[bytes | Dropped] = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._take(chunk[start:end], out, complete=True)
            start = end + 1
        self._take(chunk[start:], out, complete=False)
        return out

    def _take(self, piece: bytes, out: list[bytes | Dropped], *, complete: bool) -> None:
        if not self._skipping:
            self._buffer += piece
            if len(self._buffer) > MAX_EVENT_LINE:
                out.append(Dropped.OVERSIZED)
                self._buffer.clear()
                self._skipping = True
        if complete:
            if not self._skipping and self._buffer.strip():
                out.append(bytes(self._buffer))
            self._buffer.clear()
            self._skipping = False


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
