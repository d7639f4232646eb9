"""The daemon's side of the work queue, through the SDK: poll, force-stop, read session metadata.

Polling is the SDK's own poller (`auto_stop=False`: the sandbox owns the stop). The daemon never
heartbeats an item: the sandbox's worker claims the lease with its first heartbeat, and a daemon
heartbeat before it would make that first beat fail with 412. Every request passes through a
HookedTransport so health and metrics see poll results without re-implementing the poller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping

import httpx2
from anthropic import APIStatusError, AsyncAnthropic
from anthropic.types.beta.environments import BetaSelfHostedWork

from .metrics import Metrics
from .protocol import sessions_token_from_secret
from .settlement import ItemRef
from .transport import hooked_http_client, route

log = logging.getLogger(__name__)


class PollHealth:
    """When the last poll succeeded, as seen on the wire (the poller retries errors internally)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.last_success: float | None = None  # monotonic
        self._metrics = metrics

    def __call__(
        self, request: httpx2.Request, response: httpx2.Response | None, exc: BaseException | None, took: float
    ) -> None:
        if route(request) != "poll":
            return
        if response is not None and response.is_success:
            self.last_success = time.monotonic()
            if self._metrics:
                self._metrics.polls.inc()
                self._metrics.last_poll_success.set_to_current_time()
        elif self._metrics:
            self._metrics.poll_errors.inc()

    def seconds_since_success(self) -> float | None:
        return None if self.last_success is None else time.monotonic() - self.last_success


class WorkQueue:
    """One environment's queue, authenticated with the environment key."""

    def __init__(
        self,
        *,
        base_url: str,
        environment_id: str,
        environment_key: str,
        worker_id: str | None = None,
        block_ms: int = 999,
        reclaim_older_than_ms: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        http_client, transport = hooked_http_client()
        self.health = PollHealth(metrics)
        transport.observe(self.health)
        # auth_token: every call goes out as `Authorization: Bearer`; the poller and the stop use
        # scoped Bearer-only sub-clients of this one.
        self.client = AsyncAnthropic(base_url=base_url, auth_token=environment_key, http_client=http_client)
        self.environment_id = environment_id
        self._environment_key = environment_key
        self._worker_id = worker_id
        self._block_ms = block_ms
        self._reclaim = reclaim_older_than_ms

    def claims(self, *, drain: bool) -> AsyncIterator[BetaSelfHostedWork]:
        """The SDK poller: yields acked items; returns when the queue is empty if `drain`."""
        return self.client.beta.environments.work.poller(
            environment_id=self.environment_id,
            environment_key=self._environment_key,
            worker_id=self._worker_id,
            block_ms=self._block_ms,
            reclaim_older_than_ms=self._reclaim,
            drain=drain,
            auto_stop=False,
        )

    async def force_stop(self, item: ItemRef) -> None:
        """Force-stop an item no sandbox will stop (only `Settlement` calls this); 409 is fine."""
        try:
            await self.client.beta.environments.work.stop(item.work_id, environment_id=item.environment_id, force=True)
            log.info("item_stopped_by_daemon work_id=%s", item.work_id)
        except APIStatusError as exc:
            if exc.status_code != 409:
                log.error("force_stop_failed work_id=%s status=%s", item.work_id, exc.status_code)
        except Exception as exc:  # noqa: BLE001 - a stop that cannot be sent is logged, never raised
            log.error("force_stop_failed work_id=%s error=%s", item.work_id, type(exc).__name__)

    async def session_status(self, session_id: str) -> str | None:
        """The session's status (running, idle, terminated...) with the environment key; None if unknown."""
        try:
            return str((await self.client.beta.sessions.retrieve(session_id)).status)
        except Exception as exc:  # noqa: BLE001 - advisory: the caller keeps the workspace when unsure
            log.debug("session_status_unavailable session_id=%s error=%s", session_id, type(exc).__name__)
            return None

    async def session_metadata(self, item: BetaSelfHostedWork) -> Mapping[str, str]:
        """The session's metadata, read with the item's own sessions token when it carries one."""
        token = sessions_token_from_secret(getattr(item, "secret", None))
        client = self.client.with_options(auth_token=token) if token else self.client
        session = await client.beta.sessions.retrieve(item.data.id)
        return dict(session.metadata or {})

    async def aclose(self) -> None:
        await self.client.close()
