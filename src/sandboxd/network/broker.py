"""The API broker: a sandbox's only path to the Managed Agents API, a unix socket in the daemon.

A sandbox has no network. The daemon serves this broker on a unix socket in a directory it
bind-mounts into the sandbox, and the SDK inside speaks HTTPS over that socket. Each connection is
forwarded byte for byte to one fixed host:port (the API host): TLS stays end to end between the
sandbox and the API, so the broker holds no credential, parses nothing, and can reach nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc

from .sockets import serve_connections, splice, unix_listener

log = logging.getLogger(__name__)

ErrorHook = Callable[[BaseException], None]


def api_target(base_url: str) -> tuple[str, int]:
    """The host and port a base URL points at: `https://api.anthropic.com` -> (`api.anthropic.com`, 443)."""
    url = urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"not an http(s) base URL: {base_url!r}")
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


class ApiBroker:
    """Forwards every connection on `socket_path` to `host:port`, at most `max_connections` at once.

    `on_error` is called with the exception whenever the target cannot be connected to (the
    sandbox's client then sees its connection closed, and retries as it would any network error).
    """

    def __init__(self, socket_path: Path, host: str, port: int, *, max_connections: int = 64,
                 connect_timeout_seconds: float = 10.0, on_error: ErrorHook | None = None) -> None:
        self.socket_path = socket_path
        self.host = host
        self.port = port
        self._max_connections = max_connections
        self._connect_timeout_seconds = connect_timeout_seconds
        self._on_error = on_error

    @classmethod
    def for_base_url(cls, base_url: str, socket_path: Path, **options: Any) -> ApiBroker:
        """A broker to the host of `base_url` (options as in the constructor)."""
        host, port = api_target(base_url)
        return cls(socket_path, host, port, **options)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started, and forward until cancelled; the socket file is removed on exit."""
        async with unix_listener(self.socket_path) as listener:
            log.info("broker_listening socket=%s target=%s:%d", self.socket_path, self.host, self.port)
            task_status.started()
            await serve_connections(listener, self._forward, max_connections=self._max_connections, name="broker")

    async def _forward(self, client: anyio.abc.ByteStream) -> None:
        try:
            with anyio.fail_after(self._connect_timeout_seconds):
                upstream = await anyio.connect_tcp(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            log.warning("broker_connect_failed target=%s:%d error=%s", self.host, self.port, exc or "timeout")
            if self._on_error is not None:
                self._on_error(exc)
            return
        async with upstream:
            await splice(client, upstream)
