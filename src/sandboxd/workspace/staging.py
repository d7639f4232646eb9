"""One session's staging area on the daemon's disk, and the byte budget of its workspace.

`state_dir/staging/<work_id>/` holds `tree/` (what becomes /workspace), `downloads/` (files
being streamed, moved into the tree only once complete and verified) and `workspace.tar`. The
directory is private to the daemon (0700) and removed whole when the session's workspace has
been delivered or has failed; directories left by a crash are reaped at start-up.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath

import anyio

from ..errors import WorkspaceError


class Budget:
    """Bytes a workspace may still take (setting workspace_max_bytes)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    @property
    def remaining(self) -> int:
        return max(0, self.max_bytes - self.used)

    def take(self, size: int, what: str) -> None:
        if self.used + size > self.max_bytes:
            raise WorkspaceError("too_large", f"{what}: the workspace would exceed workspace_max_bytes="
                                 f"{self.max_bytes}")
        self.used += size


def _safe_name(work_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", work_id)[:128] or "_"


class Staging:
    """The staging directory of one work item."""

    def __init__(self, staging_root: Path, work_id: str) -> None:
        self.root = staging_root / _safe_name(work_id)
        self.tree = self.root / "tree"
        self.downloads = self.root / "downloads"
        self.archive = self.root / "workspace.tar"
        self._placed: set[Path] = set()

    async def create(self) -> None:
        await self.remove()  # a directory left by a crashed run of the same item
        await anyio.Path(self.root.parent).mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in (self.root, self.tree, self.downloads):
            await anyio.Path(path).mkdir(mode=0o700)

    async def remove(self) -> None:
        """Idempotent; safe to call while cancelled (runs shielded)."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, self.root, True)

    def target(self, relative: PurePosixPath) -> Path:
        return self.tree.joinpath(*relative.parts)

    def parent_for_file(self, relative: PurePosixPath, what: str) -> Path:
        """Create the parent directories of a file target; refuse one that resolves outside the tree.

        Files may land inside a repository checkout, whose directories may be symlinks: one that
        leads out of the workspace fails with `path_escape`.
        """
        real_tree = os.path.realpath(self.tree)
        parent = self.tree
        for part in relative.parts[:-1]:
            parent = parent / part
            if parent.is_symlink() or parent.exists():
                real = os.path.realpath(parent)
                if real != real_tree and not real.startswith(real_tree + os.sep):
                    raise WorkspaceError("path_escape", f"{what}: {relative} crosses a symlink out of the workspace")
                if not os.path.isdir(real):
                    raise WorkspaceError("invalid_metadata", f"{what}: {parent.relative_to(self.tree)} is not a "
                                         "directory")
            else:
                parent.mkdir(mode=0o755)
        return parent

    def place(self, download: Path, relative: PurePosixPath, what: str) -> None:
        """Move a complete download to its target (blocking). An existing file or symlink of a checkout is
        replaced, never written through; an existing directory or an earlier file is an error."""
        parent = self.parent_for_file(relative, what)
        target = Path(os.path.realpath(parent)) / relative.name
        if target.is_dir() and not target.is_symlink():
            raise WorkspaceError("invalid_metadata", f"{what}: {relative} is a directory")
        # A Files API file's own name is known only now, so two entries may still meet here.
        if target in self._placed:
            raise WorkspaceError("invalid_metadata", f"{what}: another file entry already targets {relative}")
        if target.is_symlink() or target.exists():
            target.unlink()
        os.chmod(download, 0o644)
        os.rename(download, target)
        self._placed.add(target)


async def reap(staging_root: Path) -> list[str]:
    """Remove staging directories left by a previous run of the daemon; returns their names."""
    root = anyio.Path(staging_root)
    if not await root.is_dir():
        return []
    names = sorted([p.name async for p in root.iterdir()])
    for name in names:
        await anyio.to_thread.run_sync(shutil.rmtree, staging_root / name, True)
    return names
