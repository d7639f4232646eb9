"""Workspace preparation from session metadata (git repositories and files into /workspace).

Public surface used by the session supervisor:

    workspaces = Workspaces(config)                     # built once from the settings
    plan = workspaces.plan(metadata)                    # pure validation; raises WorkspaceError
    async with workspaces.prepare(plan, work_id) as archive:   # fetch; archive is a tar file or None
        ...deliver archive into the sandbox...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO


@dataclass(frozen=True)
class WorkspacePlan:
    """What a session's metadata asks to be fetched."""

    @property
    def empty(self) -> bool:
        return True


class Workspaces:
    """Plans and prepares session workspaces."""

    def plan(self, metadata: Mapping[str, str]) -> WorkspacePlan:
        return WorkspacePlan()

    @asynccontextmanager
    async def prepare(self, plan: WorkspacePlan, work_id: str) -> AsyncIterator[IO[bytes] | None]:
        yield None
