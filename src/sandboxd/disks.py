"""Workspaces bounded by a filesystem, not by a poll: one small ext4 image per sandbox, loop-mounted.

A sandbox's /workspace is a bind mount of the root of its own ext4 filesystem, made with
`workspace_max_bytes` of space and `workspace_max_inodes` inodes. The kernel refuses a write past
either bound with ENOSPC, whether the file is linked or not (an unlinked file still holds its
blocks), and an inode flood ends at the inode count. The image is sparse: it takes on the host
disk what the workspace holds (freed blocks are punched back with `discard`).

This needs the daemon to be root on the engine's own host (a local engine: systemd, a host
install). Elsewhere (a dind sidecar, a remote engine, rootless) the engine cannot be given a
filesystem of ours, and the disk watch's poll is the bound instead (`lifecycle._watch_disk`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_MKFS = ("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard")
_TIMEOUT_SECONDS = 30


class DiskError(Exception):
    """A workspace filesystem could not be made or mounted."""


@dataclass(frozen=True)
class LoopDisks:
    """Makes and destroys the per-sandbox filesystems under `root` (images and mount points)."""

    root: Path
    max_bytes: int
    max_inodes: int
    uid: int
    gid: int

    @staticmethod
    def unavailable(docker_host: str | None) -> str:
        """Why this host cannot bound workspaces with a filesystem ("" when it can)."""
        if docker_host and not docker_host.startswith("unix://"):
            return f"the engine is not local (DOCKER_HOST={docker_host})"
        if os.geteuid() != 0:
            return "the daemon is not root (loop mounts need it)"
        if not Path("/dev/loop-control").exists():
            return "no loop devices (/dev/loop-control)"
        for tool in ("mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return ""

    def mountpoint(self, name: str) -> Path:
        return self.root / name

    def _image(self, name: str) -> Path:
        return self.root / f"{name}.img"

    def make(self, name: str) -> Path:
        """A fresh filesystem for sandbox `name`, mounted and owned by the sandbox user; blocking."""
        image, mountpoint = self._image(name), self.mountpoint(name)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            with open(image, "wb") as out:
                out.truncate(self.max_bytes)
            _run(*_MKFS, "-N", str(self.max_inodes), str(image))
            mountpoint.mkdir(mode=0o755, exist_ok=True)
            _run("mount", "-o", "loop,discard,nosuid,nodev", str(image), str(mountpoint))
            (mountpoint / "lost+found").rmdir()
            os.chown(mountpoint, self.uid, self.gid)
            os.chmod(mountpoint, 0o755)
        except (OSError, DiskError) as exc:
            self.destroy(name)
            raise DiskError(f"could not make the workspace filesystem for {name}: {exc}") from exc
        return mountpoint

    def destroy(self, name: str) -> None:
        """Unmount and delete sandbox `name`'s filesystem (idempotent; blocking)."""
        mountpoint = self.mountpoint(name)
        if os.path.ismount(mountpoint):
            try:
                _run("umount", str(mountpoint))
            except DiskError:
                _run_quietly("umount", "-l", str(mountpoint))  # still busy: detach now, freed when idle
        try:
            mountpoint.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("workspace_disk_cleanup_failed sandbox=%s error=%s", name, exc)
        self._image(name).unlink(missing_ok=True)

    def leftovers(self, keep: set[str]) -> list[str]:
        """Names of filesystems here that belong to no sandbox in `keep` (a crash between make and use)."""
        if not self.root.is_dir():
            return []
        names = {p.name.removesuffix(".img") for p in self.root.iterdir()}
        return sorted(names - keep)


def _run(*argv: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()[-300:]
        raise DiskError(f"{argv[0]} exited {done.returncode}: {message}")


def _run_quietly(*argv: str) -> None:
    try:
        _run(*argv)
    except DiskError as exc:
        log.warning("workspace_disk_cleanup_failed error=%s", exc)
