"""Time for the local control plane.

Owns the RFC 3339 wall-clock stamps (with microseconds) put on work items and
events, the strictly increasing heartbeat stamps, and the monotonic clock used
for leases, reclaim windows and worker liveness.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

_lock = threading.Lock()
_last_stamp = datetime.fromtimestamp(0, UTC)


def monotonic() -> float:
    """Seconds on the monotonic clock (leases and windows are measured on it)."""
    return time.monotonic()


def format_rfc3339(moment: datetime) -> str:
    """`2026-01-02T03:04:05.123456Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with microseconds."""
    return format_rfc3339(datetime.now(UTC))


def unique_rfc3339() -> str:
    """Like `now_rfc3339`, but strictly later than every earlier call (process-wide)."""
    global _last_stamp
    with _lock:
        moment = datetime.now(UTC)
        if moment <= _last_stamp:
            moment = _last_stamp + timedelta(microseconds=1)
        _last_stamp = moment
    return format_rfc3339(moment)
