"""Queue stats against the local control plane over real HTTP: the gauges scraped from /metrics equal
the control plane's own queue numbers, a rejected credential disables the collector with one log
line, outages are logged once, and `sandboxd exporter` runs the collector alone as a process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from anthropic import AsyncAnthropic
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.controlplane import ControlPlane, Scenario, ScriptedSession
from sandboxd.exporter import StatsCollector, collecting, stats_client
from sandboxd.health import serving
from sandboxd.metrics import Metrics
from sandboxd.settings import Settings

QUEUE_GAUGES = {
    "sandboxd_queue_depth": "depth",
    "sandboxd_queue_pending": "pending",
    "sandboxd_queue_workers_polling": "workers_polling",
}


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    # A long reclaim window keeps a polled item "pending" for the whole test.
    with ControlPlane(Scenario(reclaim_older_than_ms=600_000)) as cp:
        yield cp


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx2.AsyncClient() as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample(metrics: Metrics, name: str, environment_id: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"environment_id": environment_id})


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, environment_id: str) -> float:
    return samples[(name, (("environment_id", environment_id),))]


async def assert_gauges_match(plane: ControlPlane, collector: StatsCollector, url: str) -> None:
    assert await collector.scrape()
    truth = plane.state_snapshot()["stats"]
    samples = await scrape(url)
    env = plane.environment_id
    for gauge, field in QUEUE_GAUGES.items():
        assert value(samples, gauge, env) == truth[field], gauge
    assert value(samples, "sandboxd_queue_stats_up", env) == 1
    oldest = truth["oldest_queued_at"]
    expected_age = time.time() - datetime.fromisoformat(oldest.replace("Z", "+00:00")).timestamp() if oldest else 0
    assert value(samples, "sandboxd_queue_oldest_age_seconds", env) == pytest.approx(expected_age, abs=2.0)


@pytest.mark.anyio
async def test_queue_gauges_equal_the_control_planes_own_numbers(plane: ControlPlane) -> None:
    env = plane.environment_id
    metrics = Metrics()
    async with stats_client(plane.url, plane.api_key, 5) as client, \
            serving("127.0.0.1:0", metrics.registry, _AlwaysOk()) as url, \
            AsyncAnthropic(base_url=plane.url, auth_token=plane.environment_key, max_retries=0) as worker:
        assert url is not None
        collector = StatsCollector(client, env, metrics.queue, interval_seconds=5)
        await assert_gauges_match(plane, collector, url)  # empty queue: all zero, no oldest item
        for _ in range(3):
            plane.add_session(ScriptedSession())
        await anyio.sleep(1.1)  # the oldest item is measurably old
        polled = await worker.beta.environments.work.poll(env, block_ms=100, anthropic_worker_id="worker-a")
        assert polled is not None
        snapshot = plane.state_snapshot()["stats"]
        assert (snapshot["depth"], snapshot["pending"], snapshot["workers_polling"]) == (2, 1, 1)
        await assert_gauges_match(plane, collector, url)
        await worker.beta.environments.work.ack(polled.id, environment_id=env)
        plane.add_session(ScriptedSession())
        await assert_gauges_match(plane, collector, url)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Return once `predicate()` holds (callers bound the wait with fail_after)."""
    while True:
        if predicate():
            return
        await anyio.sleep(0.05)


class _AlwaysOk:
    def live(self) -> tuple[bool, str]:
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        return True, "ok"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("credential", "environment", "status"),
    [("environment_key", None, 403), ("sk-ant-api03-not-a-known-key-0000", None, 401), ("api_key", "env_nope", 404)],
)
async def test_a_rejected_credential_disables_the_collector_with_one_log_line(
    plane: ControlPlane, caplog: pytest.LogCaptureFixture, credential: str, environment: str | None, status: int
) -> None:
    key = getattr(plane, credential, credential)
    env = environment or plane.environment_id
    metrics = Metrics()
    caplog.set_level(logging.DEBUG, logger="sandboxd.exporter")
    async with stats_client(plane.url, key, 0.05) as client:
        collector = StatsCollector(client, env, metrics.queue, interval_seconds=0.05)
        with anyio.fail_after(10):
            await collector.run()  # returns by itself once disabled
    lines = [r for r in caplog.records if r.name == "sandboxd.exporter"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.ERROR
    assert lines[0].getMessage().startswith(f"queue_stats_disabled environment_id={env} status={status}")
    assert key not in caplog.text
    assert plane.state_snapshot()["requests"].get("stats") == 1  # asked once, never again
    assert sample(metrics, "sandboxd_queue_stats_up", env) == 0
    assert sample(metrics, "sandboxd_queue_stats_errors_total", env) == 1
    assert collector.disabled_reason and str(status) in collector.disabled_reason


@pytest.mark.anyio
async def test_an_outage_is_logged_when_it_starts_and_when_it_ends(
    plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    env = plane.environment_id
    metrics = Metrics()
    caplog.set_level(logging.INFO, logger="sandboxd.exporter")
    async with stats_client(plane.url, plane.api_key, 0.1) as client, anyio.create_task_group() as tg:
        collector = StatsCollector(client, env, metrics.queue, interval_seconds=0.1)
        with anyio.fail_after(20):
            await tg.start(collector.run)
            await eventually(lambda: collector.last_ok is True)
            plane.set_outage("error")
            await eventually(lambda: (sample(metrics, "sandboxd_queue_stats_errors_total", env) or 0) >= 3)
            assert sample(metrics, "sandboxd_queue_stats_up", env) == 0
            plane.set_outage("off")
            await eventually(lambda: collector.last_ok is True)
        tg.cancel_scope.cancel()
    events = [r.getMessage().split()[0] for r in caplog.records if r.name == "sandboxd.exporter"]
    assert events == ["queue_stats_failed", "queue_stats_recovered"]
    assert sample(metrics, "sandboxd_queue_stats_up", env) == 1


@pytest.mark.anyio
async def test_the_daemon_collects_only_with_an_api_key(plane: ControlPlane) -> None:
    base: dict[str, Any] = {"environment_id": plane.environment_id, "base_url": plane.url, "stats_interval_seconds": 30}
    metrics = Metrics()
    async with collecting(Settings(**base), metrics.queue) as none:
        assert none is None
    async with collecting(Settings(**base, api_key=plane.api_key), metrics.queue) as collector:
        assert collector is not None
        with anyio.fail_after(10):
            await eventually(lambda: collector.last_ok is not None)
        assert collector.last_ok is True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def exporter_env(plane: ControlPlane, port: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SANDBOXD_BASE_URL": plane.url,
        "SANDBOXD_ENVIRONMENT_ID": plane.environment_id,
        "SANDBOXD_METRICS_ADDRESS": f"127.0.0.1:{port}",
        "SANDBOXD_STATS_INTERVAL_SECONDS": "0.5",
        "SANDBOXD_LOG_LEVEL": "DEBUG",
    }


def wait_http(url: str, status: int, timeout: float) -> httpx2.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx2.get(url, timeout=2)
            if response.status_code == status:
                return response
        except httpx2.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer {status} within {timeout}s")
        time.sleep(0.1)


def test_the_exporter_command_serves_queue_stats_alone(plane: ControlPlane, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    plane.write_secret_files(secrets)
    (secrets / "environment_key").unlink()  # the exporter host never holds the environment key
    plane.add_session(ScriptedSession())
    port, log_path = free_port(), tmp_path / "exporter.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "exporter", "--secrets-dir", str(secrets)],
            env=exporter_env(plane, port), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", 200, 20)
        text = wait_http(f"http://127.0.0.1:{port}/metrics", 200, 5).text
        names = {f.name for f in text_string_to_metric_families(text)}
        assert "sandboxd_queue_depth" in names and "sandboxd_sessions_running" not in names
        assert f'sandboxd_queue_depth{{environment_id="{plane.environment_id}"}} 1.0' in text
        assert wait_http(f"http://127.0.0.1:{port}/healthz", 200, 5).text.strip() == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert "exporter_ready" in output and "exporter_stopping signal=SIGTERM" in output
    assert plane.api_key not in output


def test_the_exporter_command_needs_an_api_key(plane: ControlPlane, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sandboxd", "exporter", "--secrets-dir", str(tmp_path)],
        env=exporter_env(plane, free_port()), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "api_key" in result.stderr
