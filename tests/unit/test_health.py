"""/metrics, /healthz and /readyz over real HTTP on loopback, and the readiness rules of the daemon."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.errors import ConfigError
from sandboxd.health import HealthServer, HealthState, serving, split_address
from sandboxd.metrics import Metrics


class Probes:
    def __init__(self) -> None:
        self.alive: tuple[bool, str] = (True, "ok")
        self.readiness: tuple[bool, str] = (False, "waiting for the first poll")

    def live(self) -> tuple[bool, str]:
        return self.alive

    def ready(self) -> tuple[bool, str]:
        return self.readiness


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(metrics: Metrics) -> Iterator[tuple[HealthServer, Probes]]:
    probes = Probes()
    health = HealthServer("127.0.0.1:0", metrics.registry, probes).start()
    yield health, probes
    health.stop()


def test_metrics_endpoint_serves_the_registry(server: tuple[HealthServer, Probes], metrics: Metrics) -> None:
    health, _ = server
    metrics.sessions_running.set(2)
    response = httpx2.get(f"{health.url}/metrics")
    assert response.status_code == 200
    values = {s.name: s.value for f in text_string_to_metric_families(response.text) for s in f.samples}
    assert values["sandboxd_sessions_running"] == 2


def test_probes_answer_200_or_503_with_the_reason(server: tuple[HealthServer, Probes]) -> None:
    health, probes = server
    assert httpx2.get(f"{health.url}/healthz").status_code == 200
    ready = httpx2.get(f"{health.url}/readyz")
    assert (ready.status_code, ready.text.strip()) == (503, "waiting for the first poll")
    probes.readiness = (True, "ok")
    assert httpx2.get(f"{health.url}/readyz/").status_code == 200
    probes.alive = (False, "main loop stalled for 31s")
    live = httpx2.get(f"{health.url}/healthz")
    assert (live.status_code, live.text.strip()) == (503, "main loop stalled for 31s")
    assert httpx2.get(f"{health.url}/nope").status_code == 404


def test_an_address_in_use_is_a_config_error(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="metrics_address"):
            HealthServer(f"127.0.0.1:{port}", metrics.registry, Probes()).start()


def test_stop_is_idempotent_and_frees_the_port(metrics: Metrics) -> None:
    health = HealthServer("127.0.0.1:0", metrics.registry, Probes()).start()
    port = health.port
    health.stop()
    health.stop()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), (":9464", ("0.0.0.0", 9464)), ("[::1]:9", ("::1", 9))],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.anyio
async def test_serving_starts_before_the_block_and_stops_after(metrics: Metrics) -> None:
    async with serving("127.0.0.1:0", metrics.registry, Probes()) as url:
        assert url is not None
        async with httpx2.AsyncClient() as client:
            assert (await client.get(f"{url}/healthz")).status_code == 200
    with pytest.raises(httpx2.ConnectError):
        async with httpx2.AsyncClient() as client:
            await client.get(f"{url}/healthz", timeout=2)
    async with serving(None, metrics.registry, Probes()) as disabled:
        assert disabled is None


def test_readiness_needs_the_engine_polling_and_a_recent_poll() -> None:
    since: list[float | None] = [None]
    state = HealthState(poll_window_seconds=5, seconds_since_poll=lambda: since[0])
    assert state.ready() == (False, "docker engine not answering")
    state.engine_ok = True
    assert state.ready() == (False, "not polling")
    state.polling = True
    assert state.ready() == (False, "waiting for the first poll")
    since[0] = 1.0
    assert state.ready() == (True, "ok")
    since[0] = 6.0
    assert state.ready() == (False, "last successful poll 6s ago")
    state.at_capacity = lambda: True  # at capacity the daemon does not poll, by design
    assert state.ready() == (True, "ok (at capacity)")


def test_a_stalled_loop_is_neither_live_nor_ready() -> None:
    state = HealthState(poll_window_seconds=5, seconds_since_poll=lambda: 0.0, engine_ok=True, polling=True)
    assert state.live() == (True, "ok") and state.ready()[0]
    state.last_tick = time.monotonic() - 31
    assert state.live()[0] is False and state.ready()[0] is False
    state.tick()
    assert state.live() == (True, "ok")


def test_no_first_poll_within_the_window_is_reported() -> None:
    state = HealthState(poll_window_seconds=5, engine_ok=True, polling=True, started_at=time.monotonic() - 6)
    assert state.ready() == (False, "no poll has succeeded yet")
