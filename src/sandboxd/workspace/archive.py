"""The tar archive of a staged workspace, as the engine will extract it into /workspace as root.

The engine honours each member's owner and mode, so the archive, not the staging directory, is
what decides them: every member belongs to the sandbox user (numeric ids, no names), directories
are 0755, files 0755 when executable and 0644 otherwise, with no setuid, setgid or sticky bits.
Only directories, regular files and symlinks that stay inside /workspace are written: a symlink
leading out is left out (and logged), and hard links, devices, fifos and sockets never appear.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import tarfile
from pathlib import Path

log = logging.getLogger(__name__)

WORKSPACE = "/workspace"


def symlink_stays_inside(member: str, target: str) -> bool:
    """Whether a symlink at `member` (relative to /workspace) pointing to `target` stays inside it."""
    if target.startswith("/"):
        resolved = posixpath.normpath(target)
    else:
        resolved = posixpath.normpath(posixpath.join(WORKSPACE, posixpath.dirname(member), target))
    return resolved == WORKSPACE or resolved.startswith(WORKSPACE + "/")


def _info(name: str, st: os.stat_result, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
    info.mtime = int(st.st_mtime)
    return info


def _walk(tree: Path) -> list[tuple[str, str]]:
    """(relative name, absolute path) of everything below `tree`, parents first, without following links."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        relative_dir = os.path.relpath(dirpath, tree)
        for name in sorted(dirnames) + sorted(filenames):
            member = name if relative_dir == "." else f"{relative_dir}/{name}"
            entries.append((member, os.path.join(dirpath, name)))
    return entries


def write_archive(tree: Path, out: Path, *, uid: int, gid: int, work_id: str) -> int:
    """Write the tar of `tree` to `out` (blocking); returns the bytes of file content in it."""
    content = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as archive:
        for member, path in _walk(tree):
            st = os.lstat(path)
            info = _info(member, st, uid, gid)
            if stat.S_ISDIR(st.st_mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.type, info.size = tarfile.REGTYPE, st.st_size
                info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                with open(path, "rb") as handle:
                    archive.addfile(info, handle)
                content += st.st_size
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                if not symlink_stays_inside(member, target):
                    log.warning("workspace_symlink_skipped work_id=%s path=%s reason=leads_outside_workspace",
                                work_id, member)
                    continue
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
                archive.addfile(info)
            else:
                log.warning("workspace_entry_skipped work_id=%s path=%s reason=not_a_file", work_id, member)
    return content
