"""No secret value in any log line, at DEBUG, in text and JSON: whole sessions run through the real
daemon wiring (`run_daemon`: poller, supervisor, health server, in-process queue-stats collector)
against the local control plane over HTTP. Only the container engine is replaced: each "container"
is the sandbox entrypoint (`sandboxd.entrypoint.ItemServer`, the SDK's EnvironmentWorker) run as a
task in this process, so its log lines land in the same captured stream.

The fake engine is deliberately careless: it logs every stdin line it receives (the assignment,
with the work item's secret) and returns it again as the container's log tail, which the daemon
copies into its own log. Those lines must come out redacted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sandboxd import logs
from sandboxd.assembly import run_daemon, sandbox_spec
from sandboxd.controlplane import ControlPlane, Expect, Scenario, ScriptedSession, ToolStep
from sandboxd.entrypoint import ItemServer
from sandboxd.metrics import Metrics
from sandboxd.protocol import Assignment, parse_line, sessions_token_from_secret
from sandboxd.settings import Settings

careless = logging.getLogger("sandboxd.tests.engine")
NOISY = ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "docker")


@dataclass
class Box:
    """One in-process "container": its stdin stream, exit status and cancel scope."""

    name: str
    send: MemoryObjectSendStream[bytes]
    receive: MemoryObjectReceiveStream[bytes]
    container_id: str = "in-process"
    image_id: str = "in-process"
    created_at: float = field(default_factory=time.time)
    record: Any = None
    lines: list[str] = field(default_factory=list)
    status: int | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class InProcessEngine:
    """The container backend's interface, with the sandbox entrypoint run as a task in `tg`."""

    def __init__(self, tg: anyio.abc.TaskGroup, workdir: Path) -> None:
        self._tg, self._workdir = tg, workdir
        self.assignments: list[dict[str, Any]] = []
        self.records: list[Any] = []

    async def ping(self) -> bool:
        return True

    async def owned(self) -> list[Any]:
        return []

    async def image_id(self, image: str | None = None) -> str:
        return "in-process"

    def image_readiness(self) -> tuple[bool, str]:
        return True, ""

    def new_sandbox(self) -> Box:
        send, receive = anyio.create_memory_object_stream[bytes](16)
        return Box(f"inproc-{len(self.assignments)}-{time.monotonic_ns()}", send, receive)

    async def create(self, box: Box | None = None, *, image_id: str | None = None, image: str | None = None) -> Box:
        box = box or self.new_sandbox()
        self._tg.start_soon(self._run, box, name=f"sandbox {box.name}")
        return box

    async def assign(self, box: Box, record: Any, line: bytes) -> None:
        box.record = record
        self.records.append(record)
        await self.send(box, line)

    async def events(self, box: Box) -> Any:
        await box.done.wait()
        return
        yield b""

    async def workspace_bytes(self) -> dict[str, int]:
        return {}

    async def _run(self, box: Box) -> None:
        with box.scope:
            message = parse_line(await box.receive.receive())
            self.assignments.append(message)
            workdir = self._workdir / box.name
            workdir.mkdir(parents=True)
            sandbox = ItemServer(str(workdir), max_idle=5.0)
            code = await sandbox.serve(Assignment.from_message(message), message.get("environment_key"), box.receive)
            box.status = int(code)
        if box.status is None:
            box.status = 137
        box.done.set()

    async def send(self, box: Box, data: bytes) -> None:
        text = data.decode().strip()
        careless.debug("sandbox_stdin container=%s line=%s", box.name, text)
        box.lines.append(text)
        await box.send.send(data)

    async def wait(self, box: Box) -> tuple[int, bool]:
        await box.done.wait()
        assert box.status is not None
        return box.status, False

    async def stop(self, box: Box, timeout_seconds: float) -> None:
        box.scope.cancel()

    async def put_workspace(self, box: Box, archive: IO[bytes]) -> None:
        pass

    async def logs_tail(self, box: Box, lines: int) -> list[str]:
        return [f"stdin was: {line}" for line in box.lines][-lines:]

    async def remove(self, box: Box) -> None:
        box.scope.cancel()
        await box.send.aclose()
        await box.receive.aclose()


@pytest.fixture
def captured() -> Iterator[None]:
    """Restore the root logger after the test reconfigured it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {n: logging.getLogger(n).level for n in NOISY}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in noisy.items():
        logging.getLogger(name).setLevel(value)


@pytest.fixture
def plane(monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:
    for name in [n for n in os.environ if n.startswith(("ANTHROPIC_", "SANDBOXD_"))]:
        monkeypatch.delenv(name)
    echo = ToolStep(name="bash", input={"command": "echo hello-from-the-tool"},
                    expect=Expect(is_error=False, contains=["hello-from-the-tool"]))
    scenario = Scenario(
        sessions=[
            ScriptedSession(steps=[echo]),
            ScriptedSession(steps=[echo, echo]),
            ScriptedSession(secret="none"),  # no sessions token: failed before any container
            ScriptedSession(heartbeat_status=403),  # the lease is refused: the sandbox fails
        ],
        healthchecks=1,
    )
    with ControlPlane(scenario) as cp:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", cp.url)  # the in-sandbox entrypoint's contract
        yield cp


def settings_for(plane: ControlPlane, tmp_path: Path) -> Settings:
    return Settings(
        environment_id=plane.environment_id,
        environment_key=plane.environment_key,
        api_key=plane.api_key,
        base_url=plane.url,
        metrics_address="127.0.0.1:0",
        stats_interval_seconds=0.2,
        max_sessions=2,
        state_dir=tmp_path / "state",
        log_level="DEBUG",
        network_mode="host",  # the in-process "sandboxes" share the test's network
        warm_pool_size=0,
        workspace_retention_seconds=0,
    )


async def drain(plane: ControlPlane, tmp_path: Path, metrics: Metrics) -> tuple[Any, InProcessEngine]:
    settings = settings_for(plane, tmp_path)
    async with anyio.create_task_group() as tg:
        engine = InProcessEngine(tg, tmp_path / "sandboxes")
        with anyio.fail_after(120):
            summary = await run_daemon(settings, drain=True, metrics=metrics, backend=engine)  # type: ignore[arg-type]
        tg.cancel_scope.cancel()
    return summary, engine


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_secret_reaches_a_log_line_at_debug(
    plane: ControlPlane, tmp_path: Path, captured: None, fmt: str
) -> None:
    stream = io.StringIO()
    settings = settings_for(plane, tmp_path)
    # As `sandboxd.cli.main` does: configure, then register the configured keys.
    redactor = logs.configure(fmt, settings.log_level, stream=stream)
    redactor.add(s.get_secret_value() for s in (settings.environment_key, settings.api_key) if s)
    for name in NOISY:  # every logger at DEBUG, the HTTP stacks included
        logging.getLogger(name).setLevel(logging.DEBUG)
    metrics = Metrics()

    summary, engine = await drain(plane, tmp_path, metrics)

    assert sorted(r.outcome.value for r in summary.results) == ["failed", "failed", "succeeded", "succeeded"]
    assert summary.healthchecks == 1
    # The in-process queue-stats collector ran, with the API key.
    assert metrics.registry.get_sample_value("sandboxd_queue_stats_up", {"environment_id": plane.environment_id}) == 1
    item_secrets = [a["secret"] for a in engine.assignments]
    tokens = [sessions_token_from_secret(s) for s in item_secrets]
    secrets = {plane.environment_key, plane.api_key, *item_secrets, *tokens}
    assert len(engine.assignments) == 3 and all(tokens) and None not in secrets
    # The API key (queue stats) stays with the daemon: neither a sandbox's spec nor its stdin holds it.
    assert plane.api_key not in json.dumps(engine.assignments) + repr(sandbox_spec(settings))

    output = stream.getvalue()
    lines = output.splitlines()
    assert len(lines) > 50 and "sandbox_stdin" in output and "stdin was:" in output
    assert logs.REDACTED in output  # the careless lines were there, and were redacted
    assert any("DEBUG" in line or '"level": "debug"' in line for line in lines)
    for secret in secrets:
        assert secret not in output, f"a secret reached the log ({len(secret)} chars)"
    if fmt == "json":
        events = [json.loads(line) for line in lines]
        finished = [e for e in events if e["event"] == "session_finished"]
        assert len(finished) == 4
        assert all({"work_id", "session_id", "outcome", "duration"} <= set(e) for e in finished)
