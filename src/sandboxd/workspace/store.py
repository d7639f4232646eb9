"""Per-session snapshots of /workspace that outlive one sandbox, on a local or a shared directory.

A session's sandbox is replaced between its work items; the next one gets back the /workspace the
last one left. Per session the store keeps one compressed tar (copied by `snapshot`) and a manifest
naming it. Several daemons on different hosts may share the root (NFS, EFS, an RWX volume), so
correctness rests only on what those give: a rename within one directory is atomic, files are
fsynced before they are named, and every name a writer creates is unique. No lock is taken; of two
savers of one session the last manifest rename wins, and a snapshot is deleted only once no
manifest, written or in flight, can name it. See docs/workspace-store.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from .snapshot import (
    CHUNK,
    CODECS,
    NAMES_MAX_BYTES,
    SAVE_TIMEOUT_SECONDS,
    CopyStats,
    SnapshotError,
    SnapshotFailure,
    SourceFailed,
    Tap,
    copy_workspace,
)

log = logging.getLogger(__name__)

__all__ = ["CORRUPT_REASONS", "Restored", "RestoreResult", "SnapshotError", "SnapshotFailure", "SnapshotInfo",
           "SweepCounts", "WorkspaceStore"]

FORMAT = 1
MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 64 * 1024
STALE_SECONDS = 3600.0  # a .tmp or unreferenced snapshot this old has no writer any more
_ENTRY = re.compile(r"[0-9a-f]{64}")
_SNAPSHOT = re.compile(r"snap-([A-Za-z0-9-]{1,120})\.tar(?:\.zst|\.gz)?")
_MANIFEST_TMP = re.compile(r"manifest-([A-Za-z0-9-]{1,120})\.json\.tmp")
_LOGGABLE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class RestoreResult(StrEnum):
    """The outcome of a restore (metric label `restore{result}`).

    The store answers hit, miss, expired or corrupt; `discarded` is the caller's: a hit the engine
    refused to extract, deleted so that the session is fetched afresh (sandboxd.retention)."""

    HIT = "hit"
    MISS = "miss"
    EXPIRED = "expired"
    CORRUPT = "corrupt"
    DISCARDED = "discarded"


@dataclass(frozen=True)
class SnapshotInfo:
    """A completed save: what was stored and how long it took."""

    session_id: str
    snapshot: str
    sha256: str
    stored_bytes: int  # the compressed file
    tar_bytes: int  # the uncompressed tar a restore hands out
    content_bytes: int  # regular file content, what max_bytes bounds
    members: int
    dropped: Mapping[str, int]  # kind (device, fifo, hardlink, symlink, other) -> count
    setid_stripped: int
    saved_at: float
    seconds: float
    links_rewritten: int = 0  # symlinks kept with the absolute target they resolve to (see snapshot)


@dataclass
class Restored:
    """A restore's result; on `hit`, `archive` is a verified, uncompressed tar positioned at 0.

    Close it (or use it as a context manager) once put_archive has read it.
    """

    result: RestoreResult
    archive: IO[bytes] | None = None
    stored_bytes: int = 0
    tar_bytes: int = 0
    saved_at: float | None = None
    seconds: float = 0.0
    reason: str | None = None  # why corrupt: one of CORRUPT_REASONS

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()

    def __enter__(self) -> Restored:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class SweepCounts:
    """What one sweep removed, and the store that is left."""

    expired: int = 0
    evicted: int = 0
    tmp_removed: int = 0
    orphans_removed: int = 0
    entries: int = 0
    store_bytes: int = 0


@dataclass(frozen=True)
class _Manifest:
    session_id: str
    snapshot: str
    compression: str
    sha256: str
    stored_bytes: int
    tar_bytes: int
    content_bytes: int
    members: int
    saved_at: float
    saved_by: str

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **self.__dict__}, sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes) -> _Manifest:
        try:
            data = json.loads(raw)
            manifest = cls(**{key: data[key] for key in _FIELD_TYPES})
        except (ValueError, TypeError, KeyError) as exc:
            raise _Corrupt("bad_manifest") from exc
        types_ok = all(isinstance(getattr(manifest, key), kind) and not isinstance(getattr(manifest, key), bool)
                       for key, kind in _FIELD_TYPES.items())
        if (data.get("format") != FORMAT or not types_ok or not _SNAPSHOT.fullmatch(manifest.snapshot)
                or manifest.compression not in CODECS):
            raise _Corrupt("bad_manifest")
        return manifest


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "session_id": str, "snapshot": str, "compression": str, "sha256": str, "stored_bytes": int, "tar_bytes": int,
    "content_bytes": int, "members": int, "saved_at": (int, float), "saved_by": str}


CORRUPT_REASONS = ("bad_manifest", "session_mismatch", "missing_snapshot", "truncated", "size_mismatch",
                   "checksum_mismatch", "decompress_failed", "read_failed")


class _Corrupt(Exception):
    """A snapshot that must not be restored; `reason` is one of CORRUPT_REASONS (bounded, for a label)."""

    def __init__(self, reason: str) -> None:
        assert reason in CORRUPT_REASONS, reason
        super().__init__(reason)
        self.reason = reason


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _unique() -> str:
    """Sortable by time, unique across hosts and processes sharing the store."""
    return f"{time.time_ns():x}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _log_id(session_id: str) -> str:
    """Session ids are untrusted: one that could forge a log field is logged by its hash."""
    if _LOGGABLE.fullmatch(session_id):
        return session_id
    return "sha256:" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on a directory; their renames are durable anyway
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _create(path: Path) -> IO[bytes]:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")


def _unlink(path: Path) -> int:
    """1 if `path` was removed, 0 if it was already gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


class WorkspaceStore:
    """Saves, restores and retires session workspace snapshots below `root` (blocking; run in a thread).

    `max_bytes` bounds one workspace's file content, `max_members` its entries, `max_name_bytes` the
    bytes of all its names and link targets, and `save_timeout_seconds` the time one save may take;
    `store_max_bytes` bounds the whole store (enforced by `sweep`); snapshots older than
    `retention_seconds` expire. Restored archives are spooled in `spool_dir` (the system temp
    directory by default).
    """

    def __init__(self, root: Path, *, max_bytes: int, store_max_bytes: int, retention_seconds: float, uid: int,
                 gid: int, clock: Callable[[], float] = time.time, max_members: int = 500_000,
                 max_name_bytes: int = NAMES_MAX_BYTES, save_timeout_seconds: float = SAVE_TIMEOUT_SECONDS,
                 compression: str = "zstd", spool_dir: Path | None = None) -> None:
        if compression not in CODECS:
            raise ValueError(f"unknown compression {compression!r}")
        self.root = root
        self.max_bytes, self.max_members = max_bytes, max_members
        self.max_name_bytes, self.save_timeout_seconds = max_name_bytes, save_timeout_seconds
        self.store_max_bytes, self.retention_seconds = store_max_bytes, retention_seconds
        self.uid, self.gid = uid, gid
        self._clock = clock
        self._codec = CODECS[compression]
        self._spool_dir = spool_dir

    def entry(self, session_id: str) -> Path:
        """The session's directory: named by the hash, so no id can name another session's entry."""
        return self.root / hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()

    # --- save ------------------------------------------------------------------------------------

    def save(self, session_id: str, tar_stream: Iterable[bytes]) -> SnapshotInfo:
        """Store docker's tar of /workspace as the session's snapshot, replacing the previous one.

        Raises SnapshotError (the previous snapshot stays); an exception raised by `tar_stream`
        propagates unchanged, with the same guarantee. The whole save, from this call, must end
        within `save_timeout_seconds` (checked on every read of `tar_stream` and every member).
        """
        began = time.monotonic()
        entry = self.entry(session_id)
        unique = _unique()
        snapshot = f"snap-{unique}{self._codec.suffix}"
        tmp, manifest_tmp = entry / f"{snapshot}.tmp", entry / f"manifest-{unique}.json.tmp"
        named = False
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            entry.mkdir(mode=0o700, exist_ok=True)
            manifest, stats = self._write_snapshot(session_id, tar_stream, tmp, snapshot,
                                                   began + self.save_timeout_seconds)
            with _create(manifest_tmp) as handle:  # written before the snapshot is named: see _drop_unreferenced
                handle.write(manifest.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(tmp, entry / snapshot)
            named = True
            _fsync_dir(entry)
            os.rename(manifest_tmp, entry / MANIFEST)  # the commit point
            _fsync_dir(entry)
        except BaseException as exc:
            for path in (tmp, manifest_tmp, *((entry / snapshot,) if named else ())):
                _unlink_quietly(path)
            self._save_failed(session_id, exc)
            raise
        self._drop_unreferenced(entry)
        seconds = time.monotonic() - began
        log.info("workspace_snapshot_saved session_id=%s bytes=%d tar_bytes=%d members=%d seconds=%.2f",
                 _log_id(session_id), manifest.stored_bytes, manifest.tar_bytes, manifest.members, seconds)
        return SnapshotInfo(session_id, snapshot, manifest.sha256, manifest.stored_bytes, manifest.tar_bytes,
                            manifest.content_bytes, manifest.members, dict(stats.dropped), stats.setid_stripped,
                            manifest.saved_at, seconds, stats.links_rewritten)

    def _write_snapshot(self, session_id: str, tar_stream: Iterable[bytes], tmp: Path, snapshot: str,
                        deadline: float) -> tuple[_Manifest, CopyStats]:
        with _create(tmp) as raw:
            tap = Tap(raw, hashed=True)
            compressed = self._codec.writer(tap)  # type: ignore[arg-type]
            stats = copy_workspace(tar_stream, compressed, max_bytes=self.max_bytes, max_members=self.max_members,
                                   uid=self.uid, gid=self.gid, max_name_bytes=self.max_name_bytes,
                                   deadline=deadline)
            compressed.close()
            raw.flush()
            os.fsync(raw.fileno())
        for kind, count in sorted(stats.dropped.items()):
            log.info("workspace_snapshot_dropped session_id=%s kind=%s count=%d", _log_id(session_id), kind, count)
        if stats.links_rewritten:
            log.info("workspace_snapshot_links_rewritten session_id=%s count=%d (symlinks put_archive would refuse, "
                     "kept with the absolute target they resolve to)", _log_id(session_id), stats.links_rewritten)
        if stats.setid_stripped:
            log.info("workspace_snapshot_setid_stripped session_id=%s count=%d", _log_id(session_id),
                     stats.setid_stripped)
        return _Manifest(session_id, snapshot, self._codec.name, tap.hexdigest(), tap.size, stats.tar_bytes,
                         stats.content_bytes, stats.members, self._clock(), socket.gethostname()), stats

    def _save_failed(self, session_id: str, exc: BaseException) -> None:
        """Log a failed save and turn the store's own I/O errors into SnapshotError (raised from here)."""
        if isinstance(exc, SourceFailed):
            log.warning("workspace_snapshot_failed session_id=%s reason=source_failed", _log_id(session_id))
            raise exc.original from None
        if isinstance(exc, SnapshotError):
            log.warning("workspace_snapshot_failed session_id=%s reason=%s detail=%r", _log_id(session_id),
                        exc.reason, str(exc))
        elif isinstance(exc, OSError):
            log.warning("workspace_snapshot_failed session_id=%s reason=io_error detail=%r", _log_id(session_id),
                        str(exc))
            raise SnapshotError(SnapshotFailure.IO_ERROR, f"workspace store I/O error: {exc}") from exc

    def _drop_unreferenced(self, entry: Path) -> int:
        """Delete snapshots no manifest names. The listing is taken *before* the manifest is read, and a
        snapshot whose manifest temp file exists is in flight: so a concurrent saver's file is never lost."""
        try:
            names = os.listdir(entry)
            manifest = self._read_manifest(entry)
        except (OSError, _Corrupt):
            return 0
        if manifest is None:
            return 0
        in_flight = {m.group(1) for m in map(_MANIFEST_TMP.fullmatch, names) if m}
        removed = 0
        for name in names:
            match = _SNAPSHOT.fullmatch(name)
            if match and name != manifest.snapshot and match.group(1) not in in_flight:
                try:
                    removed += _unlink(entry / name)
                except OSError as exc:  # the save has succeeded; sweep retries the cleanup
                    log.warning("workspace_snapshot_cleanup_failed error=%r", str(exc))
        return removed

    # --- restore ---------------------------------------------------------------------------------

    def restore(self, session_id: str) -> Restored:
        """The session's last snapshot as a verified tar for put_archive, or why there is none.

        Nothing is handed out before the whole snapshot has been read and its sha256 checked. Raises
        (OSError) only when the local spool file cannot be written.
        """
        began = time.monotonic()
        entry = self.entry(session_id)
        named: str | None = None
        try:
            for _ in range(3):  # a concurrent save may replace the snapshot between manifest and open
                manifest = self._read_manifest(entry)
                if manifest is None:
                    return Restored(RestoreResult.MISS, seconds=time.monotonic() - began)
                if manifest.session_id != session_id:
                    raise _Corrupt("session_mismatch")
                if self._clock() - manifest.saved_at > self.retention_seconds:
                    try:
                        self._remove_entry(entry, everything=False, expected=manifest.snapshot)
                    except OSError as exc:  # expired all the same; sweep retries the removal
                        log.warning("workspace_snapshot_remove_failed session_id=%s error=%r", _log_id(session_id),
                                    str(exc))
                    log.info("workspace_snapshot_expired session_id=%s saved_at=%.0f", _log_id(session_id),
                             manifest.saved_at)
                    return Restored(RestoreResult.EXPIRED, seconds=time.monotonic() - began)
                if manifest.snapshot == named:
                    raise _Corrupt("missing_snapshot")
                named = manifest.snapshot
                try:
                    archive = self._unpack(entry, manifest)
                except _Gone:
                    continue
                seconds = time.monotonic() - began
                log.info("workspace_snapshot_restored session_id=%s bytes=%d tar_bytes=%d seconds=%.2f",
                         _log_id(session_id), manifest.stored_bytes, manifest.tar_bytes, seconds)
                return Restored(RestoreResult.HIT, archive, manifest.stored_bytes, manifest.tar_bytes,
                                manifest.saved_at, seconds)
            raise _Corrupt("missing_snapshot")
        except _Corrupt as exc:
            log.warning("workspace_snapshot_corrupt session_id=%s reason=%s", _log_id(session_id), exc.reason)
            return Restored(RestoreResult.CORRUPT, seconds=time.monotonic() - began, reason=exc.reason)

    def _read_manifest(self, entry: Path) -> _Manifest | None:
        try:
            with _reading(), open(entry / MANIFEST, "rb") as handle:
                raw = handle.read(MANIFEST_MAX_BYTES + 1)
        except _Gone:
            return None
        if len(raw) > MANIFEST_MAX_BYTES:
            raise _Corrupt("bad_manifest")
        return _Manifest.parse(raw)

    def _unpack(self, entry: Path, manifest: _Manifest) -> IO[bytes]:
        """Decompress into a private temp file while hashing the snapshot; return it only if it verifies."""
        spool = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115 - handed to the caller
        try:
            with _reading():
                raw = open(entry / manifest.snapshot, "rb")  # noqa: SIM115 - closed just below
            with raw:
                tap = Tap(raw, hashed=True)
                written = _decompress(CODECS[manifest.compression].reader(tap), spool,  # type: ignore[arg-type]
                                      manifest.tar_bytes)
                with _reading():
                    while tap.read(CHUNK):  # bytes after the compressed frame are part of the file and its hash
                        pass
            if tap.size != manifest.stored_bytes:
                raise _Corrupt("truncated" if tap.size < manifest.stored_bytes else "size_mismatch")
            if tap.hexdigest() != manifest.sha256:
                raise _Corrupt("checksum_mismatch")
            if written != manifest.tar_bytes:
                raise _Corrupt("size_mismatch")
            spool.seek(0)
            return spool
        except BaseException:
            spool.close()
            raise

    # --- retire ----------------------------------------------------------------------------------

    def delete(self, session_id: str) -> int:
        """Remove a terminated session's snapshot; returns the files removed."""
        removed = self._remove_entry(self.entry(session_id), everything=True)
        if removed:
            log.info("workspace_snapshot_deleted session_id=%s files=%d", _log_id(session_id), removed)
        return removed

    def _remove_entry(self, entry: Path, *, everything: bool, expected: str | None = None) -> int:
        """Remove an entry's files, the manifest first so no reader is ever pointed at a deleted file.

        Unless `everything`, a fresh temp file and the snapshot of a fresh manifest temp file are left to
        their saver. With `expected`, nothing is removed if the manifest no longer names that snapshot
        (a save landed since the caller read it).
        """
        try:
            names = os.listdir(entry)
        except FileNotFoundError:
            return 0
        if expected is not None:
            try:
                current = self._read_manifest(entry)
            except _Corrupt:
                return 0
            if current is None or current.snapshot != expected:
                return 0
        removed = _unlink(entry / MANIFEST)
        keep = set() if everything else self._fresh_tmp(entry, names)
        in_flight = {m.group(1) for m in map(_MANIFEST_TMP.fullmatch, keep) if m}
        for name in names:
            match = _SNAPSHOT.fullmatch(name)
            if name == MANIFEST or name in keep or (match and match.group(1) in in_flight):
                continue
            removed += _unlink(entry / name)
        try:
            entry.rmdir()
        except OSError:
            pass  # a saver's file is still there; the entry lives on
        return removed

    def _fresh_tmp(self, entry: Path, names: Iterable[str]) -> set[str]:
        """Temp files changed within STALE_SECONDS: they may have a live writer."""
        now, fresh = self._clock(), set()
        for name in names:
            try:
                if name.endswith(".tmp") and now - (entry / name).stat().st_mtime < STALE_SECONDS:
                    fresh.add(name)
            except FileNotFoundError:
                pass
        return fresh

    def sweep(self) -> SweepCounts:
        """Drop expired entries and stale temp files, then evict oldest-first down to store_max_bytes.

        Safe to run from every daemon sharing the store at once: each removal is idempotent.
        """
        counts = {"expired": 0, "evicted": 0, "tmp_removed": 0, "orphans_removed": 0}
        live: list[tuple[float, Path, int, str | None]] = []
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            names = []
        for name in filter(_ENTRY.fullmatch, names):
            entry = self.root / name
            try:
                try:
                    manifest, readable = self._read_manifest(entry), True
                except _Corrupt:
                    manifest, readable = None, False  # kept, aged by its files, until it expires
                snapshot = manifest.snapshot if manifest else None
                size, newest = self._tidy(entry, snapshot, readable, counts)
                saved_at = manifest.saved_at if manifest else newest
                if size and self._clock() - saved_at > self.retention_seconds:
                    self._remove_entry(entry, everything=False, expected=snapshot)
                    counts["expired"] += 1
                elif size:
                    live.append((saved_at, entry, size, snapshot))
            except OSError as exc:  # another daemon removing it at the same time, most likely
                log.warning("workspace_store_sweep_skipped entry=%s error=%r", name, str(exc))
        total = sum(item[2] for item in live)
        for _, entry, size, snapshot in sorted(live, key=lambda item: item[0]):
            if total <= self.store_max_bytes:
                break
            self._remove_entry(entry, everything=False, expected=snapshot)
            total, counts["evicted"] = total - size, counts["evicted"] + 1
        result = SweepCounts(**counts, entries=len(live) - counts["evicted"], store_bytes=total)
        log.info("workspace_store_swept expired=%d evicted=%d tmp_removed=%d orphans_removed=%d entries=%d "
                 "bytes=%d", result.expired, result.evicted, result.tmp_removed, result.orphans_removed,
                 result.entries, result.store_bytes)
        return result

    def _tidy(self, entry: Path, keep: str | None, readable: bool, counts: dict[str, int]) -> tuple[int, float]:
        """Remove an entry's stale temp files and, if its manifest is readable, the stale snapshots it does not
        name (left by a crash); returns the bytes and newest mtime of what is left."""
        now, size, newest = self._clock(), 0, 0.0
        stats = {}
        for name in os.listdir(entry):
            try:
                stats[name] = (entry / name).stat()
            except FileNotFoundError:
                continue
        in_flight = {m.group(1) for name, st in stats.items()
                     if (m := _MANIFEST_TMP.fullmatch(name)) and now - st.st_mtime < STALE_SECONDS}
        for name, st in stats.items():
            stale = now - st.st_mtime >= STALE_SECONDS
            match = _SNAPSHOT.fullmatch(name)
            if stale and name.endswith(".tmp"):
                counts["tmp_removed"] += _unlink(entry / name)
            elif stale and match and readable and name != keep and match.group(1) not in in_flight:
                counts["orphans_removed"] += _unlink(entry / name)
            else:
                size, newest = size + st.st_size, max(newest, st.st_mtime)
        if not size:
            try:
                entry.rmdir()
            except OSError:
                pass
        return size, newest


def _decompress(reader: IO[bytes], spool: IO[bytes], limit: int) -> int:
    written = 0
    while True:
        with _reading():
            data = reader.read(CHUNK)
        if not data:
            return written
        written += len(data)
        if written > limit:
            raise _Corrupt("size_mismatch")
        spool.write(data)  # a full local disk is the daemon's error, not the snapshot's: it propagates


class _Gone(Exception):
    """The file is not there (any more): deleted, or on NFS deleted by another host while read (ESTALE)."""


@contextmanager
def _reading() -> Iterator[None]:
    """Classify errors while reading the store: gone (retried from the manifest) or a corrupt snapshot."""
    try:
        yield
    except (_Corrupt, _Gone):
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE):
            raise _Gone() from exc
        raise _Corrupt("read_failed" if exc.errno is not None else "decompress_failed") from exc
    except Exception as exc:  # zstd, gzip and zlib each report damaged data their own way
        raise _Corrupt("decompress_failed") from exc


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
