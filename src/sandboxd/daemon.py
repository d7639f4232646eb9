"""The daemon's lifecycle: adopt what an earlier run left, claim work within capacity, shut down.

At start the daemon takes over the sandboxes of its instance that an earlier run left on the
engine: assigned ones are supervised to the end like its own sessions (they hold capacity
slots), the others are removed. A capacity slot is acquired *before* the next item is claimed,
so the daemon never holds work it cannot start. Shutdown (SIGTERM/SIGINT in `drain` mode) stops
claiming at once and gives running sessions `shutdown_grace_seconds` as a deadline on their
cancel scope; past it (or on a second signal) their sandboxes are stopped, and each sandbox's
worker stops its item. A hand-off (SIGUSR2, SIGTERM in `handoff` mode, SIGHUP to re-exec in
place) stops claiming and leaves running sandboxes to the next daemon on the same engine.
Drain mode claims until the queue is empty, waits for every session and reports a summary.
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
from .lifecycle import Lifecycle, Tracked
from .limits import LimitsNotEnforced
from .metrics import Metrics
from .notify import Notifier
from .outcome import Outcome
from .pool import WarmPool
from .queue import WorkQueue
from .session import SessionResult, SessionSupervisor
from .settlement import Settlement

log = logging.getLogger(__name__)

LIMITS_RECHECK_SECONDS = 60.0  # while the engine does not enforce the sandbox limits, probe again this often


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
    handed_off: bool = False
    reexec: bool = False  # SIGHUP: the CLI re-executes the daemon in place after the hand-off
    adopted: int = 0

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
        if self.adopted:
            lines.append(f"sessions adopted from an earlier run: {self.adopted}")
        if self.handed_off:
            lines.append("handed off: running sandboxes were left to the next daemon")
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
        lifecycle: Lifecycle,
        metrics: Metrics,
        health: HealthState,
        notifier: Notifier,
        *,
        max_sessions: int,
        shutdown_grace_seconds: float,
        drain_timeout_seconds: float | None = None,
        shutdown_mode: str = "drain",
        pool: WarmPool | None = None,
    ) -> None:
        self._queue = queue
        self._supervisor = supervisor
        self._lifecycle = lifecycle
        self._backend: DockerBackend = lifecycle.backend
        self._pool = pool
        self._shutdown_mode = shutdown_mode
        self._overdraft = 0  # adopted sessions beyond capacity (the setting was lowered)
        self._stalled = 0
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
        self._pool_scope = anyio.CancelScope()
        self._stopping = False
        self.summary = Summary()
        metrics.sessions_capacity.set(max_sessions)
        health.at_capacity = lambda: self._running >= self._capacity
        health.all_slots_stalled = lambda: self._running >= self._capacity and self._stalled >= self._running
        lifecycle.on_stalled = self._note_stalled
        limits = getattr(self._backend, "limits", None)  # the engine's enforcement of the sandbox limits
        if limits is not None:
            limits.gauge = metrics.limits_unenforced
            health.sandbox_limits = limits.readiness
        health.seconds_since_poll = queue.health.seconds_since_success
        health.images = self._backend.image_readiness

    async def run(self, *, drain: bool) -> Summary:
        """Run until shut down (or, with `drain`, until the queue is empty and sessions are done)."""
        async with anyio.create_task_group() as root:
            root.start_soon(self._watch_signals, name="signals")
            root.start_soon(self._tick, name="tick")
            root.start_soon(self._check_engine, name="engine check")
            await root.start(self._lifecycle.run, name="lifecycle")
            if drain and self._drain_timeout:
                deadline = anyio.current_time() + self._drain_timeout
                self._poll_scope.deadline = self._sessions_scope.deadline = deadline
            with self._sessions_scope:
                async with anyio.create_task_group() as sessions:
                    await self._adopt(sessions)
                    if self._pool is not None:
                        await root.start(self._run_pool, name="warm pool")
                    self._notifier.ready(self._status_text())
                    log.info("daemon_ready environment_id=%s capacity=%d drain=%s",
                             self._queue.environment_id, self._capacity, drain)
                    with self._poll_scope:
                        self._health.polling = True
                        await self._poll(sessions, drain)
                    self._health.polling = False
                    self._pool_scope.cancel()  # no more claims (drained, stopping): the pool has no use
                    if drain and self._poll_scope.cancelled_caught and not self._stopping:
                        self.summary.drain_timed_out = True
            if drain and self._sessions_scope.cancelled_caught and not self._stopping:
                self.summary.drain_timed_out = True
            root.cancel_scope.cancel()
        self.summary.finished = time.monotonic()
        if not self.summary.reexec:
            self._notifier.stopping("stopped")
        return self.summary

    async def _poll(self, sessions: anyio.abc.TaskGroup, drain: bool) -> None:
        claims = self._queue.claims(drain=drain)
        try:
            while True:
                await self._slots.acquire()
                try:
                    await self._engine_answers()
                    await self._limits_hold(drain)
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
        except LimitsNotEnforced as exc:
            self.summary.fatal = str(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await claims.aclose()  # type: ignore[attr-defined]

    async def _run_pool(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        assert self._pool is not None
        with self._pool_scope:
            await self._pool.run(task_status=task_status)

    async def _engine_answers(self) -> None:
        """Claim nothing while the engine is down (a dockerd restart): each claim would fail its launch."""
        if await self._backend.ping():
            return
        self._health.engine_ok = False
        log.warning("engine_unavailable; not claiming until it answers")
        answered = False
        while not answered:
            await anyio.sleep(2)
            answered = await self._backend.ping()
        self._health.engine_ok = True
        log.info("engine_available; claiming again")

    async def _limits_hold(self, drain: bool) -> None:
        """Claim nothing while the engine does not enforce the sandbox limits (see sandboxd.limits).

        The probe runs before the first claim; while limits are refused it runs again every
        LIMITS_RECHECK_SECONDS (an engine restarted with delegation is served without a restart).
        `drain` does not wait: it raises LimitsNotEnforced (exit 3).
        """
        limits = getattr(self._backend, "limits", None)
        if limits is None:
            return
        if not limits.probed:
            await limits.check()
        while limits.refused:
            if drain:
                raise LimitsNotEnforced(limits.refusal())
            await anyio.sleep(LIMITS_RECHECK_SECONDS)
            await limits.check()

    async def _serve(self, item: BetaSelfHostedWork) -> None:
        try:
            if not await self._supervisor.serve(item, self.summary.results.append):
                self.summary.healthchecks += 1
        finally:
            self._release()

    def _release(self) -> None:
        self._running -= 1
        self._metrics.sessions_running.set(self._running)
        if self._overdraft:
            self._overdraft -= 1
        else:
            self._slots.release()

    async def _adopt(self, sessions: anyio.abc.TaskGroup) -> None:
        """Take over what an earlier run of this instance left on the engine.

        Assigned sandboxes, running or exited, are supervised (and so settled) like fresh ones and
        hold a slot; the rest (pool members, never assigned, half-created) hold no work: removed.
        """
        for found in await self._backend.owned():
            sandbox = found.sandbox
            if sandbox.record is None or not sandbox.container_id:
                log.info("stale_sandbox_removed container=%s running=%s", sandbox.name, found.running)
                await self._backend.remove(sandbox)
                if sandbox.record is not None:  # its container vanished: nothing else will stop the item
                    async with Settlement(self._queue, sandbox.record.item):
                        pass
                continue
            try:
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                self._overdraft += 1
            self._running += 1
            self.summary.adopted += 1
            tracked = await self._lifecycle.adopt(sandbox, self._supervisor.adoption_grant(sandbox))
            sessions.start_soon(self._serve_adopted, tracked, name=f"adopted {sandbox.record.item.work_id}")
        self._metrics.sessions_running.set(self._running)

    async def _serve_adopted(self, tracked: Tracked) -> None:
        try:
            await self._supervisor.adopt(tracked, self.summary.results.append)
        finally:
            self._release()

    def _note_stalled(self, count: int) -> None:
        self._stalled = count

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP or signum == signal.SIGUSR2 or (
                    self._shutdown_mode == "handoff" and not self._stopping
                ):
                    self._hand_off(name, reexec=signum == signal.SIGHUP)
                elif not self._stopping:
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

    def _hand_off(self, signal_name: str, *, reexec: bool) -> None:
        """Stop claiming and leave running sandboxes (their leases held by their workers) to the next daemon."""
        log.warning("handoff_requested signal=%s running=%d reexec=%s", signal_name, self._running, reexec)
        self._stopping = True
        self.summary.handed_off = True
        self.summary.reexec = reexec
        self._supervisor.handing_off = True
        if reexec:
            self._notifier.reloading()
        else:
            self._notifier.stopping(f"handing off {self._running} session(s)")
        self._poll_scope.cancel()
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
