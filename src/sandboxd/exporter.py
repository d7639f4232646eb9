"""Queue stats for Prometheus: the work-queue stats API, read every interval, as per-environment gauges.

The stats endpoint wants an API key, which the control-plane docs advise keeping off the worker
hosts: `sandboxd exporter` runs this collector alone (no polling, no Docker), and `sandboxd run`
runs it in-process only when an API key is configured. The key lives in this module's own client
and never reaches a sandbox. A credential the API rejects disables the collector with one log line;
other failures are logged when they start and when they end, not at every interval.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

import anyio
import anyio.abc
from anthropic import APIStatusError, AsyncAnthropic
from anthropic.types.beta.environments import BetaSelfHostedWorkQueueStats

from .errors import ConfigError
from .health import Liveness, serving
from .metrics import QueueMetrics
from .settings import Settings

log = logging.getLogger(__name__)


def stats_client(base_url: str, api_key: str, interval_seconds: float) -> AsyncAnthropic:
    """The collector's own client: the API key (sent as Bearer), a timeout bounded by the interval."""
    timeout = max(1.0, min(30.0, interval_seconds))
    return AsyncAnthropic(base_url=base_url, api_key=api_key, max_retries=1, timeout=timeout)


def _rejected(exc: APIStatusError) -> bool:
    """A 4xx that asking again will not change (the credential, or the environment id, is wrong)."""
    return 400 <= exc.status_code < 500 and exc.status_code not in (408, 409, 429)


class StatsCollector:
    """Reads one environment's queue stats into QueueMetrics; `run` loops until disabled or cancelled."""

    def __init__(
        self,
        client: AsyncAnthropic,
        environment_id: str,
        metrics: QueueMetrics,
        *,
        interval_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self.environment_id = environment_id
        self._metrics = metrics
        self._interval = interval_seconds
        self._clock = clock
        self.last_ok: bool | None = None  # None until the first scrape ends
        self.disabled_reason: str | None = None
        metrics.add_environment(environment_id)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Scrape now and then every interval; returns only when the API rejected the credential."""
        task_status.started()
        while self.disabled_reason is None:
            began = anyio.current_time()
            await self.scrape()
            await anyio.sleep(max(0.0, began + self._interval - anyio.current_time()))

    async def scrape(self) -> bool:
        """One scrape; True when the gauges now hold fresh numbers."""
        try:
            stats = await self._client.beta.environments.work.stats(self.environment_id)
            self._record(stats)
        except APIStatusError as exc:
            if _rejected(exc):
                self._disable(exc.status_code)
            else:
                self._failed(f"HTTP {exc.status_code}")
            return False
        except Exception as exc:  # noqa: BLE001 - stats are auxiliary: a bad answer must not stop the daemon
            # Connection errors and timeouts (already retried once by the client), malformed answers.
            self._failed(type(exc).__name__)
            return False
        return True

    def _record(self, stats: BetaSelfHostedWorkQueueStats) -> None:
        env, m = self.environment_id, self._metrics
        now = self._clock()
        m.depth.labels(env).set(stats.depth)
        m.pending.labels(env).set(stats.pending)
        m.oldest_age.labels(env).set(oldest_age_seconds(stats.oldest_queued_at, now))
        m.workers_polling.labels(env).set(stats.workers_polling or 0)
        m.up.labels(env).set(1)
        m.last_success.labels(env).set(now)
        if self.last_ok is False:
            log.info("queue_stats_recovered environment_id=%s", env)
        self.last_ok = True

    def _failed(self, error: str) -> None:
        self._count_failure()
        if self.last_ok is not False:  # log the start of a failure streak, not every interval
            log.warning("queue_stats_failed environment_id=%s error=%s", self.environment_id, error)
        else:
            log.debug("queue_stats_failed environment_id=%s error=%s", self.environment_id, error)
        self.last_ok = False

    def _disable(self, status: int) -> None:
        """The one line an operator needs; asking again every interval would only repeat it."""
        self._count_failure()
        self.last_ok = False
        self.disabled_reason = f"the API rejected the stats request (HTTP {status})"
        log.error(
            "queue_stats_disabled environment_id=%s status=%d; the API key was rejected for queue stats "
            "(or the environment does not exist); no further attempts until restart",
            self.environment_id, status,
        )

    def _count_failure(self) -> None:
        self._metrics.up.labels(self.environment_id).set(0)
        self._metrics.errors.labels(self.environment_id).inc()


def oldest_age_seconds(stamp: str | None, now: float) -> float:
    """Seconds since an RFC 3339 `oldest_queued_at` (0 for an empty queue or an unreadable stamp)."""
    if not stamp:
        return 0.0
    text = stamp.strip().replace("Z", "+00:00").replace("z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # keep at most microseconds: the API may send nanoseconds
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return 0.0
    return max(0.0, now - moment.timestamp())


@asynccontextmanager
async def collecting(settings: Settings, metrics: QueueMetrics) -> AsyncIterator[StatsCollector | None]:
    """Run the collector next to the daemon when an API key is configured (else yield None)."""
    if settings.api_key is None or not settings.environment_id:
        yield None
        return
    client = stats_client(settings.base_url, settings.api_key.get_secret_value(), settings.stats_interval_seconds)
    async with client, anyio.create_task_group() as tg:
        collector = StatsCollector(
            client, settings.environment_id, metrics, interval_seconds=settings.stats_interval_seconds
        )
        await tg.start(collector.run, name="queue-stats")
        try:
            yield collector
        finally:
            tg.cancel_scope.cancel()


@dataclass(kw_only=True)
class ExporterProbes(Liveness):
    """/healthz: the event loop ticks. /readyz: the last scrape succeeded."""

    collector: StatsCollector

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        if self.collector.disabled_reason:
            return False, f"queue stats disabled: {self.collector.disabled_reason}"
        if self.collector.last_ok is None:
            return False, "waiting for the first scrape"
        return (True, "ok") if self.collector.last_ok else (False, "the last queue-stats scrape failed")

    async def keep_ticking(self) -> None:
        while True:
            self.tick()
            await anyio.sleep(1.0)


def main(settings: Settings) -> int:
    """`sandboxd exporter`: serve queue stats on `metrics_address` until SIGTERM/SIGINT; exit 0."""
    settings.require("environment_id", "api_key", command="exporter")
    if not settings.metrics_address:
        raise ConfigError("`sandboxd exporter` serves on `metrics_address` (--metrics-address); it cannot be empty")
    return anyio.run(_serve, settings)


async def _serve(settings: Settings) -> int:
    assert settings.environment_id and settings.api_key and settings.metrics_address
    metrics, registry = QueueMetrics.exporter_registry()
    client = stats_client(settings.base_url, settings.api_key.get_secret_value(), settings.stats_interval_seconds)
    async with client:
        collector = StatsCollector(
            client, settings.environment_id, metrics, interval_seconds=settings.stats_interval_seconds
        )
        probes = ExporterProbes(collector=collector)
        async with serving(settings.metrics_address, registry, probes) as url, anyio.create_task_group() as tg:
            tg.start_soon(probes.keep_ticking, name="tick")
            await tg.start(collector.run, name="queue-stats")
            log.info("exporter_ready environment_id=%s url=%s interval_seconds=%g",
                     settings.environment_id, url, settings.stats_interval_seconds)
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("exporter_stopping signal=%s", signal.Signals(signum).name)
                    break
            tg.cancel_scope.cancel()
    return 0
