"""`sandboxd run` speaks systemd's notification protocol as a Type=notify unit needs it.

The daemon runs as a subprocess against the local control plane (empty queue) and a real Docker
engine, with NOTIFY_SOCKET naming a datagram socket this test owns, as systemd would set it.
It must send READY=1 once polling, WATCHDOG=1 more often than WATCHDOG_USEC, STATUS= lines with
its capacity, and STOPPING=1 on SIGTERM, then exit 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxd.controlplane import ControlPlane

pytestmark = pytest.mark.docker

WATCHDOG_USEC = 2_000_000


class NotifySocket:
    """The receiving end systemd would hold: collects (monotonic time, message) in a thread."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")  # short: AF_UNIX paths are limited to 107 bytes
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.path)
        self._socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-socket", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, field: str, timeout: float) -> float:
        """When the first message with `field` (e.g. "READY=1") arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in list(self.messages):
                if field in message.split("\n"):
                    return at
            time.sleep(0.05)
        raise AssertionError(f"no {field} within {timeout}s; received {[m for _, m in self.messages]}")

    def times(self, field: str) -> list[float]:
        return [at for at, message in list(self.messages) if field in message.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as name:
        yield Path(name)


def daemon_env(plane: ControlPlane, state: Path, config: Path, notify: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SANDBOXD_", "ANTHROPIC_", "NOTIFY_", "WATCHDOG_", "CREDENTIALS_"))}
    env.update(
        NOTIFY_SOCKET=notify,
        WATCHDOG_USEC=str(WATCHDOG_USEC),  # WATCHDOG_PID unset: the pings are the main process's job
        SANDBOXD_CONFIG=str(config),
        SANDBOXD_BASE_URL=plane.url,
        SANDBOXD_ENVIRONMENT_ID=plane.environment_id,
        SANDBOXD_METRICS_ADDRESS="",
        SANDBOXD_NETWORK_MODE="host",
        SANDBOXD_STATE_DIR=str(state),
        SANDBOXD_MAX_SESSIONS="3",
    )
    return env


def test_ready_watchdog_status_and_stopping(docker_client: object, short_dir: Path) -> None:
    notify = NotifySocket(short_dir)
    secrets, state, config = short_dir / "secrets", short_dir / "state", short_dir / "sandboxd.toml"
    config.write_text("")
    state.mkdir()
    with ControlPlane() as plane:
        plane.write_secret_files(secrets)
        (secrets / "api_key").unlink()  # no queue-stats collector: this test is about the main loop
        started = time.monotonic()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "run", "--secrets-dir", str(secrets)],
            env=daemon_env(plane, state, config, notify.path),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            ready = notify.wait_for("READY=1", timeout=30)
            assert daemon.poll() is None
            # READY means polling: the control plane soon counts this worker among its pollers.
            plane.wait_for(lambda snapshot: len(snapshot["workers_polling"]) == 1, timeout=5)

            # Watchdog: pings keep coming, each well inside the watchdog period.
            time.sleep(4 * WATCHDOG_USEC / 1e6)
            pings = [t for t in notify.times("WATCHDOG=1") if t >= ready]
            assert len(pings) >= 4, notify.messages
            gaps = [b - a for a, b in zip([ready, *pings], pings, strict=False)]
            assert max(gaps) < WATCHDOG_USEC / 1e6, f"a watchdog gap of {max(gaps):.2f}s would get the daemon killed"

            statuses = [m for _, m in notify.messages if m.startswith("STATUS=") or "\nSTATUS=" in m]
            assert any("0/3 sessions running" in s for s in statuses), statuses

            daemon.send_signal(signal.SIGTERM)
            stopping = notify.wait_for("STOPPING=1", timeout=10)
            output, _ = daemon.communicate(timeout=30)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.communicate()
            notify.close()
    assert daemon.returncode == 0, output
    assert started < ready < stopping
    assert not [t for t in notify.times("READY=1") if t > stopping], "READY=1 after STOPPING=1"
    assert "shutdown_requested signal=SIGTERM" in output
