"""Supervision of one claimed work item, from claim to a removed container.

Order matters for the lease: everything between the ack and the sandbox's first heartbeat is kept
short (read the session's metadata, validate it, start the container, write the assignment). The
workspace is fetched *after* the hand-off, while the sandbox heartbeats and holds its tool calls,
so a slow fetch can never let the lease lapse. Whatever happens, the item ends stopped exactly
once (by the sandbox, or by the daemon when no sandbox could), and the container and its
workspace are removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import anyio
from anthropic import APIError
from anthropic.types.beta.environments import BetaSelfHostedWork

from .containers import DockerBackend, Sandbox
from .errors import EngineError, LaunchError, WorkItemError, WorkspaceError
from .logs import redacting
from .metrics import Metrics
from .outcome import ITEM_SETTLED_BY_SANDBOX, Outcome, outcome_for_exit
from .protocol import Assignment, ExitCode, abort_line, sessions_token_from_secret, workspace_ready_line
from .queue import WorkQueue
from .workspace import WorkspacePlan, Workspaces

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    max_session_seconds: float
    stop_timeout_seconds: float
    container_log_lines: int
    allow_environment_key_in_sandbox: bool


@dataclass
class SessionResult:
    work_id: str
    session_id: str
    outcome: Outcome
    duration_seconds: float
    reason: str = ""


class SessionSupervisor:
    """Serves claimed work items; one instance is shared by every session of the daemon."""

    def __init__(
        self,
        queue: WorkQueue,
        backend: DockerBackend,
        workspaces: Workspaces,
        metrics: Metrics,
        limits: SessionLimits,
        environment_key: str,
    ) -> None:
        self._queue = queue
        self._backend = backend
        self._workspaces = workspaces
        self._metrics = metrics
        self._limits = limits
        self._environment_key = environment_key

    async def serve(self, item: BetaSelfHostedWork, report: Callable[[SessionResult], None]) -> bool:
        """Serve one claimed item and `report` how its session ended; False for a non-session item
        (a health check), which is only stopped. Never raises for a bad item; on cancellation
        (shutdown) the sandbox is stopped, which stops its item, and the session reports cancelled."""
        kind = str(item.data.type)
        self._metrics.work_items_claimed.labels(kind if kind in ("session", "healthcheck") else "other").inc()
        if kind != "session":
            log.info("non_session_item_stopped work_id=%s type=%s", item.id, kind)
            await self._queue.force_stop(item)
            return False
        started = time.monotonic()
        try:
            with redacting(item.secret, sessions_token_from_secret(item.secret)):  # never in a log line
                outcome, reason = await self._serve_session(item, started)
        except anyio.get_cancelled_exc_class():
            report(self._finished(item, Outcome.CANCELLED, started, "stopped by the daemon's shutdown"))
            raise
        except Exception:  # a bug in serving one item fails that item, never the daemon
            log.exception("session_crashed work_id=%s", item.id)
            with anyio.CancelScope(shield=True):
                await self._queue.force_stop(item)
            outcome, reason = Outcome.FAILED, "internal error (traceback in the log)"
        report(self._finished(item, outcome, started, reason))
        return True

    def _finished(self, item: BetaSelfHostedWork, outcome: Outcome, started: float, reason: str) -> SessionResult:
        duration = time.monotonic() - started
        self._metrics.sessions_finished.labels(outcome.value).inc()
        self._metrics.session_duration.observe(duration)
        log.log(
            logging.INFO if outcome.ok else logging.WARNING,
            "session_finished work_id=%s session_id=%s outcome=%s duration=%.2f%s",
            item.id, item.data.id, outcome.value, duration, f" reason={reason!r}" if reason else "",
        )
        return SessionResult(item.id, item.data.id, outcome, duration, reason)

    async def _serve_session(self, item: BetaSelfHostedWork, started: float) -> tuple[Outcome, str]:
        try:
            environment_key = self._sandbox_environment_key(item)
            metadata = await self._queue.session_metadata(item)
            plan = self._workspaces.plan(metadata)
        except WorkspaceError as exc:
            self._metrics.workspace_failures.labels(exc.reason).inc()
            log.error("workspace_invalid work_id=%s reason=%s error=%s", item.id, exc.reason, exc)
            await self._queue.force_stop(item)
            return Outcome.WORKSPACE_FAILED, f"{exc.reason}: {exc}"
        except (WorkItemError, APIError) as exc:
            await self._queue.force_stop(item)
            return Outcome.FAILED, f"{type(exc).__name__}: {exc}"
        try:
            sandbox = await self._backend.launch(item.id, item.data.id, item.environment_id)
        except LaunchError as exc:
            self._metrics.launch_errors.labels(exc.reason).inc()
            await self._queue.force_stop(item)
            return Outcome.LAUNCH_FAILED, str(exc)
        try:
            outcome, reason = Outcome.CANCELLED, ""
            outcome, reason = await self._supervise(item, sandbox, plan, environment_key, started)
            return outcome, reason
        finally:
            with anyio.CancelScope(shield=True):
                await self._collect_and_remove(item, sandbox, verbose=not outcome.ok)

    def _sandbox_environment_key(self, item: BetaSelfHostedWork) -> str | None:
        """None when the item's secret carries a sessions token (the normal case)."""
        if sessions_token_from_secret(getattr(item, "secret", None)):
            return None
        if self._limits.allow_environment_key_in_sandbox:
            log.warning("environment_key_handed_to_sandbox work_id=%s (allowed by settings)", item.id)
            return self._environment_key
        raise WorkItemError(
            "the work item carries no usable secret (no sessions_token), and handing the environment "
            "key to a sandbox is not allowed (setting allow_environment_key_in_sandbox)"
        )

    async def _supervise(
        self,
        item: BetaSelfHostedWork,
        sandbox: Sandbox,
        plan: WorkspacePlan,
        environment_key: str | None,
        started: float,
    ) -> tuple[Outcome, str]:
        assignment = Assignment(item.id, item.environment_id, item.data.id, getattr(item, "secret", None))
        line = assignment.to_line(environment_key)
        deadline = started + self._limits.max_session_seconds
        try:
            await self._backend.send(sandbox, line)
            self._metrics.claim_to_start.observe(time.monotonic() - started)
            log.info("session_started work_id=%s session_id=%s container=%s", item.id, item.data.id, sandbox.name)
            workspace_error = await self._deliver_workspace(item, sandbox, plan)
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())) as timer:
                status = await self._backend.wait(sandbox)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._stop_sandbox(item, sandbox)
            raise
        if timer.cancelled_caught:
            log.warning("session_timed_out work_id=%s after=%.0fs", item.id, self._limits.max_session_seconds)
            await self._stop_sandbox(item, sandbox)
            return Outcome.TIMED_OUT, f"exceeded max_session_seconds={self._limits.max_session_seconds:g}"
        await self._settle(item, status)
        if workspace_error is not None:
            return Outcome.WORKSPACE_FAILED, workspace_error
        return outcome_for_exit(status), _describe_exit(status)

    async def _deliver_workspace(self, item: BetaSelfHostedWork, sandbox: Sandbox, plan: WorkspacePlan) -> str | None:
        """Fetch and deliver the workspace, then release the sandbox's tool calls (or abort it)."""
        began = time.monotonic()
        try:
            async with self._workspaces.prepare(plan, item.id) as archive:
                if archive is not None:
                    await self._deliver_archive(sandbox, archive)
        except WorkspaceError as exc:
            self._metrics.workspace_failures.labels(exc.reason).inc()
            log.error("workspace_failed work_id=%s reason=%s error=%s", item.id, exc.reason, exc)
            await self._backend.send(sandbox, abort_line(f"workspace failed: {exc}"))
            return f"{exc.reason}: {exc}"
        self._metrics.workspace_duration.observe(time.monotonic() - began)
        await self._backend.send(sandbox, workspace_ready_line())
        return None

    async def _deliver_archive(self, sandbox: Sandbox, archive: IO[bytes]) -> None:
        try:
            await self._backend.put_workspace(sandbox, archive)
        except EngineError as exc:
            raise WorkspaceError("delivery_failed", f"the engine did not take the workspace: {exc}") from exc

    async def _stop_sandbox(self, item: BetaSelfHostedWork, sandbox: Sandbox) -> int:
        """SIGTERM the sandbox (its worker force-stops the item), then make sure the item is settled."""
        await self._backend.stop(sandbox, self._limits.stop_timeout_seconds)
        with anyio.move_on_after(self._limits.stop_timeout_seconds + 5):
            status = await self._backend.wait(sandbox)
            await self._settle(item, status)
            return status
        await self._queue.force_stop(item)
        return -1

    async def _settle(self, item: BetaSelfHostedWork, status: int) -> None:
        """Stop the item when the sandbox could not have (crash, SIGKILL, OOM, bad assignment)."""
        if status not in ITEM_SETTLED_BY_SANDBOX:
            log.warning("sandbox_died work_id=%s exit=%s; stopping the item", item.id, status)
            await self._queue.force_stop(item)

    async def _collect_and_remove(self, item: BetaSelfHostedWork, sandbox: Sandbox, verbose: bool) -> None:
        """The sandbox's last log lines into the daemon's log (INFO when the session did not succeed)."""
        level = logging.INFO if verbose else logging.DEBUG
        if log.isEnabledFor(level):
            for text in await self._backend.logs_tail(sandbox, self._limits.container_log_lines):
                log.log(level, "sandbox_log work_id=%s | %s", item.id, text)
        await self._backend.remove(sandbox)


def _describe_exit(status: int) -> str:
    try:
        return "" if status == ExitCode.SERVED else f"sandbox exit {status} ({ExitCode(status).name.lower()})"
    except ValueError:
        return f"sandbox exit {status}"
