"""/readyz reflects a wedged poll loop, not just a live process: the whole daemon (`run_daemon`, with a
fake container engine: the queue is empty, so no sandbox is ever asked for) polls the local control
plane over real HTTP; the control plane then stops answering (`hang`) and later recovers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.assembly import run_daemon
from sandboxd.controlplane import ControlPlane, Scenario
from sandboxd.metrics import Metrics
from sandboxd.settings import Settings

# The idle poller holds a poll up to 1 s and then sleeps 1-3 s, so a healthy idle daemon succeeds
# at least every ~4 s; the window must sit above that.
WINDOW_SECONDS = 6.0


class IdleEngine:
    """The Docker engine as the daemon sees it with nothing to run: it answers, and owns nothing."""

    async def ping(self) -> bool:
        return True

    async def owned(self) -> list[Any]:
        return []

    def image_readiness(self) -> tuple[bool, str]:
        return True, ""


@pytest.fixture
def plane() -> Iterator[ControlPlane]:
    with ControlPlane(Scenario()) as cp:
        yield cp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def until_status(http: httpx2.AsyncClient, url: str, status: int, within_seconds: float) -> str:
    """Poll `url` until it answers `status`; returns the body."""
    with anyio.fail_after(within_seconds):
        while True:
            try:
                response = await http.get(url, timeout=2)
                if response.status_code == status:
                    return response.text.strip()
            except httpx2.TransportError:
                pass
            await anyio.sleep(0.1)


@pytest.mark.anyio
async def test_readyz_turns_503_while_polls_hang_and_200_after(plane: ControlPlane, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{free_port()}"
    settings = Settings(
        environment_id=plane.environment_id,
        environment_key=plane.environment_key,
        base_url=plane.url,
        metrics_address=base.removeprefix("http://"),
        ready_poll_window_seconds=WINDOW_SECONDS,
        max_sessions=1,
        state_dir=tmp_path / "state",
        network_mode="host",  # no sandbox runs: no broker needed
        warm_pool_size=0,
    )
    metrics = Metrics()
    async with anyio.create_task_group() as tg, httpx2.AsyncClient() as http:
        tg.start_soon(partial(run_daemon, settings, drain=False, metrics=metrics, backend=IdleEngine()))  # type: ignore[arg-type]
        assert await until_status(http, f"{base}/readyz", 200, 20) == "ok"

        plane.set_outage("hang")
        wedged_at = anyio.current_time()
        reason = await until_status(http, f"{base}/readyz", 503, WINDOW_SECONDS + 5)
        assert anyio.current_time() - wedged_at <= WINDOW_SECONDS + 5
        assert reason.startswith("last successful poll")
        assert (await http.get(f"{base}/healthz")).status_code == 200  # the process itself is fine

        plane.set_outage("off")
        assert await until_status(http, f"{base}/readyz", 200, 15) == "ok"
        scraped = (await http.get(f"{base}/metrics")).text
        tg.cancel_scope.cancel()
    values = {s.name: s.value for f in text_string_to_metric_families(scraped) for s in f.samples}
    assert values["sandboxd_polls_total"] >= 2
    assert values["sandboxd_last_poll_success_timestamp_seconds"] > 0
    assert values["sandboxd_sessions_capacity"] == 1
