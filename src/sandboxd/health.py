"""What /healthz and /readyz answer: is the main loop making progress, is the daemon able to work.

Liveness is the event loop ticking (a blocked loop stops ticking). Readiness additionally needs
the Docker engine to answer and a poll to have succeeded recently, unless the daemon is at
capacity and so, by design, not polling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class HealthState:
    """Shared by the daemon's loops (writers) and the HTTP endpoints (readers)."""

    poll_window_seconds: float
    seconds_since_poll: Callable[[], float | None] = lambda: None
    at_capacity: Callable[[], bool] = lambda: False
    liveness_window_seconds: float = 30.0
    engine_ok: bool = False
    polling: bool = False  # the poll loop is running (false before start-up and after shutdown began)
    started_at: float = field(default_factory=time.monotonic)
    last_tick: float = field(default_factory=time.monotonic)

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def live(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self.last_tick
        if stalled > self.liveness_window_seconds:
            return False, f"main loop stalled for {stalled:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        if not self.engine_ok:
            return False, "docker engine not answering"
        if not self.polling:
            return False, "not polling"
        if self.at_capacity():
            return True, "ok (at capacity)"
        since = self.seconds_since_poll()
        if since is None:
            if time.monotonic() - self.started_at > self.poll_window_seconds:
                return False, "no poll has succeeded yet"
            return False, "waiting for the first poll"
        if since > self.poll_window_seconds:
            return False, f"last successful poll {since:.0f}s ago"
        return True, "ok"
