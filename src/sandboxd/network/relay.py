"""The in-sandbox end of the egress proxy: TCP on loopback, piped to a bind-mounted unix socket.

A sandbox runs with `--network none`, yet its tools expect an HTTP proxy at a TCP address
(`HTTP_PROXY=http://127.0.0.1:3128`). The entrypoint runs this relay, which accepts on the
sandbox's own loopback and pipes each connection, unread, to the egress proxy's unix socket that
the daemon mounted in. Every decision stays in the daemon. Standard library and anyio only.
"""

from __future__ import annotations

import logging
from functools import partial

import anyio
import anyio.abc

from .sockets import connect_unix, serve_connections, splice

log = logging.getLogger(__name__)


async def relay(listen_host: str, listen_port: int, socket_path: str, *, max_connections: int = 128,
                task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
    """Accept TCP on `listen_host:listen_port` and pipe each connection to `socket_path`, until cancelled.

    Reports the bound port as started (so `listen_port=0` picks a free one).
    """
    listeners = await anyio.create_tcp_listener(local_host=listen_host, local_port=listen_port)
    async with listeners:
        listener = listeners.listeners[0]
        assert isinstance(listener, anyio.abc.SocketListener)
        port: int = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("relay_listening address=%s:%d socket=%s", listen_host, port, socket_path)
        task_status.started(port)
        await serve_connections(listener, partial(_pipe, socket_path), max_connections=max_connections, name="relay")


async def _pipe(socket_path: str, client: anyio.abc.ByteStream) -> None:
    try:
        upstream = await connect_unix(socket_path)
    except OSError as exc:
        log.warning("relay_connect_failed socket=%s error=%s", socket_path, exc)
        return
    async with upstream:
        await splice(client, upstream)
