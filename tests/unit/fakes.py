"""In-memory stand-ins for the daemon's I/O objects (queue, container backend), for unit tests.

`FakeBackend` plays the engine and the in-sandbox entrypoint at once: a created sandbox reports
`ready` on its "stdout", an assigned one reports its first heartbeat, then runs for
`run_seconds` and exits with `exit_status`; a stopped one exits as the entrypoint does on SIGTERM
(its worker stopped its item). Sandboxes an earlier daemon left are added with `leave`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import anyio.lowlevel
from anthropic.types.beta.environments import BetaSelfHostedWork, BetaSessionWorkData

from sandboxd.containers import AssignmentRecord, Found, Runtime, Sandbox, SandboxSpec
from sandboxd.errors import EngineError, LaunchError
from sandboxd.protocol import Event, ExitCode, event_line
from sandboxd.settlement import ItemRef

SIGTERM_UNASSIGNED = 143  # a sandbox waiting for its assignment dies of SIGTERM
REMOVED = 137  # `docker rm -f` kills what still runs


async def eventually(condition: Callable[[], object]) -> None:
    """Poll `condition` for up to 3 s: the fakes change state from other tasks."""
    for _ in range(600):
        if condition():
            return
        await anyio.sleep(0.005)
    raise AssertionError("the condition did not hold within 3 s")


def secret_for(token: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"sessions_token": token}).encode()).decode().rstrip("=")


def work_item(n: int, *, kind: str = "session", secret: str | None = "default") -> BetaSelfHostedWork:
    return BetaSelfHostedWork.model_construct(
        id=f"work_{n}",
        environment_id="env_test",
        created_at="2026-12-01T00:00:00Z",
        metadata={},
        state="queued",
        type="work",
        # The generated type models only session data; the queue also holds other kinds (healthcheck).
        data=cast(BetaSessionWorkData, _Data(kind, f"sesn_{n}")),
        secret=secret_for(f"tok_{n}") if secret == "default" else secret,
    )


def record_for(n: int, *, started: float | None = None, deadline_in: float = 30.0) -> AssignmentRecord:
    """The assignment record an earlier daemon left for work item `n`."""
    started = time.time() - 5 if started is None else started
    return AssignmentRecord(ItemRef(f"work_{n}", "env_test", f"sesn_{n}"), started, time.time() + deadline_in)


@dataclass
class _Data:
    type: str
    id: str


class _Health:
    def seconds_since_success(self) -> float | None:
        return 0.0


@dataclass
class FakeQueue:
    items: list[BetaSelfHostedWork] = field(default_factory=list)
    metadata: Mapping[str, str] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    environment_id: str = "env_test"
    health: _Health = field(default_factory=_Health)
    claimed_while: list[int] = field(default_factory=list)
    running: Any = None  # callable returning the daemon's running count, set by tests

    async def claims(self, *, drain: bool) -> AsyncIterator[BetaSelfHostedWork]:
        for item in self.items:
            await anyio.lowlevel.checkpoint()
            if self.running is not None:
                self.claimed_while.append(self.running())
            yield item
        if not drain:
            await anyio.sleep_forever()

    async def force_stop(self, item: ItemRef) -> None:
        assert isinstance(item, ItemRef), item
        self.stopped.append(item.work_id)

    async def session_status(self, session_id: str) -> str | None:
        return self.statuses.get(session_id)

    async def session_metadata(self, item: BetaSelfHostedWork) -> Mapping[str, str]:
        return self.metadata


@dataclass
class _Run:
    """One fake sandbox's life as its entrypoint would live it."""

    lines: list[bytes]
    run_seconds: float
    exit_status: int
    assigned: anyio.Event = field(default_factory=anyio.Event)
    exited: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    status: int = -1
    oom: bool = False

    def emit(self, line: bytes) -> None:
        self.lines.append(line)
        self._wake()

    def exit(self, status: int, *, oom: bool = False) -> None:
        if not self.exited.is_set():
            self.status, self.oom = status, oom
            self.exited.set()
            self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


def fake_spec(instance: str = "test-instance") -> SandboxSpec:
    return SandboxSpec(image="sandboxd-sandbox:test", user="1000:1000", network_mode="none", memory_limit="1g",
                       cpus=1.0, pids_limit=256, tmp_size="64m", base_url="http://api.invalid",
                       max_idle_seconds=60, instance=instance)


@dataclass
class FakeBackend:
    """Sandboxes that 'run' for `run_seconds` after their assignment and exit with `exit_status`."""

    exit_status: int = ExitCode.SERVED
    run_seconds: float = 0.01
    oom_killed: bool = False
    launch_error: LaunchError | None = None
    create_seconds: float = 0.0
    image: str = "sha256:one"
    images: list[str | None] = field(default_factory=list)  # each create's `image` (None: the default)
    image_error: LaunchError | None = None
    ready: bool = True  # created sandboxes report `ready` on their stdout
    stop_status: int = ExitCode.CANCELLED  # an assigned sandbox's exit on SIGTERM: its worker stopped the item
    spec: SandboxSpec = field(default_factory=fake_spec)
    concurrent: int = 0
    peak: int = 0
    create_calls: int = 0
    named: int = 0
    sent: list[bytes] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    put: list[str] = field(default_factory=list)
    disk: dict[str, int] = field(default_factory=dict)  # what workspace_bytes answers, by sandbox name
    engine_down: bool = False  # remove() cannot reach the engine; ping() fails
    found: list[Found] = field(default_factory=list)
    created: list[Sandbox] = field(default_factory=list)
    clock: Callable[[], float] = time.time
    _runs: dict[str, _Run] = field(default_factory=dict)
    _live: set[str] = field(default_factory=set)
    _closed: set[str] = field(default_factory=set)

    # --- test helpers -------------------------------------------------------------------------

    def leave(self, record: AssignmentRecord | None, *, running: bool = True, exit_status: int = ExitCode.SERVED,
              run_seconds: float = 0.05, oom_killed: bool = False, container_id: str = "c") -> Sandbox:
        """A sandbox an earlier daemon left on the engine (found by `owned`); its events replay from its start."""
        n = len(self.found)
        name = f"sandboxd-left-{n}"
        sandbox = Sandbox(f"{container_id}-left-{n}" if container_id else "", name, self.image,
                          self.clock() - 10, record=record)
        past = time.time() - 10
        lines = [event_line(Event.READY, past)]
        if record is not None:
            lines.append(event_line(Event.HEARTBEAT, past + 1, first=True))
            lines.append(event_line(Event.TOOL_END, past + 2, tool="bash", outcome="ok", seconds=0.5))
        run = _Run(lines, run_seconds, exit_status)
        if record is not None:
            run.assigned.set()
        if not running:
            run.exit(exit_status, oom=oom_killed)
        self._runs[name] = run
        self._arrive(name)
        self.found.append(Found(sandbox, running, -1 if running else exit_status, oom_killed if not running else False))
        return sandbox

    def label(self, sandbox: Sandbox) -> str:
        """The work id of an assigned sandbox, else its name (what `stopped` and `removed` hold)."""
        return sandbox.record.item.work_id if sandbox.record is not None else sandbox.name

    def emit(self, sandbox: Sandbox, event: Event, at: float | None = None, **fields: Any) -> None:
        self._runs[sandbox.name].emit(event_line(event, time.time() if at is None else at, **fields))

    def crash(self, sandbox: Sandbox, status: int = REMOVED, *, oom: bool = False) -> None:
        self._runs[sandbox.name].exit(status, oom=oom)

    def exited(self, sandbox: Sandbox) -> bool:
        return self._runs[sandbox.name].exited.is_set()

    @property
    def live(self) -> set[str]:
        """Names of the sandboxes that exist on the fake engine (created or left, not removed)."""
        return set(self._live)

    def _arrive(self, name: str) -> None:
        self._live.add(name)
        self.concurrent = len(self._live)
        self.peak = max(self.peak, self.concurrent)

    # --- the backend ----------------------------------------------------------------------------

    async def ping(self) -> bool:
        return not self.engine_down

    async def image_id(self, image: str | None = None) -> str:
        await anyio.lowlevel.checkpoint()
        if self.image_error is not None:
            raise self.image_error
        return self.image if image is None else f"sha256:{image}"

    def image_readiness(self) -> tuple[bool, str]:
        return (False, f"sandbox image: {self.image_error}") if self.image_error else (True, "")

    async def runtime(self, *, volume: bool = False) -> Runtime:
        await anyio.lowlevel.checkpoint()
        return Runtime(self.image, "sandboxd-runtime-fake")

    def new_sandbox(self) -> Sandbox:
        self.named += 1
        return Sandbox("", f"sandboxd-fake-{self.named}", created_at=self.clock())

    async def create(self, sandbox: Sandbox | None = None, *, image_id: str | None = None,
                     image: str | None = None) -> Sandbox:
        self.create_calls += 1
        self.images.append(image)
        if self.create_seconds:
            await anyio.sleep(self.create_seconds)
        else:
            await anyio.lowlevel.checkpoint()
        if self.launch_error is not None:
            raise self.launch_error
        n = self.create_calls
        sandbox = sandbox or self.new_sandbox()
        sandbox.container_id, sandbox.image_id = f"c-{n}", image_id or await self.image_id(image)
        lines = [event_line(Event.READY, time.time())] if self.ready else []
        self._runs[sandbox.name] = _Run(lines, self.run_seconds, self.exit_status)
        self._arrive(sandbox.name)
        self.created.append(sandbox)
        return sandbox

    async def assign(self, sandbox: Sandbox, record: AssignmentRecord, line: bytes) -> None:
        sandbox.record = record
        await self.send(sandbox, line)
        run = self._runs[sandbox.name]
        run.assigned.set()
        run.emit(event_line(Event.HEARTBEAT, time.time(), first=True))

    async def send(self, sandbox: Sandbox, data: bytes) -> None:
        await anyio.lowlevel.checkpoint()
        if sandbox.name in self._closed or sandbox.name not in self._live:
            raise EngineError("the sandbox's stdin is closed")
        self.sent.append(data)

    async def close_stdin(self, sandbox: Sandbox) -> None:
        self._closed.add(sandbox.name)

    async def put_workspace(self, sandbox: Sandbox, archive: Any) -> None:
        await anyio.lowlevel.checkpoint()
        self.put.append(self.label(sandbox))

    def workspace_stream(self, sandbox: Sandbox) -> Iterator[bytes]:
        return iter([b""])

    async def wait(self, sandbox: Sandbox) -> tuple[int, bool]:
        run = self._runs[sandbox.name]
        async with anyio.create_task_group() as tg:
            async def exited() -> None:
                await run.exited.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            await run.assigned.wait()
            with anyio.move_on_after(run.run_seconds):
                await run.exited.wait()
            run.exit(run.exit_status, oom=self.oom_killed)
        return run.status, run.oom

    async def events(self, sandbox: Sandbox) -> AsyncIterator[bytes]:
        run = self._runs[sandbox.name]
        seen = 0
        while True:
            while seen < len(run.lines):
                seen += 1
                yield run.lines[seen - 1]
            if run.exited.is_set():
                return
            await run.changed.wait()

    async def stop(self, sandbox: Sandbox, timeout_seconds: float) -> None:
        await anyio.lowlevel.checkpoint()
        self.stopped.append(self.label(sandbox))
        run = self._runs[sandbox.name]
        run.exit(self.stop_status if run.assigned.is_set() else SIGTERM_UNASSIGNED)

    async def logs_tail(self, sandbox: Sandbox, lines: int) -> list[str]:
        return ["last line"]

    async def remove(self, sandbox: Sandbox) -> bool:
        await anyio.lowlevel.checkpoint()
        if self.engine_down:
            return False
        self.removed.append(self.label(sandbox))
        self._closed.add(sandbox.name)
        if sandbox.name in self._runs:
            self._runs[sandbox.name].exit(REMOVED)
        self._live.discard(sandbox.name)
        self.concurrent = len(self._live)
        return True

    async def owned(self) -> list[Found]:
        return list(self.found)

    async def workspace_bytes(self) -> dict[str, int]:
        await anyio.lowlevel.checkpoint()
        return dict(self.disk)
