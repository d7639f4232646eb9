"""The copy of docker's tar of a session's /workspace into a snapshot, and the snapshot codecs.

The daemon never extracts a workspace onto its own disk: the stream `get_archive` returns is
re-written member by member into a new tar that `put_archive` can deliver into the next sandbox.
The copy is the trust boundary, so it lives apart from the store's file handling: names are
re-rooted and checked, only directories, regular files, symlinks (as links, never followed) and
hard links to files already copied pass, owners and set-id bits are rewritten, extended headers
(xattrs, ACLs, file capabilities) are not carried over, and the byte and member budgets are
checked against each header before any of its data is read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any, cast

import zstandard

from ..errors import WorkspaceError

PREFIX = "workspace"  # docker's get_archive("/workspace") names every member workspace/...
META_MAX_BYTES = 1 << 20  # one pax or GNU long-name header; docker's are a few KB at most
HEADER_ALLOWANCE = 16 * 1024  # input bytes allowed per member on top of its content
END_MARKER = 2 * tarfile.BLOCKSIZE
TRAILER_MAX_BYTES = 64 * 1024
CHUNK = 1 << 20
TAR_BUFSIZE = 64 * 1024  # tarfile's stream buffer: larger makes each 512-byte header read copy more
_TAIL_BYTES = TRAILER_MAX_BYTES + 2 * TAR_BUFSIZE
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)


class SnapshotFailure(StrEnum):
    """Why a save failed or a snapshot was unreadable (a bounded metric label)."""

    TOO_LARGE = "too_large"
    TOO_MANY_MEMBERS = "too_many_members"
    UNSAFE = "unsafe"
    CORRUPT = "corrupt"
    IO_ERROR = "io_error"


class SnapshotError(WorkspaceError):
    """A workspace could not be saved; `reason` is a SnapshotFailure. The previous snapshot stays."""

    def __init__(self, reason: SnapshotFailure, message: str) -> None:
        super().__init__(reason.value, message)
        self.failure = reason


class SourceFailed(Exception):
    """The caller's tar stream raised; the store re-raises `original` unchanged."""

    def __init__(self, original: Exception) -> None:
        super().__init__(str(original))
        self.original = original


@dataclass
class CopyStats:
    """What a copy wrote and what it left out."""

    members: int = 0
    content_bytes: int = 0
    tar_bytes: int = 0
    setid_stripped: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


# --- the input side ---------------------------------------------------------------------------


class _Source(io.RawIOBase):
    """The caller's chunks as a file, bounded, keeping the last bytes to check the end-of-archive marker."""

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")
        self._limit = limit
        self.position = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            except Exception as exc:
                raise SourceFailed(exc) from exc
            self._pending = memoryview(chunk).cast("B")
        n = min(len(buffer), len(self._pending))
        data = self._pending[:n]
        buffer[:n] = data
        self._pending = self._pending[n:]
        self.position += n
        if self.position > self._limit:
            raise SnapshotError(SnapshotFailure.TOO_LARGE, f"the workspace stream exceeds {self._limit} bytes")
        self.tail += data
        if len(self.tail) > 2 * _TAIL_BYTES:
            del self.tail[:-_TAIL_BYTES]
        return n


class _GuardedInfo(tarfile.TarInfo):
    """Headers whose processing would read unbounded metadata into memory are refused first."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise SnapshotError(SnapshotFailure.UNSAFE, f"sparse member {self.name!r}")
        if self.type in _META_TYPES and self.size > META_MAX_BYTES:
            raise SnapshotError(SnapshotFailure.TOO_LARGE, f"an extended header declares {self.size} bytes")
        return super()._proc_member(tar)  # type: ignore[misc, no-any-return]

    def _proc_gnusparse_00(self, *args: object) -> None:
        raise SnapshotError(SnapshotFailure.UNSAFE, "sparse member")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


class _Exact:
    """A member's data: exactly its declared size, or the copy fails as corrupt."""

    def __init__(self, src: IO[bytes], size: int, name: str) -> None:
        self._src, self._left, self._name = src, size, name

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._src.read(want)
        if len(data) < want:
            raise SnapshotError(SnapshotFailure.CORRUPT, f"member {self._name!r} ends before its declared size")
        self._left -= len(data)
        return data


def relative_name(name: str) -> str | None:
    """`workspace/a/b` -> `a/b`, None for the root itself; raises `unsafe` for anything that could leave it."""
    if name.startswith("/"):
        raise SnapshotError(SnapshotFailure.UNSAFE, f"absolute member name {name!r}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise SnapshotError(SnapshotFailure.UNSAFE, f"member name {name!r} has a '..' component")
    if not parts or parts[0] != PREFIX:
        raise SnapshotError(SnapshotFailure.UNSAFE, f"member {name!r} is not below {PREFIX}/")
    return "/".join(parts[1:]) or None


# --- the copy ---------------------------------------------------------------------------------


@dataclass
class _Copy:
    tar_in: tarfile.TarFile
    tar_out: tarfile.TarFile
    max_bytes: int
    max_members: int
    uid: int
    gid: int
    stats: CopyStats = field(default_factory=CopyStats)
    files: set[str] = field(default_factory=set)
    not_dirs: set[str] = field(default_factory=set)
    seen: int = 0

    def member(self, info: tarfile.TarInfo) -> None:
        self.seen += 1
        if self.seen > self.max_members:
            raise SnapshotError(SnapshotFailure.TOO_MANY_MEMBERS, f"the workspace has over {self.max_members} entries")
        name = relative_name(info.name)
        if name is None:
            return  # /workspace itself belongs to the next sandbox's volume
        self._check_place(name)
        out = tarfile.TarInfo(name)
        out.uid, out.gid, out.uname, out.gname, out.mtime = self.uid, self.gid, "", "", info.mtime
        if info.mode & 0o6000:
            self.stats.setid_stripped += 1
        out.mode = info.mode & 0o1777
        if info.isdir():
            out.type = tarfile.DIRTYPE
            self.tar_out.addfile(out)
        elif info.isreg():
            self._file(info, out)
        elif info.issym():
            out.type, out.linkname, out.mode = tarfile.SYMTYPE, info.linkname, 0o777
            self.tar_out.addfile(out)
        elif info.islnk():
            target = _relative_or_none(info.linkname)
            if target is None or target not in self.files:
                self.stats.dropped["hardlink"] += 1
                return
            out.type, out.linkname = tarfile.LNKTYPE, target
            self.tar_out.addfile(out)
        else:
            kind = "device" if info.ischr() or info.isblk() else "fifo" if info.isfifo() else "other"
            self.stats.dropped[kind] += 1
            return
        self.stats.members += 1
        if info.isreg() or info.islnk():
            self.files.add(name)
        if not info.isdir():
            self.not_dirs.add(name)

    def _check_place(self, name: str) -> None:
        """A name seen twice, or below a file or symlink, is refused: docker never writes either, and on
        extraction the second could land through a link."""
        if name in self.not_dirs:
            raise SnapshotError(SnapshotFailure.UNSAFE, f"member {name!r} appears twice")
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in self.not_dirs:
                raise SnapshotError(SnapshotFailure.UNSAFE, f"member {name!r} is below a file or symlink")

    def _file(self, info: tarfile.TarInfo, out: tarfile.TarInfo) -> None:
        if info.sparse is not None:
            raise SnapshotError(SnapshotFailure.UNSAFE, f"sparse member {out.name!r}")
        if self.stats.content_bytes + info.size > self.max_bytes:
            raise SnapshotError(SnapshotFailure.TOO_LARGE, f"the workspace exceeds {self.max_bytes} bytes")
        src = self.tar_in.extractfile(info)
        if src is None:
            raise SnapshotError(SnapshotFailure.CORRUPT, f"member {out.name!r} has no data")
        out.type, out.size = tarfile.REGTYPE, info.size
        self.tar_out.addfile(out, cast(IO[bytes], _Exact(src, info.size, out.name)))
        self.stats.content_bytes += info.size


def _relative_or_none(name: str) -> str | None:
    try:
        return relative_name(name)
    except SnapshotError:
        return None


def copy_workspace(chunks: Iterable[bytes], out: IO[bytes], *, max_bytes: int, max_members: int, uid: int,
                   gid: int) -> CopyStats:
    """Copy docker's tar of /workspace from `chunks` to `out` as a tar of relative, re-owned members.

    Raises SnapshotError (unsafe, too_large, too_many_members, corrupt) and SourceFailed.
    """
    source = _Source(chunks, max_bytes + (max_members + 1) * HEADER_ALLOWANCE)
    counting = Tap(out)
    try:
        with tarfile.open(fileobj=cast(IO[bytes], source), mode="r|", tarinfo=_GuardedInfo, bufsize=TAR_BUFSIZE,
                          errors="surrogateescape") as tar_in, \
                tarfile.open(fileobj=cast(IO[bytes], counting), mode="w|", format=tarfile.PAX_FORMAT,
                             bufsize=TAR_BUFSIZE, errors="surrogateescape") as tar_out:
            tar_out.copybufsize = CHUNK  # type: ignore[attr-defined]  # a TarFile attribute since 3.8
            copy = _Copy(tar_in, tar_out, max_bytes, max_members, uid, gid)
            while (info := tar_in.next()) is not None:
                copy.member(info)
                # Both sides keep every header in `members` (untyped in typeshed) unless told to forget.
                tar_in.members.clear()  # type: ignore[attr-defined]
                tar_out.members.clear()  # type: ignore[attr-defined]
            _check_end(tar_in, source)
    except tarfile.TarError as exc:
        raise SnapshotError(SnapshotFailure.CORRUPT, f"the workspace stream is not a valid tar: {exc}") from None
    copy.stats.tar_bytes = counting.size
    return copy.stats


def _check_end(tar_in: tarfile.TarFile, source: _Source) -> None:
    """tarfile ends quietly on a stream cut at a member boundary or on garbage; require the zero blocks."""
    rest = tar_in.fileobj.read(TRAILER_MAX_BYTES + 1) if tar_in.fileobj is not None else b""
    trailer_length = source.position - tar_in.offset
    if len(rest) > TRAILER_MAX_BYTES or trailer_length > len(source.tail):
        raise SnapshotError(SnapshotFailure.CORRUPT, "data follows the end of the workspace archive")
    trailer = source.tail[len(source.tail) - trailer_length:]
    if trailer_length < END_MARKER or trailer.count(0) != trailer_length:
        raise SnapshotError(SnapshotFailure.CORRUPT, "the workspace stream ends without an end-of-archive marker")


# --- the snapshot file ------------------------------------------------------------------------


class Tap(io.RawIOBase):
    """A pass-through file that counts (and, if asked, hashes) what goes through; never closes `raw`.

    The store writes through one to get the snapshot's sha256 with the write, and reads through one
    to verify it while decompressing."""

    def __init__(self, raw: IO[bytes], *, hashed: bool = False) -> None:
        self._raw = raw
        self._hash = hashlib.sha256() if hashed else None
        self.size = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        assert self._hash is not None
        return self._hash.hexdigest()

    def write(self, data: Any) -> int:
        self._count(data)
        return self._raw.write(data)

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        self._count(data)
        buffer[: len(data)] = data
        return len(data)

    def _count(self, data: Any) -> None:
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)


@dataclass(frozen=True)
class Codec:
    """How snapshot files are compressed; the manifest names the codec, so old snapshots stay readable."""

    name: str
    suffix: str
    writer: Callable[[IO[bytes]], IO[bytes]]
    reader: Callable[[IO[bytes]], IO[bytes]]


def _zstd_writer(raw: IO[bytes]) -> IO[bytes]:
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    return cast(IO[bytes], compressor.stream_writer(raw, closefd=False))


def _zstd_reader(raw: IO[bytes]) -> IO[bytes]:
    return cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw, read_size=CHUNK, closefd=False))


CODECS = {
    "zstd": Codec("zstd", ".tar.zst", _zstd_writer, _zstd_reader),
    "gzip": Codec("gzip", ".tar.gz", lambda raw: cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)),
                  lambda raw: cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))),
    "none": Codec("none", ".tar", lambda raw: cast(IO[bytes], Tap(raw)), lambda raw: cast(IO[bytes], Tap(raw))),
}
