"""The process inside a sandbox container: the SDK's EnvironmentWorker on the one assigned work item.

Its contract is its environment and stdin (see sandboxd.protocol): `ANTHROPIC_BASE_URL` in the
environment, the assignment on stdin after start. It never holds the environment key unless the
operator allowed it for items without a secret (then it arrives on stdin as `environment_key`).
The worker claims the lease at once; the session fetch, and so every tool call, waits until the
daemon says the workspace is ready. The exit status says how the item ended (`ExitCode`): the
first recorded end reason wins, like the SDK's own lease. On stdout it reports events to the
daemon (ready, heartbeats, tool calls; see sandboxd.protocol).

The process makes itself non-dumpable before it reads its assignment: its memory, environ and
file descriptors in /proc become root-owned, so tools (same uid) cannot read the sessions token.
With `SANDBOXD_API_SOCKET` the API is reached through the daemon's broker on a unix socket (the
sandbox has no network); with `SANDBOXD_EGRESS_SOCKET` tools get the daemon's egress proxy on
127.0.0.1 (`HTTP(S)_PROXY` point there).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.abc
import httpx2
from anthropic import AsyncAnthropic
from anthropic.lib.environments import EnvironmentWorker
from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401

from .network.relay import relay
from .protocol import ABORT, ASSIGNMENT, WORKSPACE_READY, Assignment, Event, ExitCode, event_line, parse_line
from .transport import hooked_http_client, route

log = logging.getLogger("sandboxd.sandbox")


def emit(event: Event, **fields: Any) -> None:
    """One event line on stdout for the daemon (see sandboxd.protocol), never blocking the worker.

    stdout is non-blocking (`main`): a tool flooding the same pipe through /proc/1/fd/1 must not
    stall the worker's event loop, and so its heartbeats. A line that does not fit is dropped
    (events are advisory); lines are shorter than PIPE_BUF, so a write is whole or nothing.
    """
    try:
        os.write(1, event_line(event, time.time(), **fields))
    except OSError:
        pass  # a full pipe, or nobody follows stdout


class _ItemWatch:
    """What the worker's requests said about the item; the first end reason recorded wins."""

    def __init__(self) -> None:
        self.end: ExitCode | None = None
        self.stopped = False  # the worker's stop was accepted (or the item was already stopped: 409)
        self.lease_lost = False  # a heartbeat met 412: another worker holds the item

    def record(self, code: ExitCode) -> None:
        if self.end is None:
            self.end = code

    def __call__(
        self, request: httpx2.Request, response: httpx2.Response | None, exc: BaseException | None, took: float
    ) -> None:
        if response is None:
            return
        kind = route(request)
        if kind == "heartbeat" and response.is_success:
            emit(Event.HEARTBEAT)
        elif kind == "heartbeat" and response.status_code == 412:
            self.lease_lost = True
            self.record(ExitCode.LEASE_LOST)
        elif kind == "heartbeat" and 400 <= response.status_code < 500 and response.status_code not in (408, 429):
            self.record(ExitCode.HEARTBEAT_REJECTED)
        elif kind == "stop" and (response.is_success or response.status_code == 409):
            self.stopped = True


def observed_tools(ctx: AgentToolContext) -> Sequence[Any]:
    """The standard toolset, each call reported as tool_start / tool_end events."""
    tools = beta_agent_toolset_20260401(ctx)
    for tool in tools:
        tool.call = _observed_call(tool.name, tool.call)  # type: ignore[method-assign]
    return tools


def _observed_call(name: str, call: Any) -> Any:
    async def observed(input: object) -> Any:
        emit(Event.TOOL_START, tool=name)
        began, outcome = time.monotonic(), "error"
        try:
            result = await call(input)
            outcome = "ok"
            return result
        finally:
            emit(Event.TOOL_END, tool=name, outcome=outcome, seconds=round(time.monotonic() - began, 3))

    return observed


def make_non_dumpable() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): /proc/<pid>/{mem,environ,fd} become root-owned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(4, 0, 0, 0, 0)) == 0  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        return False


class ItemServer:
    """Serves one assignment: reads control messages, runs the worker, decides the exit code."""

    def __init__(self, workdir: str, max_idle: float, max_file_bytes: int | None = None) -> None:
        self.workdir = workdir
        self.max_idle = max_idle
        self.ready = anyio.Event()
        self.watch = _ItemWatch()
        self._worker_scope = anyio.CancelScope()
        # Built before the assignment arrives (TLS context, client, worker: about 30-50 ms), so a
        # pooled sandbox's first heartbeat follows its assignment at once. None holds a credential:
        # the SDK makes its per-item bearer client inside handle_item.
        http_client, transport = hooked_http_client(gate=self._gate, uds=os.environ.get("SANDBOXD_API_SOCKET"))
        transport.observe(self.watch)
        self.client = AsyncAnthropic(
            base_url=os.environ.get("ANTHROPIC_BASE_URL"), api_key=None, auth_token=None, http_client=http_client
        )
        options: dict[str, Any] = {"max_file_bytes": max_file_bytes} if max_file_bytes else {}
        self.worker = EnvironmentWorker(self.client, workdir=workdir, max_idle=max_idle, tools=observed_tools,
                                        **options)

    async def _gate(self, request: httpx2.Request) -> None:
        # The session fetch precedes skills and the tool runner: holding it holds every tool call,
        # while the heartbeat (started before it) keeps the lease.
        if request.method == "GET" and request.url.path.rstrip("/").rsplit("/", 2)[-2:-1] == ["sessions"]:
            await self.ready.wait()

    async def _read_control(self, lines: AsyncIterator[bytes]) -> None:
        async for raw in lines:
            try:
                message = parse_line(raw)
            except ValueError as exc:
                log.warning("ignoring a malformed control message: %s", exc)
                continue
            if message["type"] == WORKSPACE_READY:
                log.info("workspace ready; tools may run")
                self.ready.set()
            elif message["type"] == ABORT:
                log.error("aborted by the daemon: %s", message.get("reason") or "no reason given")
                self.watch.record(ExitCode.ABORTED)
                self._worker_scope.cancel()
                return
        if not self.ready.is_set():
            log.error("the daemon went away before the workspace was ready")
            self.watch.record(ExitCode.ABORTED)
            self._worker_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.warning("received %s; stopping the session", signal.Signals(signum).name)
                self.watch.record(ExitCode.CANCELLED)
                self._worker_scope.cancel()
                # The SDK lets an in-flight tool call finish (up to its 150 s timeout) before it
                # stops; ending the tools' processes turns that call into an error result at once,
                # so the item is force-stopped well within the container's stop timeout.
                killed = _kill_descendants(os.getpid())
                if killed:
                    log.warning("ended %d tool process(es)", killed)
                return

    async def serve(self, assignment: Assignment, environment_key: str | None, lines: AsyncIterator[bytes]) -> ExitCode:
        error: BaseException | None = None
        async with self.client, anyio.create_task_group() as tg:
            tg.start_soon(self._read_control, lines, name="control")
            tg.start_soon(self._watch_signals, name="signals")
            if os.environ.get("SANDBOXD_EGRESS_SOCKET"):  # tools' HTTP(S)_PROXY, through the daemon's proxy
                await tg.start(relay, "127.0.0.1", int(os.environ.get("SANDBOXD_EGRESS_PORT", "3128")),
                               os.environ["SANDBOXD_EGRESS_SOCKET"])
            worker = self.worker
            with self._worker_scope:
                try:
                    await worker.handle_item(
                        work_id=assignment.work_id,
                        environment_id=assignment.environment_id,
                        session_id=assignment.session_id,
                        work_secret=assignment.secret,
                        environment_key=environment_key,
                    )
                except Exception as exc:  # noqa: BLE001 - reported through the exit code and the log
                    error = exc
                    log.error("worker failed: %s", _causes(exc))
            tg.cancel_scope.cancel()
        return self._exit_code(error)

    def _exit_code(self, error: BaseException | None) -> ExitCode:
        """The end reason, claimed only when the worker's stop was accepted (or the lease met 412).

        Whatever the SDK version does when a lease ends (2.17 stops nothing after a refused
        heartbeat), an item this process did not see stopped exits UNSTOPPED: the daemon stops it.
        """
        if self.watch.lease_lost:
            return ExitCode.LEASE_LOST
        if not self.watch.stopped:
            return ExitCode.UNSTOPPED
        if error is not None:
            self.watch.record(ExitCode.FAILED)
        self.watch.record(ExitCode.SERVED)
        assert self.watch.end is not None
        return self.watch.end


def _kill_descendants(root: int) -> int:
    """SIGKILL every process descended from `root` (the bash tool and what it started)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    doomed, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        doomed.append(pid)
        stack.extend(children.get(pid, []))
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(doomed)


def _causes(exc: BaseException) -> str:
    inner = getattr(exc, "exceptions", None)
    return "; ".join(_causes(e) for e in inner) if inner else f"{type(exc).__name__}: {exc}"


async def _stdin_lines(fd: int) -> AsyncIterator[bytes]:
    """Lines from a pipe, read without a thread so that cancelling the reader is immediate."""
    os.set_blocking(fd, False)
    buffered = b""
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            if buffered.strip():
                yield buffered
            return
        buffered += chunk
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            if line.strip():
                yield line


async def _amain(args: argparse.Namespace) -> ExitCode:
    os.set_blocking(1, False)  # see emit
    if not make_non_dumpable():
        log.warning("could not make the worker non-dumpable; tools may read its memory")
    fd = sys.stdin.fileno()
    if not stat.S_ISFIFO(os.fstat(fd).st_mode) and not stat.S_ISSOCK(os.fstat(fd).st_mode):
        log.error("stdin is not a pipe: this image's entrypoint takes its work item from sandboxd "
                  "(run `sandboxd run`, or attach stdin with `docker run -i`)")
        return ExitCode.BAD_ASSIGNMENT
    lines = _stdin_lines(fd)
    server = ItemServer(args.workdir, args.max_idle, args.max_file_bytes)
    emit(Event.READY)
    try:
        message = parse_line(await anext(lines))
        if message["type"] != ASSIGNMENT:
            raise ValueError(f"expected an assignment, got {message['type']!r}")
        assignment = Assignment.from_message(message)
        environment_key = message.get("environment_key") or None
    except (StopAsyncIteration, ValueError) as exc:
        log.error("no valid assignment on stdin: %s", exc or "stdin closed before a work item was assigned")
        await server.client.close()
        return ExitCode.BAD_ASSIGNMENT
    log.info("assigned work_id=%s session_id=%s", assignment.work_id, assignment.session_id)
    code = await server.serve(assignment, environment_key, lines)
    log.info("finished work_id=%s exit=%s", assignment.work_id, code.name.lower())
    return code


class _DroppingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A log line that does not fit into a full stderr pipe is dropped, not waited for."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sandboxd-sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/workspace")
    parser.add_argument("--max-idle", type=float, default=60.0)
    parser.add_argument("--max-file-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    os.set_blocking(2, False)  # like stdout (see emit): a tool filling the pipe must not stall the worker
    handler = _DroppingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request drowns the session's story
    sys.exit(int(anyio.run(_amain, args)))


if __name__ == "__main__":
    main()
