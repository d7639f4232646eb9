"""/metrics, /healthz and /readyz on one address, and what the two probes answer for the daemon.

Liveness is the event loop ticking (a blocked loop stops ticking). Readiness additionally needs
the Docker engine to answer and a poll to have succeeded recently, unless the daemon is at
capacity and so, by design, not polling. The HTTP server is prometheus-client's threaded WSGI
server in a daemon thread: it answers even while the event loop is blocked, which is what lets
/healthz report a stalled loop instead of timing out.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

import anyio
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .errors import ConfigError

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Probes(Protocol):
    """What /healthz and /readyz ask: each answer is (healthy, short reason)."""

    def live(self) -> tuple[bool, str]: ...

    def ready(self) -> tuple[bool, str]: ...


@dataclass(kw_only=True)
class Liveness:
    """The process's main loop is making progress: something calls `tick` at least every window."""

    liveness_window_seconds: float = 30.0
    last_tick: float = field(default_factory=time.monotonic)

    def tick(self) -> None:
        self.last_tick = time.monotonic()

    def live(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self.last_tick
        if stalled > self.liveness_window_seconds:
            return False, f"main loop stalled for {stalled:.0f}s"
        return True, "ok"


@dataclass(kw_only=True)
class HealthState(Liveness):
    """Shared by the daemon's loops (writers) and the HTTP endpoints (readers)."""

    poll_window_seconds: float
    seconds_since_poll: Callable[[], float | None] = lambda: None
    at_capacity: Callable[[], bool] = lambda: False
    all_slots_stalled: Callable[[], bool] = lambda: False
    # (limits hold or may be waived, detail naming the unenforced ones): sandboxd.limits.SandboxLimits.readiness
    sandbox_limits: Callable[[], tuple[bool, str]] = lambda: (True, "")
    # (no session can start without them, a note): sandboxd.containers.DockerBackend.image_readiness
    images: Callable[[], tuple[bool, str]] = lambda: (True, "")
    engine_ok: bool = False
    polling: bool = False  # the poll loop is running (false before start-up and after shutdown began)
    started_at: float = field(default_factory=time.monotonic)

    def ready(self) -> tuple[bool, str]:
        live, why = self.live()
        if not live:
            return False, why
        if not self.engine_ok:
            return False, "docker engine not answering"
        limits_ok, limits = self.sandbox_limits()
        if not limits_ok:
            return False, limits
        images_ok, images = self.images()
        if not images_ok:
            return False, images
        limits = "; ".join(note for note in (limits, images) if note)
        if not self.polling:
            return False, "not polling"
        if self.all_slots_stalled():
            return False, "every session slot is held by a stalled session"
        if self.at_capacity():
            return True, f"ok (at capacity; {limits})" if limits else "ok (at capacity)"
        since = self.seconds_since_poll()
        if since is None:
            if time.monotonic() - self.started_at > self.poll_window_seconds:
                return False, "no poll has succeeded yet"
            return False, "waiting for the first poll"
        if since > self.poll_window_seconds:
            return False, f"last successful poll {since:.0f}s ago"
        return True, f"ok ({limits})" if limits else "ok"


def health_app(registry: CollectorRegistry, probes: Probes) -> WsgiApp:
    """The WSGI app: /metrics (Prometheus exposition), /healthz, /readyz (200 or 503, reason as text)."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path in ("/healthz", "/readyz"):
            ok, reason = probes.live() if path == "/healthz" else probes.ready()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", reason)
        if path == "/":
            return _text(start_response, "200 OK", "sandboxd: /metrics /healthz /readyz")
        return _text(start_response, "404 Not Found", "not found")

    return app


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = (body + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes and probes would drown the daemon's own lines."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


class HealthServer:
    """The HTTP server in a daemon thread; `start` binds (raises ConfigError if it cannot), `stop` is idempotent."""

    def __init__(self, address: str, registry: CollectorRegistry, probes: Probes) -> None:
        self.host, self.port = split_address(address)
        self._app = health_app(registry, probes)
        self._server: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            server = make_server(self.host, self.port, self._app, Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(
                f"`metrics_address` {self.host}:{self.port} cannot be served ({exc.strerror or exc}); "
                "choose another port, or an empty value to disable it"
            ) from None
        self._server, self.port = server, int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="sandboxd-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); an empty host means every IPv4 address."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


@asynccontextmanager
async def serving(address: str | None, registry: CollectorRegistry, probes: Probes) -> AsyncIterator[str | None]:
    """Serve the endpoints for the duration of the block; yields the base URL (None when disabled)."""
    if not address:
        yield None
        return
    server = HealthServer(address, registry, probes).start()
    try:
        yield server.url
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(server.stop)
