"""The e2e harness: the `sandboxd` CLI as a subprocess against the local control plane, real sandboxes.

Each test gets its own control plane, secrets directory, state directory and worker id (which is
also the containers' instance label, so leftovers are attributed to exactly one test).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandboxd.controlplane.scenario import Scenario
from sandboxd.controlplane.server import ControlPlane
from tests.conftest import managed_leftovers


@dataclass
class Run:
    """A finished (or running) sandboxd process and what it printed."""

    process: subprocess.Popen[bytes]
    log_path: Path
    returncode: int | None = None

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Harness:
    control_plane: ControlPlane
    tmp: Path
    image: str
    docker: Any
    worker_id: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:10]}")
    runs: list[Run] = field(default_factory=list)

    @property
    def secrets_dir(self) -> Path:
        return self.tmp / "secrets"

    @property
    def socket_dir(self) -> str:
        """Short (a unix socket path has ~100 characters), unique per test, under /tmp."""
        return f"/tmp/sbx-{self.worker_id}"

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.tmp),
            "SANDBOXD_BASE_URL": self.control_plane.url,
            "SANDBOXD_ENVIRONMENT_ID": self.control_plane.environment_id,
            # The default network mode (none): sandboxes reach the control plane through the broker.
            "SANDBOXD_SOCKET_DIR": self.socket_dir,
            "SANDBOXD_IMAGE": self.image,
            "SANDBOXD_PULL_POLICY": "never",
            "SANDBOXD_STATE_DIR": str(self.state_dir),
            "SANDBOXD_WORKER_ID": self.worker_id,
            "SANDBOXD_METRICS_ADDRESS": "",
            "SANDBOXD_MAX_IDLE_SECONDS": "5",
            "SANDBOXD_ALLOW_INSECURE_HTTP": "true",
        }
        # PYTHONPATH: a checkout's own tree (a git worktree beside the installed one) is what runs.
        for name in ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "PYTHONPATH"):
            if name in os.environ:
                env[name] = os.environ[name]
        env.update(overrides)
        return env

    def start(self, command: str, *args: str, **env: str) -> Run:
        self.control_plane.write_secret_files(self.secrets_dir)
        log_path = self.tmp / f"sandboxd-{command}-{len(self.runs)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "sandboxd", command, "--secrets-dir", str(self.secrets_dir), *args],
                env=self.env(**env), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        run = Run(process, log_path)
        self.runs.append(run)
        return run

    def wait(self, run: Run, timeout: float = 240) -> Run:
        try:
            run.returncode = run.process.wait(timeout)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait()
            pytest.fail(f"sandboxd did not finish within {timeout}s; output:\n{run.output[-6000:]}")
        return run

    def drain(self, *args: str, timeout: float = 240, env: Mapping[str, str] | None = None, **more: str) -> Run:
        """`sandboxd drain` with the variables of `env` and `more`, waited for up to `timeout` seconds."""
        return self.wait(self.start("drain", *args, **(env or {}), **more), timeout)

    def signal(self, run: Run, signum: int = signal.SIGTERM) -> None:
        run.process.send_signal(signum)

    def leftovers(self) -> dict[str, list[str]]:
        return managed_leftovers(self.docker, self.worker_id)

    def staging_leftovers(self) -> list[str]:
        staging = self.state_dir / "staging"
        return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


@pytest.fixture
def harness(tmp_path: Path, sandbox_image: str, docker_client: Any) -> Iterator[Harness]:
    with ControlPlane(Scenario(lease_ttl_seconds=30)) as cp:
        h = Harness(cp, tmp_path, sandbox_image, docker_client)
        yield h
        for run in h.runs:
            if run.process.poll() is None:
                run.process.kill()
                run.process.wait()
        # Whatever a test did, its containers must not outlive it (and must not leak into others).
        leftovers = h.leftovers()
        for name in leftovers["containers"]:
            docker_client.api.remove_container(name, force=True, v=True)
        for name in leftovers["volumes"]:
            docker_client.api.remove_volume(name, force=True)
        shutil.rmtree(h.socket_dir, ignore_errors=True)
        unmount_workspace_disks(h.state_dir)


def unmount_workspace_disks(state_dir: Path) -> None:
    """Workspace filesystems a killed daemon left mounted (pytest could not delete its tmp dir)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        if target.startswith(str(state_dir / "disks") + "/"):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True)


class ContainerCounter:
    """Samples how many of one instance's sandboxes exist at once, in a background thread."""

    def __init__(self, docker: Any, instance: str, interval: float = 0.05) -> None:
        self._docker, self._instance, self._interval = docker, instance, interval
        self.peak = 0
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        filters = {"label": ["io.sandboxd.managed=true", f"io.sandboxd.instance={self._instance}"]}
        while not self._stop.is_set():
            found = [c for c in self._docker.api.containers(all=True, filters=filters)  # sandboxes, not the
                     if (c.get("Labels") or {}).get("io.sandboxd.role") != "limits-probe"]  # start-up limits probe
            self.peak = max(self.peak, len(found))
            self.seen.update(c["Id"] for c in found)
            time.sleep(self._interval)

    def __enter__(self) -> ContainerCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# The git and file servers of the integration suite, for the workspace e2e tests.
from tests.integration.conftest import file_server, git_fixture  # noqa: E402,F401
