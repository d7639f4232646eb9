"""The daemon's lifecycle: claim work within capacity, supervise sessions, shut down gracefully.

A capacity slot is acquired *before* the next item is claimed, so the daemon never holds work it
cannot start. Shutdown (first SIGTERM/SIGINT) stops claiming at once and gives running sessions
`shutdown_grace_seconds` as a deadline on their cancel scope; past it (or on a second signal)
their sandboxes are stopped, and each sandbox's worker force-stops its item. Drain mode claims
until the queue is empty, waits for every session and reports a summary.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import anyio
import anyio.abc
from anthropic import APIStatusError
from anthropic.types.beta.environments import BetaSelfHostedWork

from .containers import DockerBackend
from .health import HealthState
from .metrics import Metrics
from .notify import Notifier
from .outcome import Outcome
from .queue import WorkQueue
from .session import SessionResult, SessionSupervisor

log = logging.getLogger(__name__)


class ExitStatus:
    """Process exit codes of `sandboxd run` and `sandboxd drain` (documented in the README)."""

    OK = 0  # run: clean shutdown; drain: every session succeeded
    SESSIONS_FAILED = 1  # drain: at least one session did not succeed
    CONFIG = 2  # a setting is missing or invalid
    FATAL = 3  # the API rejected the environment credentials, or the Docker engine is unreachable
    DRAIN_TIMEOUT = 4  # drain: drain_timeout_seconds passed before the queue was drained
    INTERRUPTED = 130  # a second signal stopped the daemon at once


@dataclass
class Summary:
    """What a run did; drain prints it and derives its exit code from it."""

    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    results: list[SessionResult] = field(default_factory=list)
    healthchecks: int = 0
    fatal: str | None = None
    drain_timed_out: bool = False
    interrupted: bool = False

    @property
    def duration_seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def counts(self) -> Counter[str]:
        return Counter(r.outcome.value for r in self.results)

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.outcome.ok)

    def exit_code(self, *, drain: bool) -> int:
        if self.interrupted:
            return ExitStatus.INTERRUPTED
        if self.fatal:
            return ExitStatus.FATAL
        if drain and self.drain_timed_out:
            return ExitStatus.DRAIN_TIMEOUT
        if drain and self.failed:
            return ExitStatus.SESSIONS_FAILED
        return ExitStatus.OK

    def render(self) -> str:
        counts = self.counts()
        lines = [
            f"sessions run: {len(self.results)}  succeeded: {counts.get('succeeded', 0)}  failed: {self.failed}"
            f"  duration: {self.duration_seconds:.1f}s",
        ]
        for outcome in Outcome:
            if not outcome.ok and counts.get(outcome.value):
                lines.append(f"  {outcome.value}: {counts[outcome.value]}")
        for result in self.results:
            if not result.outcome.ok:
                lines.append(f"  - {result.session_id} ({result.work_id}): {result.outcome.value} {result.reason}")
        if self.healthchecks:
            lines.append(f"health-check items stopped: {self.healthchecks}")
        if self.drain_timed_out:
            lines.append("drain timeout reached: running sessions were stopped")
        if self.fatal:
            lines.append(f"fatal: {self.fatal}")
        return "\n".join(lines)


class Daemon:
    """Polls one environment and runs each session in its own sandbox."""

    def __init__(
        self,
        queue: WorkQueue,
        supervisor: SessionSupervisor,
        backend: DockerBackend,
        metrics: Metrics,
        health: HealthState,
        notifier: Notifier,
        *,
        max_sessions: int,
        shutdown_grace_seconds: float,
        drain_timeout_seconds: float | None = None,
    ) -> None:
        self._queue = queue
        self._supervisor = supervisor
        self._backend = backend
        self._metrics = metrics
        self._health = health
        self._notifier = notifier
        self._capacity = max_sessions
        self._slots = anyio.Semaphore(max_sessions)
        self._grace = shutdown_grace_seconds
        self._drain_timeout = drain_timeout_seconds
        self._running = 0
        self._poll_scope = anyio.CancelScope()
        self._sessions_scope = anyio.CancelScope()
        self._stopping = False
        self.summary = Summary()
        metrics.sessions_capacity.set(max_sessions)
        health.at_capacity = lambda: self._running >= self._capacity
        health.seconds_since_poll = queue.health.seconds_since_success

    async def run(self, *, drain: bool) -> Summary:
        """Run until shut down (or, with `drain`, until the queue is empty and sessions are done)."""
        async with anyio.create_task_group() as root:
            root.start_soon(self._watch_signals, name="signals")
            root.start_soon(self._tick, name="tick")
            root.start_soon(self._check_engine, name="engine check")
            if drain and self._drain_timeout:
                deadline = anyio.current_time() + self._drain_timeout
                self._poll_scope.deadline = self._sessions_scope.deadline = deadline
            with self._sessions_scope:
                async with anyio.create_task_group() as sessions:
                    await self._adopt_orphans(sessions)
                    self._notifier.ready(self._status_text())
                    log.info("daemon_ready environment_id=%s capacity=%d drain=%s",
                             self._queue.environment_id, self._capacity, drain)
                    with self._poll_scope:
                        self._health.polling = True
                        await self._poll(sessions, drain)
                    self._health.polling = False
                    if drain and self._poll_scope.cancelled_caught and not self._stopping:
                        self.summary.drain_timed_out = True
            if drain and self._sessions_scope.cancelled_caught and not self._stopping:
                self.summary.drain_timed_out = True
            root.cancel_scope.cancel()
        self.summary.finished = time.monotonic()
        self._notifier.stopping("stopped")
        return self.summary

    async def _poll(self, sessions: anyio.abc.TaskGroup, drain: bool) -> None:
        claims = self._queue.claims(drain=drain)
        try:
            while True:
                await self._slots.acquire()
                try:
                    item = await anext(claims)
                except BaseException:
                    self._slots.release()
                    raise
                self._running += 1
                self._metrics.sessions_running.set(self._running)
                sessions.start_soon(self._serve, item, name=f"work {item.id}")
        except StopAsyncIteration:
            log.info("queue_drained environment_id=%s", self._queue.environment_id)
        except APIStatusError as exc:
            # The poller re-raises only what retrying cannot fix (401, 403, 404...).
            self.summary.fatal = f"the API rejected polling (HTTP {exc.status_code}); check environment_id and key"
            log.error("poll_rejected status=%s; no longer claiming work", exc.status_code)
        finally:
            with anyio.CancelScope(shield=True):
                await claims.aclose()  # type: ignore[attr-defined]

    async def _serve(self, item: BetaSelfHostedWork) -> None:
        try:
            if not await self._supervisor.serve(item, self.summary.results.append):
                self.summary.healthchecks += 1
        finally:
            self._running -= 1
            self._metrics.sessions_running.set(self._running)
            self._slots.release()

    async def _adopt_orphans(self, sessions: anyio.abc.TaskGroup) -> None:
        """Remove sandboxes an earlier run of this instance left behind.

        A running one is stopped (its worker force-stops its item, so the session is not stuck);
        an exited one is just removed.
        """
        for sandbox, state in await self._backend.owned():
            log.warning("orphan_sandbox container=%s work_id=%s state=%s; removing",
                        sandbox.name, sandbox.work_id, state)
            if state == "running":
                await self._backend.stop(sandbox, 10)
            await self._backend.remove(sandbox)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self._stopping:
                    self._stopping = True
                    self._poll_scope.cancel()
                    grace_ends = anyio.current_time() + self._grace
                    self._sessions_scope.deadline = min(self._sessions_scope.deadline, grace_ends)
                    log.warning("shutdown_requested signal=%s running=%d grace=%.0fs", name, self._running, self._grace)
                    self._notifier.stopping(f"stopping: {self._running} session(s) finishing")
                else:
                    log.warning("shutdown_now signal=%s; stopping %d session(s)", name, self._running)
                    self.summary.interrupted = True
                    self._sessions_scope.cancel()

    async def _tick(self) -> None:
        """Main-loop progress: liveness, watchdog pings and status, never held up by the engine."""
        interval = min(1.0, self._notifier.watchdog_interval_seconds or 1.0)
        while True:
            self._health.tick()
            self._notifier.watchdog()
            self._notifier.status(self._status_text())
            await anyio.sleep(interval)

    async def _check_engine(self) -> None:
        """Readiness needs the Docker engine: ask it every 10 s."""
        while True:
            self._health.engine_ok = await self._backend.ping()
            await anyio.sleep(10)

    def _status_text(self) -> str:
        return f"{self._running}/{self._capacity} sessions running" + (" (stopping)" if self._stopping else "")
