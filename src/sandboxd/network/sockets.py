"""Unix-socket listeners and byte-for-byte splicing, shared by the API broker, the egress proxy and the relay.

All three do the same two things: accept a bounded number of connections, and copy bytes both
ways between two streams until both ends are done (half-closes passed on). Owning that once keeps
the three network walls identical in how they start, limit and end. Standard library and anyio
only: the relay imports this module inside the sandbox image.

Connections are accepted, and unix ones read and written, with anyio's `wait_readable` and
`wait_writable` rather than anyio's own UNIX stream and listener: on asyncio those register
`Future.set_result` as the reader callback, which raises InvalidStateError ("Exception in callback")
when the wait is cancelled in the same loop iteration as data, EOF or a client arrives, which is
exactly how a splice or a server ends (agronholm/anyio#1267 fixed only the `aclose` half of that race).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import anyio.abc
import anyio.lowlevel

log = logging.getLogger(__name__)

SOCKET_MODE = 0o666  # the sandbox user (any uid) must be able to connect
_CHUNK = 65536
_ACCEPT_RETRY_SECONDS = 0.1

Handler = Callable[[anyio.abc.ByteStream], Awaitable[None]]
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@asynccontextmanager
async def unix_listener(path: Path) -> AsyncIterator[anyio.abc.SocketListener]:
    """Listen on `path` with mode 0666 (its directory created if missing), and remove it on exit.

    A stale socket left by an earlier run is replaced; a socket a live server answers on, or a path
    that is not a socket, raises instead of being taken over.
    """
    await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(path))
        if await _answers(path):
            raise OSError(errno.EADDRINUSE, "a live server listens on this socket", str(path))
    listener = await anyio.create_unix_listener(path, mode=SOCKET_MODE)
    try:
        async with listener:
            yield listener
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.Path(path).unlink(missing_ok=True)


async def _answers(path: Path) -> bool:
    try:
        with anyio.fail_after(1):
            stream = await connect_unix(path)
    except (OSError, TimeoutError):
        return False
    await stream.aclose()
    return True


class UnixStream(anyio.abc.ByteStream):
    """A connected unix socket (owned), read and written with anyio's guarded `wait_readable`/`wait_writable`."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    async def receive(self, max_bytes: int = _CHUNK) -> bytes:
        await anyio.lowlevel.checkpoint()
        while True:
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise self._broken() from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        view = memoryview(item)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise self._broken() from exc
            view = view[sent:]

    def _broken(self) -> Exception:
        return anyio.ClosedResourceError() if self._sock.fileno() < 0 else anyio.BrokenResourceError()

    async def send_eof(self) -> None:
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            anyio.notify_closing(self._sock)  # wakes a task still waiting on it
            self._sock.close()
        await anyio.lowlevel.checkpoint()


async def connect_unix(path: str | Path) -> UnixStream:
    """Connect to a unix socket; raises OSError (e.g. ENOENT, ECONNREFUSED) when nobody listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(os.fspath(path))
                return UnixStream(sock)
            except (BlockingIOError, InterruptedError):  # the listener's backlog is full: wait for room
                await anyio.sleep(_ACCEPT_RETRY_SECONDS)
    except BaseException:
        sock.close()
        raise


async def _accept(raw: socket.socket) -> anyio.abc.ByteStream:
    while True:
        await anyio.wait_readable(raw)
        try:
            conn, _ = raw.accept()
        except (BlockingIOError, InterruptedError):
            continue
        if conn.family == socket.AF_UNIX:
            return UnixStream(conn)
        return await anyio.abc.SocketStream.from_socket(conn)


async def serve_connections(listener: anyio.abc.SocketListener, handler: Handler, *,
                            max_connections: int, name: str) -> None:
    """Accept connections forever, each handled in its own task, at most `max_connections` at once.

    A slot is taken *before* accepting, so excess clients wait in the kernel's backlog instead of
    costing a task each. One connection failing is logged and never ends the server.
    """
    slots = anyio.Semaphore(max_connections)
    raw: socket.socket = listener.extra(anyio.abc.SocketAttribute.raw_socket)
    async with anyio.create_task_group() as tg:
        while True:
            await slots.acquire()
            try:
                stream = await _accept(raw)
            except OSError as exc:  # e.g. EMFILE: back off, keep serving
                slots.release()
                log.warning("accept_failed listener=%s error=%s", name, exc)
                await anyio.sleep(_ACCEPT_RETRY_SECONDS)
                continue
            except BaseException:
                slots.release()
                raise
            tg.start_soon(_handle, handler, stream, slots, name, name=f"{name}-connection")


async def _handle(handler: Handler, stream: anyio.abc.ByteStream, slots: anyio.Semaphore, name: str) -> None:
    try:
        async with stream:
            await handler(stream)
    except _STREAM_ERRORS as exc:
        log.debug("connection_ended listener=%s error=%s", name, exc)
    except Exception as exc:  # noqa: BLE001 - one connection's bug must not end the listener
        log.error("connection_failed listener=%s error=%r", name, exc)
    finally:
        slots.release()


async def splice(a: anyio.abc.ByteStream, b: anyio.abc.ByteStream, *, end_with_b: bool = False) -> None:
    """Copy bytes a->b and b->a until both directions have ended; each end-of-stream is passed on.

    With `end_with_b`, the splice ends as soon as `b` has finished sending (a one-shot HTTP exchange
    whose client may hold its connection open). A reset in either direction ends both.
    """
    async with anyio.create_task_group() as tg:

        async def copy(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, last: bool) -> None:
            try:
                while True:
                    try:
                        chunk = await source.receive(_CHUNK)
                    except anyio.EndOfStream:
                        break
                    await sink.send(chunk)
                with suppress(*_STREAM_ERRORS):
                    await sink.send_eof()
            except _STREAM_ERRORS:
                tg.cancel_scope.cancel()
                return
            if last:
                tg.cancel_scope.cancel()

        tg.start_soon(copy, a, b, False, name="splice-out")
        tg.start_soon(copy, b, a, end_with_b, name="splice-back")
