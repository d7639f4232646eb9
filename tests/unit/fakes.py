"""In-memory stand-ins for the daemon's I/O objects (queue, container backend), for unit tests."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anthropic.types.beta.environments import BetaSelfHostedWork

from sandboxd.containers import Sandbox
from sandboxd.errors import LaunchError
from sandboxd.protocol import ExitCode


def secret_for(token: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"sessions_token": token}).encode()).decode().rstrip("=")


def work_item(n: int, *, kind: str = "session", secret: str | None = "default") -> BetaSelfHostedWork:
    return BetaSelfHostedWork.model_construct(
        id=f"work_{n}",
        environment_id="env_test",
        data=_Data(kind, f"sesn_{n}"),
        secret=secret_for(f"tok_{n}") if secret == "default" else secret,
    )


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

    async def force_stop(self, item: BetaSelfHostedWork) -> None:
        self.stopped.append(item.id)

    async def session_metadata(self, item: BetaSelfHostedWork) -> Mapping[str, str]:
        return self.metadata


@dataclass
class FakeBackend:
    """Sandboxes that 'run' for `run_seconds` and exit with `exit_status`."""

    exit_status: int = ExitCode.SERVED
    run_seconds: float = 0.01
    launch_error: LaunchError | None = None
    concurrent: int = 0
    peak: int = 0
    sent: list[bytes] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    _exits: dict[str, anyio.Event] = field(default_factory=dict)

    async def ping(self) -> bool:
        return True

    async def owned(self) -> list[tuple[Sandbox, str]]:
        return []

    async def launch(self, work_id: str, session_id: str, environment_id: str) -> Sandbox:
        if self.launch_error is not None:
            raise self.launch_error
        self.concurrent += 1
        self.peak = max(self.peak, self.concurrent)
        self._exits[work_id] = anyio.Event()
        return Sandbox(container_id=f"c-{work_id}", name=f"sandboxd-{work_id}", volume="v", work_id=work_id)

    async def send(self, sandbox: Sandbox, data: bytes) -> None:
        self.sent.append(data)

    async def put_workspace(self, sandbox: Sandbox, archive: Any) -> None:
        pass

    async def wait(self, sandbox: Sandbox) -> int:
        with anyio.move_on_after(self.run_seconds):
            await self._exits[sandbox.work_id].wait()
            return ExitCode.CANCELLED  # stopped: the entrypoint's worker force-stopped its item
        return self.exit_status

    async def stop(self, sandbox: Sandbox, timeout_seconds: float) -> None:
        self.stopped.append(sandbox.work_id)
        self._exits[sandbox.work_id].set()

    async def logs_tail(self, sandbox: Sandbox, lines: int) -> list[str]:
        return ["last line"]

    async def remove(self, sandbox: Sandbox) -> None:
        self.concurrent -= 1
        self.removed.append(sandbox.work_id)
