"""The lifecycle of a sandbox, in one place: pooled → assigned → finished → retained (or removed).

`Lifecycle` owns every sandbox container of this daemon from creation to removal: it creates
them (cold, or from the warm pool), watches each one (its exit, and the events it reports on
stdout: ready, heartbeats, tool calls), flags stalled sessions and workspaces over their disk
limit, and retires finished ones (last log lines, the workspace kept for the session's next work
item, container and volumes removed). Sessions (`session.py`) decide what to do with a sandbox;
this module is the only one that keeps sandboxes alive, so a hand-off can leave them running
while everything else stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from .containers import DockerBackend
from .errors import LaunchError
from .logs import printable
from .metrics import Metrics
from .network.broker import Door, Grant, Traffic
from .outcome import Outcome
from .protocol import Dropped, Event, LineSplitter, SandboxEvent, parse_event
from .sandbox import Sandbox
from .settlement import Evidence

if TYPE_CHECKING:
    from .network.channels import SandboxDoors
    from .pool import WarmPool

log = logging.getLogger(__name__)

REMOVAL_RETRY_SECONDS = 5.0
EVENTS_PER_SECOND = 50
ENGINE_BACK_SECONDS = 30.0  # how long a claimed item waits for an engine that went away to answer again


@dataclass(frozen=True)
class LifecycleLimits:
    stop_timeout_seconds: float
    container_log_lines: int
    workspace_max_bytes: int
    disk_check_interval_seconds: float = 2.0
    stall_tool_seconds: float = 900.0
    stall_silence_seconds: float = 300.0


@dataclass
class Activity:
    """What the daemon knows of a sandbox's session: readiness, heartbeats, the tool call in flight.

    Two sources, trusted differently. The broker's observations of the worker's own API calls
    (`observe`) are facts: the item's fate is decided from them. The sandbox's stdout events
    (`feed`) can be forged by any tool, so they only move metrics and stall hints, and they mark
    the first heartbeat only when there is no broker to see it.
    """

    ready: anyio.Event = field(default_factory=anyio.Event)
    heartbeat: anyio.Event = field(default_factory=anyio.Event)  # the first accepted heartbeat
    last_event: float = field(default_factory=time.time)  # wall clock
    first_heartbeat: float | None = None
    tool: str | None = None
    tool_started: float | None = None
    brokered: bool = False  # the API traffic goes through this daemon's broker: only it says what happened
    item_stopped: bool = False  # seen by the broker: the worker's stop was accepted (or already done)
    lease_lost: bool = False  # seen by the broker: a heartbeat met 412
    stalled: str = ""  # why, when the session looks stuck

    def observe(self, traffic: Traffic) -> None:
        """The broker saw one of the worker's calls answered."""
        now = time.time()
        self.last_event = max(self.last_event, now)
        if traffic is Traffic.HEARTBEAT_OK:
            self._heartbeat(now)
        elif traffic is Traffic.STOPPED:
            self.item_stopped = True
        elif traffic is Traffic.LEASE_LOST:
            self.lease_lost = True

    def _heartbeat(self, at: float) -> None:
        if self.first_heartbeat is None:
            self.first_heartbeat = at
            self.heartbeat.set()

    def feed(self, event: SandboxEvent, metrics: Metrics | None) -> None:
        """One (advisory) stdout event: a forged one misleads only this sandbox's own metrics and stall flag."""
        at = event.at
        self.last_event = max(self.last_event, at)
        if event.kind is Event.READY:
            self.ready.set()
        elif event.kind is Event.HEARTBEAT and not self.brokered:
            self._heartbeat(at)
        elif event.kind is Event.TOOL_START:
            self.tool, self.tool_started = event.tool or "unknown", at
        elif event.kind is Event.TOOL_END:
            self.tool = self.tool_started = None
            if metrics is not None:
                tool = metrics.tool_label(event.tool)
                metrics.tool_calls.labels(tool, "ok" if event.ok else "error").inc()
                if event.seconds is not None:
                    metrics.tool_duration.labels(tool).observe(event.seconds)


@dataclass
class Tracked:
    """A sandbox the lifecycle watches; sessions wait on `exited` or `stop_requested`."""

    sandbox: Sandbox
    activity: Activity = field(default_factory=Activity)
    exited: anyio.Event = field(default_factory=anyio.Event)
    events_done: anyio.Event = field(default_factory=anyio.Event)  # its stdout was read to the end
    exit_status: int = -1
    oom_killed: bool = False
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    stop_reason: str = ""
    stop_outcome: Outcome | None = None
    adopted_at: float = 0.0  # wall clock; events before it are replays (no metrics)
    from_pool: bool = False
    workspace_ready: bool = False  # delivered (or adopted): worth keeping for the session's next item
    door: Door | None = None  # its broker's view of it (None: no broker, network_mode other than none)
    _claim: tuple[str, float, Metrics] | None = None

    def claimed(self, source: str, at: float, metrics: Metrics) -> None:
        """The item was handed over at `at` (wall clock): observe claim → first heartbeat once it comes."""
        self._claim = (source, at, metrics)
        self.activity.last_event = max(self.activity.last_event, at)  # time in the pool is not silence
        self.observe_first_heartbeat()

    def observe_first_heartbeat(self) -> None:
        if self._claim is not None and self.activity.first_heartbeat is not None:
            source, at, metrics = self._claim
            metrics.claim_to_first_heartbeat.labels(source).observe(max(0.0, self.activity.first_heartbeat - at))
            self._claim = None

    def observe(self, traffic: Traffic) -> None:
        self.activity.observe(traffic)
        if traffic is Traffic.HEARTBEAT_OK:
            self.observe_first_heartbeat()

    def evidence(self) -> Evidence | None:
        """What the broker saw of the item, for the settlement; None when there is no broker."""
        if self.door is None:
            return None
        return Evidence(stopped=self.activity.item_stopped, lease_lost=self.activity.lease_lost)

    def request_stop(self, outcome: Outcome, reason: str) -> None:
        """Ask the session's supervisor to stop this sandbox, ending the session with `outcome`."""
        if not self.stop_requested.is_set():
            self.stop_outcome, self.stop_reason = outcome, reason
            self.stop_requested.set()


class Lifecycle:
    """Creates, watches and retires this daemon's sandboxes (see the module docstring)."""

    def __init__(self, backend: DockerBackend, metrics: Metrics, limits: LifecycleLimits) -> None:
        self.backend = backend
        self.limits = limits
        self._metrics = metrics
        self._tracked: dict[str, Tracked] = {}
        self._unremoved: dict[str, Sandbox] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.on_stalled: Callable[[int], None] = lambda count: None
        self.pool: WarmPool | None = None
        self.doors: SandboxDoors | None = None  # each sandbox's broker and proxy sockets (network_mode none)

    async def create(self, *, image_id: str | None = None, image: str | None = None) -> Tracked:
        """A new sandbox, its sockets served before its container starts (it bind-mounts their directory).
        `image`: a session's own image (default: the `image` setting)."""
        tracked = Tracked(self.backend.new_sandbox())
        await self._open_door(tracked, None)
        try:
            await self.backend.create(tracked.sandbox, image_id=image_id, image=image)
        except BaseException:
            self._close_door(tracked)
            raise
        return self._watch(tracked)

    async def adopt(self, sandbox: Sandbox, grant: Grant | None) -> Tracked:
        """Watch a sandbox an earlier daemon left running; its worker's calls are served under `grant`."""
        tracked = Tracked(sandbox, adopted_at=time.time(), workspace_ready=True)
        await self._open_door(tracked, grant)
        return self._watch(tracked)

    async def _open_door(self, tracked: Tracked, grant: Grant | None) -> None:
        if self.doors is not None:
            tracked.door = await self.doors.open(tracked.sandbox.name, grant, tracked.observe)
            tracked.activity.brokered = True

    def grant(self, tracked: Tracked, grant: Grant) -> None:
        """The sandbox's worker may now call the API for its item (set before the assignment is sent)."""
        if self.doors is not None and tracked.door is not None:
            self.doors.grant(tracked.door, grant)

    def kept_credential(self, sandbox: Sandbox) -> str | None:
        """The credential an earlier run granted this sandbox, if it was kept."""
        return self.doors.kept_credential(sandbox.name) if self.doors is not None else None

    def _close_door(self, tracked: Tracked) -> None:
        if self.doors is not None:
            self.doors.close(tracked.sandbox.name)

    async def acquire(self, image: str | None = None) -> Tracked:
        """A sandbox for a claimed item: a ready pool member if there is one, else a cold start.
        A session's own `image` (not the default) always starts cold: the pool holds the default."""
        if self.pool is not None and image is None:
            member = self.pool.take()
            self._metrics.pool_acquisitions.labels("hit" if member else "miss").inc()
            if member is not None:
                member.from_pool = True
                return member
        try:
            return await self.create(image=image)
        except LaunchError as exc:
            # Claimed just as the engine went away (a restart, an upgrade): once it answers again, one more try.
            if exc.reason != "engine_unavailable" or not await self._engine_back(ENGINE_BACK_SECONDS):
                raise
            log.warning("sandbox_create_retried reason=%s (the engine is back)", exc.reason)
            return await self.create(image=image)

    async def _engine_back(self, within_seconds: float) -> bool:
        deadline = anyio.current_time() + within_seconds
        for _ in range(int(within_seconds * 2) + 1):  # a ping gives up on its own after a few seconds
            if await self.backend.ping():
                return True
            if anyio.current_time() >= deadline:
                break
            await anyio.sleep(0.5)
        return False

    def refill_pool(self) -> None:
        """A pool member was taken and its session is under way: make a new one."""
        if self.pool is not None:
            self.pool.refill()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch sandboxes until cancelled; cancelling leaves every container as it is."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._watch_disk, name="disk watch")
            tg.start_soon(self._watch_stalls, name="stall watch")
            tg.start_soon(self._retry_removals, name="removal retries")
            task_status.started()
            await anyio.sleep_forever()

    def _watch(self, tracked: Tracked) -> Tracked:
        """Start watching a sandbox: its exit and its event stream."""
        assert self._tg is not None, "Lifecycle.run must be started first"
        self._tracked[tracked.sandbox.name] = tracked
        self._tg.start_soon(self._wait_exit, tracked, name=f"wait {tracked.sandbox.name}")
        self._tg.start_soon(self._follow, tracked, name=f"events {tracked.sandbox.name}")
        return tracked

    def assigned(self) -> list[Tracked]:
        return [t for t in self._tracked.values() if t.sandbox.record is not None and not t.exited.is_set()]

    async def _wait_exit(self, tracked: Tracked) -> None:
        try:
            tracked.exit_status, tracked.oom_killed = await self.backend.wait(tracked.sandbox)
        except Exception as exc:  # noqa: BLE001 - the engine lost it: treat as gone
            log.warning("sandbox_wait_failed container=%s error=%s", tracked.sandbox.name, exc)
            tracked.exit_status = -1
        tracked.exited.set()

    async def _follow(self, tracked: Tracked) -> None:
        """Read the sandbox's stdout: hostile input, parsed in bounded lines, dropped lines counted.

        At most EVENTS_PER_SECOND are taken (a worker makes a few per tool call), so a tool forging
        events by the thousand cannot inflate the fleet's tool metrics beyond that.
        """
        splitter, window, taken = LineSplitter(), 0, 0
        try:
            async for chunk in self.backend.events(tracked.sandbox):
                for line in splitter.feed(chunk):
                    event = line if isinstance(line, Dropped) else parse_event(line)
                    if not isinstance(event, Dropped) and tracked.adopted_at <= event.at:
                        now = int(time.monotonic())
                        window, taken = (window, taken + 1) if now == window else (now, 1)
                        if taken > EVENTS_PER_SECOND:
                            event = Dropped.RATE_LIMITED
                    if isinstance(event, Dropped):
                        self._metrics.sandbox_output_dropped.labels(event.value).inc()
                        continue
                    tracked.activity.feed(event, self._metrics if event.at >= tracked.adopted_at else None)
                    if event.kind is Event.HEARTBEAT:
                        tracked.observe_first_heartbeat()
        finally:
            tracked.events_done.set()

    async def stop_and_wait(self, tracked: Tracked) -> bool:
        """SIGTERM the sandbox (its worker stops its item) and wait for it; False if it never exited."""
        await self.backend.stop(tracked.sandbox, self.limits.stop_timeout_seconds)
        with anyio.move_on_after(self.limits.stop_timeout_seconds + 10):
            await tracked.exited.wait()
        return tracked.exited.is_set()

    async def retire(self, tracked: Tracked, *, verbose: bool) -> None:
        """Finished: copy the last log lines into the daemon's log, then remove container and volumes."""
        sandbox = tracked.sandbox
        level = logging.INFO if verbose else logging.DEBUG
        if log.isEnabledFor(level):
            work = sandbox.record.item.work_id if sandbox.record else "-"
            for text in await self.backend.logs_tail(sandbox, self.limits.container_log_lines):
                log.log(level, "sandbox_log work_id=%s line=%s", work, printable(text))
        await self.remove(tracked)

    async def remove(self, tracked: Tracked) -> None:
        """Remove a sandbox; while the engine cannot be reached it is retried in the background."""
        with anyio.CancelScope(shield=True):
            if not await self.backend.remove(tracked.sandbox):
                log.warning("sandbox_removal_deferred container=%s; retrying", tracked.sandbox.name)
                self._unremoved[tracked.sandbox.name] = tracked.sandbox
        self._close_door(tracked)
        self._tracked.pop(tracked.sandbox.name, None)

    async def _retry_removals(self) -> None:
        """Removals that failed while the engine was down (a restart of dockerd) are done once it is back."""
        while True:
            await anyio.sleep(REMOVAL_RETRY_SECONDS)
            for name, sandbox in list(self._unremoved.items()):
                if await self.backend.remove(sandbox):
                    log.info("sandbox_removed_late container=%s", name)
                    del self._unremoved[name]

    def forget(self, tracked: Tracked) -> None:
        """Stop accounting for a sandbox left running for the next daemon (its socket directory stays)."""
        if self.doors is not None:
            self.doors.leave(tracked.sandbox.name)
        self._tracked.pop(tracked.sandbox.name, None)

    async def _watch_disk(self) -> None:
        """Stop a session whose /workspace grew past workspace_max_bytes (checked by the engine).

        Only where no filesystem bounds the workspace (`backend.disks`). A poll that fails or
        times out checks nothing: it is counted and logged, never taken for "all within bounds".
        """
        if getattr(self.backend, "disks", None) is not None:
            return
        limit = self.limits.workspace_max_bytes
        while True:
            await anyio.sleep(self.limits.disk_check_interval_seconds)
            if not self.assigned():
                continue
            sizes = await self.backend.workspace_bytes()
            if sizes is None:
                self._metrics.disk_check_failures.inc()
                log.warning("disk_check_failed sandboxes=%d; no workspace was checked", len(self.assigned()))
                continue
            for tracked in self.assigned():
                used = sizes.get(tracked.sandbox.name, -1)
                if used > limit and not tracked.stop_requested.is_set():
                    log.warning("workspace_over_limit work_id=%s used=%d limit=%d; stopping the session",
                                tracked.sandbox.record.item.work_id if tracked.sandbox.record else "-", used, limit)
                    self._metrics.disk_limit_stops.inc()
                    tracked.request_stop(Outcome.DISK_LIMIT,
                                         f"/workspace used {used} bytes, over workspace_max_bytes={limit}")

    async def _watch_stalls(self) -> None:
        """Flag sessions whose tool call, or whose silence, lasts longer than the stall settings."""
        while True:
            await anyio.sleep(min(5.0, self.limits.stall_silence_seconds / 4))
            now = time.time()
            for tracked in self.assigned():
                self._check_stall(tracked, now)
            count = sum(1 for t in self.assigned() if t.activity.stalled)
            self._metrics.sessions_stalled.set(count)
            self.on_stalled(count)

    def _check_stall(self, tracked: Tracked, now: float) -> None:
        activity, limits = tracked.activity, self.limits
        why = ""
        if activity.tool_started is not None and now - activity.tool_started > limits.stall_tool_seconds:
            why = f"tool call {activity.tool} running for {now - activity.tool_started:.0f}s"
        elif now - activity.last_event > limits.stall_silence_seconds:
            why = f"no event from the sandbox for {now - activity.last_event:.0f}s"
        if why and not activity.stalled:
            work = tracked.sandbox.record.item.work_id if tracked.sandbox.record else "-"
            log.warning("session_stalled work_id=%s reason=%r", work, why)
        elif activity.stalled and not why:
            log.info("session_unstalled container=%s", tracked.sandbox.name)
        activity.stalled = why


async def first_of(*events: anyio.Event) -> None:
    """Return once any of `events` is set."""
    async with anyio.create_task_group() as tg:
        for event in events:
            async def wait(e: anyio.Event = event) -> None:
                await e.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait)
