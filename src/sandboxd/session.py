"""Supervision of one session's work item, from claim (or adoption) to a retired sandbox.

Order matters for the lease: everything between the ack and the sandbox's first heartbeat is kept
short, and what can overlap does (the sandbox is taken from the pool or created while the
session's metadata is read and validated). The workspace is restored or fetched *after* the
hand-off, while the sandbox heartbeats and holds its tool calls, so a slow fetch can never let
the lease lapse. `Settlement` decides, in one place, whether the daemon must stop the item;
`Lifecycle` owns the containers. An adopted sandbox (left running by an earlier daemon) joins
the same path at "wait for the end".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import IO, Protocol

import anyio
from anthropic import APIError
from anthropic.types.beta.environments import BetaSelfHostedWork

from .errors import EngineError, LaunchError, WorkItemError, WorkspaceError
from .images import ImagePolicy, ImageRefused
from .lifecycle import Lifecycle, Tracked, first_of
from .logs import redacting
from .metrics import Metrics
from .network.broker import Grant, placeholder_for, placeholder_secret
from .network.credentials import opted_in
from .outcome import Outcome
from .protocol import Assignment, abort_line, sessions_token_from_secret, workspace_ready_line
from .queue import WorkQueue
from .sandbox import AssignmentRecord, Sandbox
from .settlement import ItemRef, Owner, Settlement
from .workspace import WorkspacePlan, Workspaces

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionLimits:
    max_session_seconds: float
    allow_environment_key_in_sandbox: bool


@dataclass
class SessionResult:
    work_id: str
    session_id: str
    outcome: Outcome
    duration_seconds: float
    reason: str = ""


class Retention(Protocol):
    """Keeps a session's /workspace between its work items (see sandboxd.retention)."""

    async def restore(self, session_id: str, sandbox: Sandbox) -> bool: ...

    async def keep(self, tracked: Tracked, settlement: Settlement) -> None: ...


class SessionSupervisor:
    """Serves claimed work items and adopted sandboxes; one instance is shared by the daemon."""

    def __init__(
        self,
        queue: WorkQueue,
        lifecycle: Lifecycle,
        workspaces: Workspaces,
        metrics: Metrics,
        limits: SessionLimits,
        environment_key: str,
        retention: Retention | None = None,
        images: ImagePolicy | None = None,
    ) -> None:
        self._queue = queue
        self._lifecycle = lifecycle
        self._workspaces = workspaces
        self._metrics = metrics
        self._limits = limits
        self._environment_key = environment_key
        self._retention = retention
        self._images = images or ImagePolicy.of(lifecycle.backend.spec.image)
        self.handing_off = False  # set by the daemon: cancellation then leaves sandboxes running

    async def serve(self, item: BetaSelfHostedWork, report: Callable[[SessionResult], None]) -> bool:
        """Serve one claimed item and `report` how its session ended; False for a non-session item
        (a health check), which is only stopped. Never raises for a bad item."""
        kind = str(item.data.type)
        self._metrics.work_items_claimed.labels(kind if kind in ("session", "healthcheck") else "other").inc()
        ref = ItemRef(item.id, item.environment_id, item.data.id)
        if kind != "session":
            log.info("non_session_item_stopped work_id=%s type=%s", item.id, kind)
            async with Settlement(self._queue, ref):
                pass
            return False
        started = time.time()
        settlement = Settlement(self._queue, ref)
        try:
            with redacting(item.secret, sessions_token_from_secret(item.secret)):  # never in a log line
                async with settlement:
                    assigned = await self._start(item, settlement, started)
                    if assigned is not None:
                        tracked, plan = assigned
                        await self._to_the_end(tracked, settlement, partial(self._prepare, tracked, settlement, plan))
        finally:
            report(self._finished(settlement, started))
        return True

    async def adopt(self, tracked: Tracked, report: Callable[[SessionResult], None]) -> None:
        """Supervise a sandbox an earlier daemon assigned, to the end, like any other session."""
        record = tracked.sandbox.record
        assert record is not None
        settlement = Settlement(self._queue, record.item, owner=Owner.SANDBOX)
        log.info("sandbox_adopted work_id=%s session_id=%s container=%s", record.item.work_id,
                 record.item.session_id, tracked.sandbox.name)
        self._metrics.sessions_adopted.inc()
        try:
            async with settlement:
                await self._to_the_end(tracked, settlement)
        finally:
            report(self._finished(settlement, record.started_at))

    def _finished(self, settlement: Settlement, started: float) -> SessionResult:
        duration = time.time() - started
        outcome = settlement.outcome or Outcome.FAILED
        if settlement.owner is Owner.NEXT_DAEMON:
            outcome, settlement.reason = Outcome.HANDED_OFF, "left running for the next daemon"
        self._metrics.sessions_finished.labels(outcome.value).inc()
        if outcome is not Outcome.HANDED_OFF:
            self._metrics.session_duration.observe(duration)
        item = settlement.item
        reason = settlement.reason
        log.log(
            logging.INFO if outcome.ok else logging.WARNING,
            "session_finished work_id=%s session_id=%s outcome=%s duration=%.2f%s",
            item.work_id, item.session_id, outcome.value, duration, f" reason={reason!r}" if reason else "",
        )
        return SessionResult(item.work_id, item.session_id, outcome, duration, reason)

    async def _start(
        self, item: BetaSelfHostedWork, settlement: Settlement, started: float
    ) -> tuple[Tracked, WorkspacePlan | None] | None:
        """Take a sandbox and hand it the item while the session's metadata is read.

        Returns the assigned sandbox and the workspace plan (None: refused, the outcome recorded,
        the sandbox must be aborted), or None when no sandbox got the item (settled by the caller).
        """
        try:
            credential = self._item_credential(item)
        except WorkItemError as exc:
            settlement.record(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
            return None
        plans: list[WorkspacePlan | None] = []
        images: list[str | None] = []
        opt_in: list[frozenset[str]] = []  # the opt-in credential rules the session's metadata asks for
        if self._images.per_session:
            # The session may name its image: read that first (no container starts for a refused one).
            await self._plan_into(item, settlement, plans, images, opt_in)
            if settlement.outcome is not None:
                return None
        async with anyio.create_task_group() as tg:
            if not plans:
                tg.start_soon(self._plan_into, item, settlement, plans, images, opt_in, name=f"plan for {item.id}")
            try:
                tracked = await self._lifecycle.acquire(images[0] if images else None)
            except LaunchError as exc:
                self._metrics.launch_errors.labels(exc.reason).inc()
                settlement.record(Outcome.LAUNCH_FAILED, f"{exc.reason}: {exc}")
                return None
            if settlement.outcome is not None:  # the plan was refused first: the item never reaches it
                await self._lifecycle.remove(tracked)
                return None
            try:
                if not await self._assign(item, tracked, settlement, credential, started):
                    return None
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._lifecycle.remove(tracked)  # never assigned: it holds nothing
                raise
        if tracked.door is not None and opt_in and opt_in[0]:  # before its tools run (the workspace comes first)
            tracked.door.credential_opt_in = opt_in[0]
            log.info("egress_credentials_opt_in session_id=%s rules=%s", item.data.id, ",".join(sorted(opt_in[0])))
        return tracked, plans[0] if plans else None

    async def _plan_into(self, item: BetaSelfHostedWork, settlement: Settlement, into: list[WorkspacePlan | None],
                         image_into: list[str | None], opt_in_into: list[frozenset[str]]) -> None:
        """The session's workspace plan, image and credential opt-ins from its metadata; None (outcome recorded)
        for a bad one."""
        try:
            metadata = await self._queue.session_metadata(item)
            opt_in_into.append(opted_in(metadata))
            image_into.append(self._images.choose(metadata))
            into.append(self._workspaces.plan(metadata))
            return
        except ImageRefused as exc:
            self._metrics.launch_errors.labels(exc.reason).inc()
            log.error("image_refused work_id=%s reason=%s error=%s", item.id, exc.reason, exc)
            settlement.record(Outcome.LAUNCH_FAILED, f"{exc.reason}: {exc}")
        except WorkspaceError as exc:
            self._metrics.workspace_failures.labels(exc.reason).inc()
            log.error("workspace_invalid work_id=%s reason=%s error=%s", item.id, exc.reason, exc)
            settlement.record(Outcome.WORKSPACE_FAILED, f"{exc.reason}: {exc}")
        except (WorkItemError, APIError) as exc:
            settlement.record(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        into.append(None)

    async def _assign(
        self, item: BetaSelfHostedWork, tracked: Tracked, settlement: Settlement,
        credential: str, started: float,
    ) -> bool:
        """Record and send the assignment: from here on the sandbox's worker owns the lease and the stop.

        With a broker, the sandbox gets a placeholder credential and the broker the real one, granted
        before the assignment is sent (the worker's first heartbeat follows at once).
        """
        ref = settlement.item
        record = AssignmentRecord(ref, started, started + self._limits.max_session_seconds)
        secret, line_key = getattr(item, "secret", None), self._key_for_sandbox(item)
        if tracked.door is not None:
            grant = self._grant(tracked.sandbox, ref, credential)
            self._lifecycle.grant(tracked, grant)
            secret, line_key = placeholder_secret(grant.placeholder), None
        assignment = Assignment(ref.work_id, ref.environment_id, ref.session_id, secret)
        source = "pool" if tracked.from_pool else "cold"
        try:
            await self._lifecycle.backend.assign(tracked.sandbox, record, assignment.to_line(line_key))
        except EngineError as exc:
            settlement.record(Outcome.LAUNCH_FAILED, f"the assignment did not reach the sandbox: {exc}")
            await self._lifecycle.stop_and_wait(tracked)
            await self._lifecycle.retire(tracked, verbose=True)
            return False
        settlement.handed_to_sandbox()
        tracked.claimed(source, started, self._metrics)
        self._metrics.claim_to_start.observe(time.time() - started)
        log.info("session_started work_id=%s session_id=%s container=%s source=%s", ref.work_id,
                 ref.session_id, tracked.sandbox.name, source)
        self._lifecycle.refill_pool()  # now, not before: the refill's engine calls would delay this one
        return True

    def _grant(self, sandbox: Sandbox, ref: ItemRef, credential: str) -> Grant:
        placeholder = placeholder_for(self._environment_key, sandbox.name, ref.work_id)
        return Grant(ref.work_id, ref.environment_id, ref.session_id, placeholder, credential)

    def adoption_grant(self, sandbox: Sandbox) -> Grant | None:
        """An adopted sandbox's grant: the placeholder derived again, the credential its first daemon
        kept (else the environment key, which the daemon holds anyway)."""
        if sandbox.record is None:
            return None
        credential = self._lifecycle.kept_credential(sandbox) or self._environment_key
        return self._grant(sandbox, sandbox.record.item, credential)

    async def _prepare(self, tracked: Tracked, settlement: Settlement, plan: WorkspacePlan | None) -> None:
        """Deliver the workspace and release the tool calls, or abort a session whose plan was refused."""
        if plan is None:
            await self._send_quietly(tracked.sandbox, abort_line(f"workspace refused: {settlement.reason}"))
            return
        error = await self._deliver_workspace(settlement.item, tracked.sandbox, plan)
        if error is not None:
            settlement.record(Outcome.WORKSPACE_FAILED, error)
        else:
            tracked.workspace_ready = True

    def _item_credential(self, item: BetaSelfHostedWork) -> str:
        """What the item's calls are authorized with: its sessions token, else (if allowed) the environment key."""
        token = sessions_token_from_secret(getattr(item, "secret", None))
        if token:
            return token
        if self._limits.allow_environment_key_in_sandbox:
            log.warning("environment_key_used_for_item work_id=%s (allowed by settings)", item.id)
            return self._environment_key
        raise WorkItemError(
            "the work item carries no usable secret (no sessions_token), and handing the environment "
            "key to a sandbox is not allowed (setting allow_environment_key_in_sandbox)"
        )

    def _key_for_sandbox(self, item: BetaSelfHostedWork) -> str | None:
        """The environment key on the sandbox's stdin: only without a broker, for an item without a token."""
        if sessions_token_from_secret(getattr(item, "secret", None)):
            return None
        return self._environment_key

    async def _deliver_workspace(self, ref: ItemRef, sandbox: Sandbox, plan: WorkspacePlan) -> str | None:
        """Restore the session's kept workspace, or fetch the plan; then release the tool calls (or abort)."""
        began = time.monotonic()
        try:
            restored = self._retention is not None and await self._retention.restore(ref.session_id, sandbox)
            if not restored:
                async with self._workspaces.prepare(plan, ref.work_id) as archive:
                    if archive is not None:
                        await self._deliver_archive(sandbox, archive)
        except WorkspaceError as exc:
            self._metrics.workspace_failures.labels(exc.reason).inc()
            log.error("workspace_failed work_id=%s reason=%s error=%s", ref.work_id, exc.reason, exc)
            await self._send_quietly(sandbox, abort_line(f"workspace failed: {exc}"))
            return f"{exc.reason}: {exc}"
        self._metrics.workspace_duration.observe(time.monotonic() - began)
        await self._send_quietly(sandbox, workspace_ready_line())
        return None

    async def _send_quietly(self, sandbox: Sandbox, line: bytes) -> None:
        try:
            await self._lifecycle.backend.send(sandbox, line)
        except EngineError as exc:  # the sandbox is gone; its exit status tells the rest
            log.warning("sandbox_unreachable container=%s error=%s", sandbox.name, exc)

    async def _deliver_archive(self, sandbox: Sandbox, archive: IO[bytes]) -> None:
        try:
            await self._lifecycle.backend.put_workspace(sandbox, archive)
        except EngineError as exc:
            raise WorkspaceError("delivery_failed", f"the engine did not take the workspace: {exc}") from exc

    async def _to_the_end(
        self, tracked: Tracked, settlement: Settlement, prepare: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Prepare (workspace), wait for the sandbox to exit (or stop it: deadline, disk limit), settle, retire.

        Whatever happens — cancellation, a bug — the sandbox is ended and removed here (or, in a
        hand-off, left running for the next daemon).
        """
        record = tracked.sandbox.record
        assert record is not None
        try:
            if prepare is not None:
                await prepare()
            # At least a moment: an adopted sandbox that exited after its deadline reports its exit at once.
            with anyio.move_on_after(max(1.0, record.deadline - time.time())) as timer:
                await first_of(tracked.exited, tracked.stop_requested)
            if timer.cancelled_caught and not tracked.exited.is_set():
                log.warning("session_timed_out work_id=%s after=%.0fs", record.item.work_id,
                            self._limits.max_session_seconds)
                limit = self._limits.max_session_seconds
                settlement.record(Outcome.TIMED_OUT, f"exceeded max_session_seconds={limit:g}")
            elif not tracked.exited.is_set():
                settlement.record(tracked.stop_outcome or Outcome.FAILED, tracked.stop_reason)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                if self.handing_off and isinstance(exc, anyio.get_cancelled_exc_class()):
                    settlement.hand_off()
                    self._lifecycle.forget(tracked)
                else:
                    cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                    settlement.record(Outcome.CANCELLED if cancelled else Outcome.FAILED,
                                      "stopped by the daemon's shutdown" if cancelled
                                      else "internal error (traceback in the log)")
                    await self._end(tracked, settlement)
            raise
        await self._end(tracked, settlement)

    async def _end(self, tracked: Tracked, settlement: Settlement) -> None:
        if not tracked.exited.is_set() and not await self._lifecycle.stop_and_wait(tracked):
            settlement.sandbox_lost("the sandbox did not exit after SIGKILL")
        elif tracked.exit_status < 0 and tracked.exited.is_set():
            settlement.sandbox_lost("the engine lost the sandbox")
        else:
            with anyio.move_on_after(2):  # its last events (did the worker stop its item?) follow the exit
                await tracked.events_done.wait()
            settlement.sandbox_exited(tracked.exit_status, oom_killed=tracked.oom_killed,
                                      evidence=tracked.evidence())
        try:
            if self._retention is not None:
                await self._retention.keep(tracked, settlement)
        finally:
            ok = settlement.outcome is not None and settlement.outcome.ok
            await self._lifecycle.retire(tracked, verbose=not ok)
