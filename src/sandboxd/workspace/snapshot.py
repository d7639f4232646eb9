"""The copy of docker's tar of a session's /workspace into a snapshot, and the snapshot codecs.

The daemon never extracts a workspace onto its own disk: the stream `get_archive` returns is
re-written member by member into a new tar that `put_archive` can deliver into the next sandbox.
The copy is the trust boundary, so it lives apart from the store's file handling: names are
re-rooted and checked, every member must follow its own directory and no name may appear twice
(so on extraction nothing is ever written through a link), only directories, regular files,
symlinks (as links, never followed) and hard links to files already copied pass, owners and
set-id bits are rewritten, extended headers (xattrs, ACLs, file capabilities) are not carried
over, and the byte, member, name and time budgets are checked as the copy goes, each header
before any of its data is read. Whatever the workspace holds, a copy costs time linear in its
input and memory linear in its members (a keyed 64-bit hash each, never the names themselves).

A snapshot is never kept in a form the engine refuses to extract: docker's `put_archive` refuses
a symlink whose target, joined to the link's directory and cleaned lexically, does not start
with the extraction directory (`/workspace`). Such a link is kept with the absolute target it
resolves to (exactly the same file inside the sandbox, see `_resolve_leading_dots`), or, where
no such target exists, left out and counted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import posixpath
import secrets
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any, cast

import zstandard

from ..errors import WorkspaceError

PREFIX = "workspace"  # docker's get_archive("/workspace") names every member workspace/...
WORKSPACE_DIR = "/" + PREFIX  # where put_archive extracts a snapshot
PATH_MAX = 4096  # Linux: a path, or a symlink target, with its terminating NUL
NAME_MAX_BYTES = PATH_MAX - 2  # a member name: "/" + name + NUL; nothing longer exists in a sandbox
LINK_MAX_BYTES = PATH_MAX - 1  # a symlink's (or a hard link's) target + NUL
NAMES_MAX_BYTES = 64 << 20  # default budget of all names and link targets of one snapshot
SAVE_TIMEOUT_SECONDS = 300.0  # default deadline of a whole save
META_MAX_BYTES = 1 << 20  # one pax header; docker's are a few KB at most
META_CHAIN_MAX = 3  # extended headers before one member: docker writes one (pax), GNU tar two (K, L)
HEADER_ALLOWANCE = 16 * 1024  # input bytes allowed per member on top of its content
END_MARKER = 2 * tarfile.BLOCKSIZE
TRAILER_MAX_BYTES = 64 * 1024
CHUNK = 1 << 20
TAR_BUFSIZE = 64 * 1024  # tarfile's stream buffer: larger makes each 512-byte header read copy more
_TAIL_BYTES = TRAILER_MAX_BYTES + 2 * TAR_BUFSIZE
_META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
               tarfile.GNUTYPE_LONGLINK)
_LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_CHAIN = "_sandboxd_meta_chain"  # how many extended headers the tarfile is inside, as an attribute of it
_SHOWN_CHARS = 64  # of a name in an error message (names are the sandbox's and up to 4 KB)


class SnapshotFailure(StrEnum):
    """Why a save failed or a snapshot was unreadable (a bounded metric label)."""

    TOO_LARGE = "too_large"
    TOO_MANY_MEMBERS = "too_many_members"
    NAME_TOO_LONG = "name_too_long"
    NAMES_TOO_LARGE = "names_too_large"
    TIMED_OUT = "timed_out"
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
    name_bytes: int = 0
    setid_stripped: int = 0
    links_rewritten: int = 0  # symlinks kept with the absolute target they resolve to
    dropped: Counter[str] = field(default_factory=Counter)


def shown(name: str) -> str:
    """A name for an error message or a log line: quoted, and cut to a bounded length."""
    if len(name) <= _SHOWN_CHARS:
        return repr(name)
    return f"{name[:_SHOWN_CHARS]!r}...(+{len(name) - _SHOWN_CHARS} chars)"


def _encoded_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


# --- the input side ---------------------------------------------------------------------------


class _Source(io.RawIOBase):
    """The caller's chunks as a file, bounded in bytes and time, keeping the last bytes to check the
    end-of-archive marker."""

    def __init__(self, chunks: Iterable[bytes], limit: int, deadline: float,
                 clock: Callable[[], float]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")
        self._limit = limit
        self._deadline, self._clock = deadline, clock
        self.position = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def close_input(self) -> None:
        """Close the caller's stream (a generator over the engine's response): left open, it keeps the
        engine's connection, and the engine keeps the container busy, until it is garbage-collected."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001, S110 - a stream that fails to close has nothing more to say
                pass

    def check_deadline(self) -> None:
        if self._clock() > self._deadline:
            raise SnapshotError(SnapshotFailure.TIMED_OUT, "the save ran past its deadline")

    def readinto(self, buffer: Any) -> int:
        self.check_deadline()
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            except Exception as exc:
                raise SourceFailed(exc) from exc
            self._pending = memoryview(chunk).cast("B")
            self.check_deadline()
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
    """Headers whose processing would read unbounded metadata into memory, or cost more than linear
    time, are refused first; pax records are parsed here, linearly (see `_proc_pax`)."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise SnapshotError(SnapshotFailure.UNSAFE, f"sparse member {shown(self.name)}")
        if self.type == tarfile.XGLTYPE:  # tarfile would apply (and copy) its records to every later member
            raise SnapshotError(SnapshotFailure.UNSAFE, "a global extended header")
        if self.type not in _META_TYPES:
            return super()._proc_member(tar)  # type: ignore[misc, no-any-return]
        if self.type in _LONG_NAME_TYPES and self.size > LINK_MAX_BYTES:
            raise SnapshotError(SnapshotFailure.NAME_TOO_LONG, f"a GNU long name of {self.size} bytes")
        if self.size > META_MAX_BYTES:
            raise SnapshotError(SnapshotFailure.TOO_LARGE, f"an extended header declares {self.size} bytes")
        depth = getattr(tar, _CHAIN, 0)
        if depth >= META_CHAIN_MAX:  # each one is a nested call in tarfile: a long chain is a recursion bomb
            raise SnapshotError(SnapshotFailure.CORRUPT, "extended headers follow each other without a member")
        setattr(tar, _CHAIN, depth + 1)
        try:
            return super()._proc_member(tar)  # type: ignore[misc, no-any-return]
        finally:
            setattr(tar, _CHAIN, depth)

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        """An extended header, as tarfile's own `_proc_pax` reads it, less its regular expressions: the
        one searching for `hdrcharset` backtracks on runs of digits, quadratic in the header's size
        (CPython gh-121285). Records are read by their declared lengths; a malformed one is corrupt."""
        this = cast(Any, self)
        buf = cast(Any, tar).fileobj.read(this._block(self.size))
        records = _pax_records(buf[:self.size])
        binary = any(keyword == b"hdrcharset" and value == b"BINARY" for keyword, value in records)
        name_encoding = tar.encoding if binary else "utf-8"
        headers: dict[str, str] = {}
        for raw_keyword, raw_value in records:
            keyword = this._decode_pax_field(raw_keyword, "utf-8", "utf-8", tar.errors)
            if keyword.startswith("GNU.sparse."):
                raise SnapshotError(SnapshotFailure.UNSAFE, "sparse member")
            if keyword in tarfile.PAX_NAME_FIELDS:
                headers[keyword] = this._decode_pax_field(raw_value, name_encoding, tar.encoding, tar.errors)
            else:
                headers[keyword] = this._decode_pax_field(raw_value, "utf-8", "utf-8", tar.errors)
        try:
            following = cast(Any, self.fromtarfile(tar))
        except tarfile.HeaderError as exc:  # what tarfile's own reports as a SubsequentHeaderError
            raise tarfile.ReadError(f"no valid header after an extended header: {exc}") from None
        following._apply_pax_info(headers, tar.encoding, tar.errors)
        following.offset = self.offset
        if "size" in headers:  # the data, and so the next header, moved
            offset = following.offset_data
            if following.isreg() or following.type not in tarfile.SUPPORTED_TYPES:
                offset += following._block(following.size)
            cast(Any, tar).offset = offset
        return cast(tarfile.TarInfo, following)

    def _proc_gnusparse_00(self, *args: object) -> None:
        raise SnapshotError(SnapshotFailure.UNSAFE, "sparse member")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def _pax_records(buf: bytes) -> list[tuple[bytes, bytes]]:
    """`<length> <keyword>=<value>\\n` records, each found by its length: one pass over `buf`."""
    records = []
    position, end = 0, len(buf)
    while position < end:
        space = buf.find(b" ", position, min(end, position + 21))
        digits = buf[position:space] if space > position else b""
        if not digits.isdigit():
            raise SnapshotError(SnapshotFailure.CORRUPT, "an extended header record without its length")
        stop = position + int(digits)
        if stop > end or stop - position < len(digits) + 3 or buf[stop - 1] != 0x0A:
            raise SnapshotError(SnapshotFailure.CORRUPT, "an extended header record of a wrong length")
        equals = buf.find(b"=", space + 1, stop - 1)
        if equals <= space + 1:
            raise SnapshotError(SnapshotFailure.CORRUPT, "an extended header record without a keyword")
        records.append((buf[space + 1:equals], buf[equals + 1:stop - 1]))
        position = stop
    return records


class _Exact:
    """A member's data: exactly its declared size, or the copy fails as corrupt."""

    def __init__(self, src: IO[bytes], size: int, name: str) -> None:
        self._src, self._left, self._name = src, size, name

    def read(self, n: int = -1) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._src.read(want)
        if len(data) < want:
            raise SnapshotError(SnapshotFailure.CORRUPT, f"member {shown(self._name)} ends before its declared size")
        self._left -= len(data)
        return data


def relative_name(name: str) -> str | None:
    """`workspace/a/b` -> `a/b`, None for the root itself; raises `unsafe` for anything that could leave it."""
    if name.startswith("/"):
        raise SnapshotError(SnapshotFailure.UNSAFE, f"absolute member name {shown(name)}")
    padded = f"/{name}/"  # a few substring searches; the components are split only if some need removing
    if "/../" in padded:
        raise SnapshotError(SnapshotFailure.UNSAFE, f"member name {shown(name)} has a '..' component")
    if "//" in padded or "/./" in padded:
        name = "/".join(part for part in name.split("/") if part not in ("", "."))
    if name == PREFIX:
        return None
    if not name.startswith(PREFIX + "/"):
        raise SnapshotError(SnapshotFailure.UNSAFE, f"member {shown(name)} is not below {PREFIX}/")
    return name[len(PREFIX) + 1:]


# --- symlinks the engine accepts ----------------------------------------------------------------


def engine_accepts_symlink(directory: str, target: str) -> bool:
    """Whether docker's put_archive creates a symlink in `directory` (absolute, below /workspace) to `target`.

    The engine's check (moby pkg/archive, createTarFile): `filepath.Join(dir, target)`, which joins
    an absolute target like a relative one and cleans the result lexically, must start with the
    extraction directory, as a string. An empty target cannot be created at all.
    """
    return bool(target) and posixpath.normpath(f"{directory}/{target}").startswith(WORKSPACE_DIR)


def _resolve_leading_dots(directory: str, target: str) -> str:
    """The absolute target naming what `target`, read from a link in `directory`, names.

    Only the leading `.`, `..` and empty components are resolved, and they are resolved from
    `directory` (`/` for an absolute target), which in the restored sandbox is a chain of real
    directories (every member's directory precedes it in the snapshot, and /workspace is a mount
    point in /): there the parent of each directory is its lexical parent, and `..` of `/` is `/`.
    The rest of the target is kept as it is, because it may pass through symlinks.
    """
    parts = target.split("/")
    base = [] if target.startswith("/") else directory.split("/")[1:]
    index = 0
    while index < len(parts) and parts[index] in ("", ".", ".."):
        if parts[index] == ".." and base:
            base.pop()
        index += 1
    return "/" + "/".join(base + parts[index:])


# --- the copy ---------------------------------------------------------------------------------

_DIR, _FILE, _OTHER = 0, 1, 2  # what a name became in the copy: a directory, a regular file, anything else


@dataclass
class _Copy:
    tar_in: tarfile.TarFile
    tar_out: tarfile.TarFile
    max_bytes: int
    max_members: int
    max_name_bytes: int
    uid: int
    gid: int
    source: _Source
    stats: CopyStats = field(default_factory=CopyStats)
    # Every name seen -> what it became, keyed by a 64-bit keyed hash of the name: memory per member
    # stays a few dozen bytes however long its name. The key is secret and per copy, so no workspace
    # can be made to collide; and a collision could only refuse a save (see `member`), never let
    # a name through a link.
    kinds: dict[int, int] = field(default_factory=dict)
    salt: bytes = field(default_factory=lambda: secrets.token_bytes(16))
    seen: int = 0

    def key(self, name: str) -> int:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8, key=self.salt).digest()
        return int.from_bytes(digest, "little")

    def member(self, info: tarfile.TarInfo) -> None:
        self.seen += 1
        if self.seen > self.max_members:
            raise SnapshotError(SnapshotFailure.TOO_MANY_MEMBERS, f"the workspace has over {self.max_members} entries")
        self.source.check_deadline()
        self._charge(info.name, NAME_MAX_BYTES)
        if info.issym() or info.islnk():
            self._charge(info.linkname, LINK_MAX_BYTES)
        name = relative_name(info.name)
        if name is None:
            return  # /workspace itself belongs to the next sandbox's volume
        key = self._place(name)
        self.kinds[key] = self._copy(info, name)

    def _charge(self, text: str, limit: int) -> None:
        size = _encoded_length(text)
        if size > limit:
            raise SnapshotError(SnapshotFailure.NAME_TOO_LONG, f"a name or link target of {size} bytes (over {limit})")
        self.stats.name_bytes += size
        if self.stats.name_bytes > self.max_name_bytes:
            raise SnapshotError(SnapshotFailure.NAMES_TOO_LARGE,
                                f"the workspace's names exceed {self.max_name_bytes} bytes")

    def _place(self, name: str) -> int:
        """Refuse a name seen before, or whose directory is not a directory copied earlier (below a file or
        a symlink, or ahead of its directory): docker never writes either, and on extraction the member
        could land through a link. Two lookups whatever the name's depth, so the copy stays linear.

        A key collision could only make a name look seen (refused), or make a directory that never
        appeared look present; a name that appeared as anything but a directory can never pass as one,
        because a directory with its key would have been refused as seen."""
        key = self.key(name)
        if key in self.kinds:
            raise SnapshotError(SnapshotFailure.UNSAFE, f"member {shown(name)} appears twice")
        directory = name.rpartition("/")[0]
        if directory and self.kinds.get(self.key(directory)) != _DIR:
            raise SnapshotError(SnapshotFailure.UNSAFE,
                                f"member {shown(name)} is below a file or symlink, or ahead of its directory")
        return key

    def _copy(self, info: tarfile.TarInfo, name: str) -> int:
        out = tarfile.TarInfo(name)
        out.uid, out.gid, out.uname, out.gname, out.mtime = self.uid, self.gid, "", "", info.mtime
        if info.mode & 0o6000:
            self.stats.setid_stripped += 1
        out.mode = info.mode & 0o1777
        if info.isdir():
            out.type, kind = tarfile.DIRTYPE, _DIR
            self.tar_out.addfile(out)
        elif info.isreg():
            self._file(info, out)
            kind = _FILE
        elif info.issym():
            target = self._symlink_target(name, info.linkname)
            if target is None:
                self.stats.dropped["symlink"] += 1
                return _OTHER
            out.type, out.linkname, out.mode, kind = tarfile.SYMTYPE, target, 0o777, _OTHER
            self.tar_out.addfile(out)
        elif info.islnk():
            linked = _relative_or_none(info.linkname)
            if linked is None or self.kinds.get(self.key(linked)) != _FILE:
                self.stats.dropped["hardlink"] += 1
                return _OTHER
            out.type, out.linkname, kind = tarfile.LNKTYPE, linked, _FILE
            self.tar_out.addfile(out)
        else:
            kind_name = "device" if info.ischr() or info.isblk() else "fifo" if info.isfifo() else "other"
            self.stats.dropped[kind_name] += 1
            return _OTHER
        self.stats.members += 1
        return kind

    def _symlink_target(self, name: str, target: str) -> str | None:
        """The target to keep: the link's own if the engine will accept it, else the absolute target it
        resolves to if the engine accepts that; None (left out) when neither."""
        directory = posixpath.dirname(f"{WORKSPACE_DIR}/{name}")
        if not target:
            return None
        if engine_accepts_symlink(directory, target):
            return target
        resolved = _resolve_leading_dots(directory, target)
        if _encoded_length(resolved) > LINK_MAX_BYTES or not engine_accepts_symlink(directory, resolved):
            return None
        self.stats.links_rewritten += 1
        return resolved

    def _file(self, info: tarfile.TarInfo, out: tarfile.TarInfo) -> None:
        if info.sparse is not None:
            raise SnapshotError(SnapshotFailure.UNSAFE, f"sparse member {shown(out.name)}")
        if self.stats.content_bytes + info.size > self.max_bytes:
            raise SnapshotError(SnapshotFailure.TOO_LARGE, f"the workspace exceeds {self.max_bytes} bytes")
        src = self.tar_in.extractfile(info)
        if src is None:
            raise SnapshotError(SnapshotFailure.CORRUPT, f"member {shown(out.name)} has no data")
        out.type, out.size = tarfile.REGTYPE, info.size
        self.tar_out.addfile(out, cast(IO[bytes], _Exact(src, info.size, out.name)))
        self.stats.content_bytes += info.size


def _relative_or_none(name: str) -> str | None:
    try:
        return relative_name(name)
    except SnapshotError:
        return None


def copy_workspace(chunks: Iterable[bytes], out: IO[bytes], *, max_bytes: int, max_members: int, uid: int,
                   gid: int, max_name_bytes: int = NAMES_MAX_BYTES, deadline: float = math.inf,
                   clock: Callable[[], float] = time.monotonic) -> CopyStats:
    """Copy docker's tar of /workspace from `chunks` to `out` as a tar of relative, re-owned members.

    `deadline` is a `clock()` time (monotonic by default), checked on every read and every member.
    `chunks` is closed (if it has a `close`) when the copy ends, whether it was read to its end or not.
    Raises SnapshotError (unsafe, too_large, too_many_members, name_too_long, names_too_large,
    timed_out, corrupt) and SourceFailed.
    """
    source = _Source(chunks, max_bytes + (max_members + 1) * HEADER_ALLOWANCE, deadline, clock)
    counting = Tap(out)
    try:
        with tarfile.open(fileobj=cast(IO[bytes], source), mode="r|", tarinfo=_GuardedInfo, bufsize=TAR_BUFSIZE,
                          errors="surrogateescape") as tar_in, \
                tarfile.open(fileobj=cast(IO[bytes], counting), mode="w|", format=tarfile.PAX_FORMAT,
                             bufsize=TAR_BUFSIZE, errors="surrogateescape") as tar_out:
            tar_out.copybufsize = CHUNK  # type: ignore[attr-defined]  # a TarFile attribute since 3.8
            copy = _Copy(tar_in, tar_out, max_bytes, max_members, max_name_bytes, uid, gid, source)
            while (info := tar_in.next()) is not None:
                copy.member(info)
                # Both sides keep every header in `members` (untyped in typeshed) unless told to forget.
                tar_in.members.clear()  # type: ignore[attr-defined]
                tar_out.members.clear()  # type: ignore[attr-defined]
            _check_end(tar_in, source)
    except tarfile.TarError as exc:
        raise SnapshotError(SnapshotFailure.CORRUPT, f"the workspace stream is not a valid tar: {exc}") from None
    finally:
        source.close_input()  # read to its end, or abandoned: either way, at once
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
