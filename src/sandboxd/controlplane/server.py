"""Running the local control plane.

Owns `ControlPlane`: uvicorn serving the app on 127.0.0.1 (port 0 = any free
port) in a background thread, with thread-safe inspection and scripting
(`state_snapshot`, `add_session`, `set_outage`, `set_faults`, `revoke_lease`,
...), and `write_secret_files`,
which hands the daemon its environment key and API key as 0600 files.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import uvicorn

from .app import build_app
from .scenario import FaultPlan, Scenario, ScriptedSession
from .state import ControlPlaneState, OutageMode

SECRET_FILE_NAMES = ("environment_key", "api_key")


class EnqueuedSession(NamedTuple):
    """The ids of a session added to a running control plane."""

    session_id: str
    work_id: str


def write_secret_files(scenario: Scenario, directory: str | Path) -> dict[str, Path]:
    """Write `environment_key` and `api_key` files (mode 0600) into `directory`."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, value in (("environment_key", scenario.environment_key), ("api_key", scenario.api_key)):
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(value + "\n")
        os.chmod(path, 0o600)
        paths[name] = path
    return paths


class ControlPlane:
    """A local control plane on `host:port` in a background thread; also a context manager."""

    def __init__(self, scenario: Scenario | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.scenario = scenario if scenario is not None else Scenario()
        self.state = ControlPlaneState(self.scenario)
        self.host, self.port = host, port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """`http://HOST:PORT`; with port 0 the real port is known once started."""
        return f"http://{self.host}:{self.port}"

    @property
    def environment_id(self) -> str:
        return self.scenario.environment_id

    @property
    def environment_key(self) -> str:
        return self.scenario.environment_key

    @property
    def api_key(self) -> str:
        return self.scenario.api_key

    def start(self, timeout: float = 10.0) -> ControlPlane:
        """Bind, start serving in a daemon thread; returns once uvicorn accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the control plane was already started")
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets; without it every
        # reply on a kept-alive connection waits ~40 ms for a delayed ACK.
        sock = self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            build_app(self.state), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"controlplane-{self.port}"
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the control plane failed to start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End open streams and hanging requests, then shut uvicorn down (idempotent)."""
        self.state.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def state_snapshot(self) -> dict[str, Any]:
        """The same document as `GET /_cp/state`."""
        return self.state.snapshot()

    def add_session(self, session: ScriptedSession | dict[str, Any] | None = None) -> EnqueuedSession:
        """Register a scripted session and enqueue its work item."""
        spec = session if isinstance(session, ScriptedSession) else ScriptedSession.model_validate(session or {})
        return EnqueuedSession(*self.state.add_session(spec))

    def add_healthcheck(self) -> str:
        """Enqueue a healthcheck work item; returns its work_id."""
        return self.state.add_healthcheck()

    def set_outage(self, mode: OutageMode) -> None:
        """`hang`: every /v1 request blocks until `off`; `error`: every /v1 request is a 503."""
        self.state.set_outage(mode)

    def set_lease_ttl(self, seconds: int) -> None:
        self.state.set_lease_ttl(seconds)

    def request_stop(self, work_id: str) -> dict[str, Any]:
        """Make a held work item `stopping`; its holder learns on the next heartbeat."""
        return self.state.request_stop(work_id)

    def revoke_lease(self, work_id: str) -> dict[str, Any]:
        """Take a held item's lease away: it is queued again, its holder's next heartbeat is 412."""
        return self.state.revoke_lease(work_id)

    def terminate_session(self, session_id: str) -> dict[str, Any]:
        """Terminate a session now, with tool calls pending or not."""
        return self.state.terminate_session(session_id)

    def drop_streams(self, session_id: str) -> int:
        """End the session's open event streams (the runner reconnects); returns how many."""
        return self.state.drop_streams(session_id)

    def set_faults(self, plan: FaultPlan | dict[str, Any]) -> dict[str, Any]:
        """Replace the fault plan (`{}` turns rate-based faults off); returns the faults snapshot."""
        return self.state.set_faults(plan if isinstance(plan, FaultPlan) else FaultPlan.model_validate(plan))

    def write_secret_files(self, directory: str | Path) -> dict[str, Path]:
        """See the module-level `write_secret_files`."""
        return write_secret_files(self.scenario, directory)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0, interval: float = 0.05
    ) -> dict[str, Any]:
        """Poll the snapshot until `predicate(snapshot)` holds; returns it, or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.state_snapshot()
            if predicate(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise TimeoutError(f"control plane condition not met within {timeout}s")
            time.sleep(interval)
