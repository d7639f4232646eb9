"""The git mirror cache: one bare repository per remote on the daemon's disk, reused by sessions.

Layout: `<root>/<host>/<key>.git` (bare mirror), `<key>.lock` (flock; its mtime is the last use)
and `<key>.size` (bytes, written after each use). A mirror is used under an exclusive lock, so
sessions on one repository take turns while sessions on others run freely; a crash leaves at
worst an unlocked lock file and a `*.tmp`/`*.evicting` directory that the next user sweeps. After
each use the least recently used mirrors beyond the size bound are removed, skipping any in use.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from .gitcmd import local_env, run_git
from .urls import Remote

log = logging.getLogger(__name__)

_LOCK_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Mirror:
    """A locked mirror; `created` is true when this use made it (so a failure can drop it again)."""

    path: Path
    created: bool


def _host_dir(remote: Remote) -> str:
    return re.sub(r"[^a-z0-9._-]", "_", remote.hostport.lower())


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files below `path` (blocking; run it in a thread)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


async def _acquire(lock_path: Path, *, wait: bool) -> int | None:
    """An exclusive flock on `lock_path` (polled, so cancellation never strands a waiting thread)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return None
            await anyio.sleep(_LOCK_POLL_SECONDS)
    except BaseException:
        os.close(fd)
        raise


class MirrorCache:
    """Bare mirrors of remotes under `root`, bounded to about `max_bytes` in total."""

    def __init__(self, root: Path, max_bytes: int, git_home: Path) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._git_home = git_home

    def path_of(self, remote: Remote) -> Path:
        return self.root / _host_dir(remote) / f"{remote.cache_key}.git"

    @asynccontextmanager
    async def use(self, remote: Remote) -> AsyncIterator[Mirror]:
        """Exclusive use of the remote's mirror, created empty on first use; evicts others afterwards."""
        path = self.path_of(remote)
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = await _acquire(path.with_suffix(".lock"), wait=True)
        assert fd is not None
        try:
            os.utime(fd)
            created = not (path / "HEAD").is_file()
            if created:
                await self._create(path)
            yield Mirror(path, created)
            await self._record_size(path)
        finally:
            os.close(fd)
        await self.evict()

    async def drop(self, mirror: Mirror) -> None:
        """Remove a mirror this use created (called under its lock when its first fetch failed or was
        cancelled, hence shielded)."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, mirror.path, True)
            mirror.path.with_suffix(".size").unlink(missing_ok=True)

    async def _create(self, path: Path) -> None:
        tmp = path.with_suffix(".git.tmp")
        await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)
        await anyio.to_thread.run_sync(shutil.rmtree, path, True)
        await run_git(["init", "-q", "--bare", "--template=", str(tmp)], local_env(self._git_home))
        # Packs from every fetch would pile up; fetch's own auto-maintenance repacks (never detached).
        await run_git(["config", "gc.auto", "256"], local_env(self._git_home), cwd=tmp)
        await anyio.to_thread.run_sync(os.rename, tmp, path)

    async def _record_size(self, path: Path) -> None:
        if await anyio.Path(path).is_dir():
            size = await anyio.to_thread.run_sync(tree_bytes, path)
            await anyio.Path(path.with_suffix(".size")).write_text(str(size))

    def _entries(self) -> list[tuple[float, int, Path]]:
        entries = []
        for mirror in self.root.glob("*/*.git"):
            try:
                used = mirror.with_suffix(".lock").stat().st_mtime
                size = int(mirror.with_suffix(".size").read_text() or 0)
            except (OSError, ValueError):
                used, size = 0.0, tree_bytes(mirror)
            entries.append((used, size, mirror))
        return sorted(entries, reverse=True)

    async def evict(self) -> None:
        """Remove least recently used mirrors until the cache fits; mirrors in use are skipped."""
        for stale in await anyio.to_thread.run_sync(lambda: list(self.root.glob("*/*.evicting-*"))):
            await anyio.to_thread.run_sync(shutil.rmtree, stale, True)
        total = 0
        for _used, size, mirror in await anyio.to_thread.run_sync(self._entries):
            total += size
            if total > self.max_bytes and await self._remove_if_idle(mirror):
                total -= size

    async def _remove_if_idle(self, mirror: Path) -> bool:
        fd = await _acquire(mirror.with_suffix(".lock"), wait=False)
        if fd is None:
            return False
        try:
            doomed = mirror.with_name(f"{mirror.name}.evicting-{secrets.token_hex(4)}")
            await anyio.to_thread.run_sync(os.rename, mirror, doomed)
            mirror.with_suffix(".size").unlink(missing_ok=True)
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
        await anyio.to_thread.run_sync(shutil.rmtree, doomed, True)
        log.info("git_mirror_evicted mirror=%s", mirror.name)
        return True
