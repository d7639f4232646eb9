"""The warm pool: pre-started sandboxes, SDK imported, waiting for an assignment.

A claimed item takes a ready member (its first heartbeat then comes within tens of milliseconds)
or starts cold. Members are started exactly as hardened as session sandboxes, hold no secret and
no work until assigned, and are extra to `max_sessions`. Refilling happens here, off the claim's
critical path, one creation at a time with exponential backoff after a failure (a missing image
never becomes a create loop). A member is replaced when it died, grew older than
`max_age_seconds`, or was built from an image the `image` setting no longer resolves to.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import anyio
import anyio.abc

from .errors import LaunchError
from .lifecycle import Lifecycle, Tracked, first_of
from .metrics import Metrics

log = logging.getLogger(__name__)

IMAGE_CHECK_SECONDS = 15.0
READY_TIMEOUT_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 60.0


class WarmPool:
    """Keeps `size` ready members; `take` never waits and never hands out a dead or stale one."""

    def __init__(self, lifecycle: Lifecycle, metrics: Metrics, *, size: int, max_age_seconds: float) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics
        self.size = size
        self._max_age = max_age_seconds
        self._ready: deque[Tracked] = deque()
        self._starting = 0
        self._image_id = ""
        self._image_checked = 0.0
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        metrics.pool_size.set(size)
        metrics.pool_ready.set(0)

    def take(self) -> Tracked | None:
        while self._ready:
            member = self._ready.popleft()
            if self._usable(member):
                self._metrics.pool_ready.set(len(self._ready))
                return member  # the refill waits for `refill`, once the member's session is under way
            self._discard(member)
        return None

    def refill(self) -> None:
        self._changed.set()

    def _usable(self, member: Tracked) -> bool:
        sandbox = member.sandbox
        return (
            not member.exited.is_set()
            and time.time() - sandbox.created_at < self._max_age
            and (not self._image_id or sandbox.image_id == self._image_id)
        )

    def _discard(self, member: Tracked) -> None:
        log.info("pool_member_replaced container=%s exited=%s", member.sandbox.name, member.exited.is_set())
        assert self._tg is not None
        self._tg.start_soon(self._lifecycle.remove, member, name=f"remove {member.sandbox.name}")

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool full until cancelled; on the way out every member is removed."""
        backoff = 0.0
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                while True:
                    await self._refresh_image()
                    self._prune()
                    if self._image_id and len(self._ready) + self._starting < self.size:
                        if await self._create_one():
                            backoff = 0.0
                            continue
                        backoff = min(MAX_BACKOFF_SECONDS, max(1.0, backoff * 2))
                        log.warning("pool_refill_failed retry_in=%.0fs", backoff)
                        await anyio.sleep(backoff)
                        continue
                    self._changed = anyio.Event()
                    with anyio.move_on_after(1.0):
                        await self._changed.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def _refresh_image(self) -> None:
        if time.monotonic() - self._image_checked < IMAGE_CHECK_SECONDS and self._image_id:
            return
        try:
            current = await self._lifecycle.backend.image_id()
        except LaunchError as exc:
            log.warning("pool_image_unavailable reason=%s error=%s", exc.reason, exc)
            self._metrics.pool_creations.labels("failed").inc()
            self._image_id = ""
            await anyio.sleep(min(MAX_BACKOFF_SECONDS, IMAGE_CHECK_SECONDS))
            return
        if self._image_id and current != self._image_id:
            log.info("pool_image_changed image_id=%s; replacing members", current[:19])
        self._image_id, self._image_checked = current, time.monotonic()

    def _prune(self) -> None:
        keep = deque(m for m in self._ready if self._usable(m))
        for member in self._ready:
            if member not in keep:
                self._discard(member)
        self._ready = keep
        self._metrics.pool_ready.set(len(self._ready))

    async def _create_one(self) -> bool:
        self._starting += 1
        try:
            try:
                member = await self._lifecycle.create(image_id=self._image_id)
            except LaunchError as exc:
                self._metrics.pool_creations.labels("failed").inc()
                log.warning("pool_create_failed reason=%s error=%s", exc.reason, exc)
                return False
            sandbox = member.sandbox
            try:
                with anyio.move_on_after(READY_TIMEOUT_SECONDS):
                    await first_of(member.activity.ready, member.exited)
            except BaseException:
                await self._lifecycle.remove(member)  # shielded: a member cut off while starting
                raise
            if not member.activity.ready.is_set() or member.exited.is_set():
                self._metrics.pool_creations.labels("failed").inc()
                log.warning("pool_member_not_ready container=%s exit=%s", sandbox.name, member.exit_status)
                await self._lifecycle.remove(member)
                return False
            self._metrics.pool_creations.labels("ok").inc()
            self._ready.append(member)
            self._metrics.pool_ready.set(len(self._ready))
            return True
        finally:
            self._starting -= 1

    async def close(self) -> None:
        """Remove every member (shutdown, hand-off: members hold nothing worth keeping)."""
        members, self._ready = list(self._ready), deque()
        for member in members:
            await self._lifecycle.remove(member)
        self._metrics.pool_ready.set(0)
