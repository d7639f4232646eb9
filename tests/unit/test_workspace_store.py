"""The workspace snapshot store (issue 12): round trips, atomicity, corruption, retention, isolation,
and hostile workspaces given as the tar streams docker's get_archive would send."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import sys
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxd.errors import WorkspaceError
from sandboxd.workspace import snapshot as snapshot_module
from sandboxd.workspace import store as store_module
from sandboxd.workspace.snapshot import LINK_MAX_BYTES, NAME_MAX_BYTES
from sandboxd.workspace.store import RestoreResult, SnapshotError, WorkspaceStore

UID, GID = 10001, 10001
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # file ages come from the filesystem's real mtimes

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def make_store(root: Path, clock: Clock, **overrides: Any) -> WorkspaceStore:
    settings: dict[str, Any] = {"max_bytes": 10 << 20, "store_max_bytes": 1 << 30, "retention_seconds": 7 * 86400,
                                "uid": UID, "gid": GID, "clock": clock, "max_members": 1000,
                                "spool_dir": root.parent}
    settings.update(overrides)
    return WorkspaceStore(root, **settings)


@pytest.fixture
def store(root: Path, clock: Clock) -> WorkspaceStore:
    return make_store(root, clock)


# --- building docker-like streams ---------------------------------------------------------------


def info(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, linkname: str = "", size: int = 0,
         uid: int = 0) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name if name.startswith(("/", "..")) or name == "workspace" else f"workspace/{name}")
    member.type, member.mode, member.linkname, member.size = kind, mode, linkname, size
    member.uid = member.gid = uid
    member.mtime = 1_700_000_000
    return member


Member = tuple[tarfile.TarInfo, bytes | None]


def f(name: str, data: bytes, mode: int = 0o644) -> Member:
    return info(name, mode=mode, size=len(data)), data


def d(name: str, mode: int = 0o755) -> Member:
    return info(name, tarfile.DIRTYPE, mode=mode), None


def sym(name: str, target: str) -> Member:
    return info(name, tarfile.SYMTYPE, linkname=target, mode=0o777), None


def hard(name: str, target: str) -> Member:
    return info(name, tarfile.LNKTYPE, linkname=target), None


def tar_bytes(members: Iterable[Member], root_dir: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if root_dir:
            tar.addfile(info("workspace", tarfile.DIRTYPE, mode=0o755))
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def chunks(raw: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(raw), size):
        yield raw[start:start + size]


WORKSPACE = [d("src"), f("src/main.py", b"print('hi')\n" * 100, 0o755), f("README.md", b"# readme\n", 0o600),
             d("src/pkg"), f("src/pkg/data.bin", os.urandom(300_000)), sym("latest", "src/main.py"),
             sym("abs", "/etc/passwd"), hard("src/main-link.py", "workspace/src/main.py"),
             f("empty", b"")]


def restored_members(store: WorkspaceStore, session_id: str) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    restored = store.restore(session_id)
    assert restored.result is RestoreResult.HIT, restored
    with restored, tarfile.open(fileobj=restored.archive, mode="r|") as tar:
        out: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
        for member in tar:
            handle = tar.extractfile(member) if member.isreg() else None
            out[member.name] = (member, handle.read() if handle else None)
    return out


def result(store: WorkspaceStore, session_id: str) -> RestoreResult:
    with store.restore(session_id) as restored:
        return restored.result


def contents(members: Iterable[Member]) -> dict[str, bytes]:
    return {m.name.removeprefix("workspace/"): data for m, data in members if data is not None}


def entry_files(store: WorkspaceStore, session_id: str) -> list[str]:
    entry = store.entry(session_id)
    return sorted(os.listdir(entry)) if entry.exists() else []


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_keeps_content_modes_and_links_and_rewrites_owners(store: WorkspaceStore) -> None:
    saved = store.save("sesn_a", chunks(tar_bytes([(m, d_) for m, d_ in WORKSPACE]), 1000))
    out = restored_members(store, "sesn_a")
    assert set(out) == {"src", "src/main.py", "README.md", "src/pkg", "src/pkg/data.bin", "latest", "abs",
                        "src/main-link.py", "empty"}
    for name, data in contents(WORKSPACE).items():
        assert out[name][1] == data, name
    assert out["src/main.py"][0].mode == 0o755 and out["README.md"][0].mode == 0o600
    assert out["src"][0].isdir() and out["src"][0].mode == 0o755
    assert out["latest"][0].issym() and out["latest"][0].linkname == "src/main.py"
    assert out["abs"][0].issym() and out["abs"][0].linkname == "/etc/passwd"
    assert out["src/main-link.py"][0].islnk() and out["src/main-link.py"][0].linkname == "src/main.py"
    for member, _ in out.values():
        assert (member.uid, member.gid, member.uname, member.gname) == (UID, GID, "", "")
        assert not member.pax_headers.get("SCHILY.xattr.security.capability")
    assert saved.members == 9 and saved.content_bytes == sum(len(v) for v in contents(WORKSPACE).values())
    assert saved.stored_bytes == (store.entry("sesn_a") / saved.snapshot).stat().st_size
    assert saved.seconds >= 0 and saved.tar_bytes > saved.content_bytes and saved.dropped == {}
    assert entry_files(store, "sesn_a") == ["manifest.json", saved.snapshot]


def test_long_and_non_utf8_names_and_long_link_targets_round_trip(store: WorkspaceStore) -> None:
    deep = "/".join(["d" * 60] * 4)
    latin1 = b"caf\xe9.txt".decode("utf-8", "surrogateescape")  # what a non-UTF-8 file name reads as
    target = "t" * 300
    members = [d("d" * 60), d("/".join(["d" * 60] * 2)), d("/".join(["d" * 60] * 3)), d(deep),
               f(f"{deep}/file.txt", b"deep"), f(latin1, b"latin-1"), sym("long-link", target),
               f("ünïcödé.md", b"utf-8")]
    store.save("sesn_a", [tar_bytes(members)])
    out = restored_members(store, "sesn_a")
    assert out[f"{deep}/file.txt"][1] == b"deep" and out[latin1][1] == b"latin-1"
    assert out["ünïcödé.md"][1] == b"utf-8"
    assert out["long-link"][0].linkname == target


def test_restore_is_a_miss_for_an_unknown_session(store: WorkspaceStore) -> None:
    restored = store.restore("sesn_never")
    assert restored.result is RestoreResult.MISS and restored.archive is None


def test_each_save_replaces_the_previous_snapshot(store: WorkspaceStore) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"1")])])
    second = store.save("sesn_a", [tar_bytes([f("v", b"2")])])
    assert restored_members(store, "sesn_a")["v"][1] == b"2"
    assert entry_files(store, "sesn_a") == ["manifest.json", second.snapshot]


def test_setid_bits_are_stripped(store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store.save("sesn_a", [tar_bytes([f("suid", b"x", 0o4755), f("sgid", b"x", 0o2755), d("sticky", 0o3777)])])
    out = restored_members(store, "sesn_a")
    assert out["suid"][0].mode == 0o755 and out["sgid"][0].mode == 0o755 and out["sticky"][0].mode == 0o1777
    assert "workspace_snapshot_setid_stripped session_id=sesn_a count=3" in caplog.text


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
def test_every_codec_round_trips(root: Path, clock: Clock, compression: str) -> None:
    store = make_store(root, clock, compression=compression)
    store.save("sesn_a", [tar_bytes([f("a", b"abc" * 1000)])])
    assert restored_members(store, "sesn_a")["a"][1] == b"abc" * 1000


# --- what the copy refuses or drops -------------------------------------------------------------


def test_devices_fifos_and_foreign_hard_links_are_dropped_and_counted(
        store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    members = [f("keep", b"k"), (info("null", tarfile.CHRTYPE), None), (info("disk", tarfile.BLKTYPE), None),
               (info("pipe", tarfile.FIFOTYPE), None), hard("to-host", "/etc/passwd"),
               hard("to-missing", "workspace/not-there"), hard("to-parent", "workspace/../etc/shadow"),
               d("dir"), hard("to-dir", "workspace/dir"), sym("s", "keep"), hard("to-symlink", "workspace/s"),
               hard("to-later", "workspace/later"), f("later", b"l")]
    saved = store.save("sesn_a", [tar_bytes(members)])
    assert saved.dropped == {"device": 2, "fifo": 1, "hardlink": 6}
    assert set(restored_members(store, "sesn_a")) == {"keep", "dir", "s", "later"}
    assert "workspace_snapshot_dropped session_id=sesn_a kind=hardlink count=6" in caplog.text


@pytest.mark.parametrize("name", ["/etc/cron.d/evil", "workspace/../../etc/passwd", "../workspace/x",
                                  "workspace/a/../../x", "other/x", "/workspace/x"])
def test_unsafe_member_names_fail_the_save_and_keep_the_previous_snapshot(store: WorkspaceStore, name: str) -> None:
    store.save("sesn_a", [tar_bytes([f("good", b"previous")])])
    member = tarfile.TarInfo(name)
    member.size = 3
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([f("new", b"n"), (member, b"bad")])])
    assert caught.value.reason == "unsafe" and isinstance(caught.value, WorkspaceError)
    assert restored_members(store, "sesn_a")["good"][1] == b"previous"
    assert len(entry_files(store, "sesn_a")) == 2


@pytest.mark.parametrize("members", [
    [sym("link", "/etc"), f("link/passwd", b"root::0:0")],  # would be written through the link on extraction
    [f("a", b"1"), f("a/b", b"2")],
    [f("a", b"1"), f("a", b"2")],
    [sym("a", "x"), d("a")],
], ids=["below-symlink", "below-file", "duplicate-file", "dir-over-symlink"])
def test_members_that_would_land_through_a_link_are_refused(store: WorkspaceStore, members: list[Member]) -> None:
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes(members)])
    assert caught.value.reason == "unsafe"
    assert result(store, "sesn_a") is RestoreResult.MISS


def test_too_many_members_is_a_tar_bomb(root: Path, clock: Clock) -> None:
    store = make_store(root, clock, max_members=50)
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([f(f"f{i}", b"") for i in range(60)])])
    assert caught.value.reason == "too_many_members"


def test_a_huge_declared_size_fails_before_any_data_is_read(store: WorkspaceStore) -> None:
    header = info("bomb", size=1 << 40).tobuf(tarfile.PAX_FORMAT)
    pulled = []

    def stream() -> Iterator[bytes]:
        yield tar_bytes([], root_dir=True)[:512] + header
        for _ in range(1 << 20):
            pulled.append(1)
            yield b"\0" * (1 << 20)

    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", stream())
    assert caught.value.reason == "too_large"
    assert len(pulled) <= 2  # read-ahead only: the declared size is refused, not read


def test_content_over_max_bytes_fails(root: Path, clock: Clock) -> None:
    store = make_store(root, clock, max_bytes=100_000)
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", chunks(tar_bytes([f(f"f{i}", b"x" * 30_000) for i in range(4)])))
    assert caught.value.reason == "too_large"


def test_a_huge_extended_header_is_refused(store: WorkspaceStore) -> None:
    pax = info("x", tarfile.XHDTYPE, size=1 << 30).tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([])[:512] + pax + b"\0" * 4096])
    assert caught.value.reason == "too_large"


def test_a_size_header_that_lies_fails_cleanly(store: WorkspaceStore) -> None:
    store.save("sesn_a", [tar_bytes([f("good", b"previous")])])
    header = info("liar", size=1 << 20).tobuf(tarfile.PAX_FORMAT)
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", chunks(tar_bytes([])[:512] + header + b"x" * 5000))
    assert caught.value.reason == "corrupt"
    assert restored_members(store, "sesn_a")["good"][1] == b"previous"
    assert len(entry_files(store, "sesn_a")) == 2


@pytest.mark.parametrize("cut", ["member-boundary", "mid-header", "garbage", "empty", "trailing-data"])
def test_a_stream_without_its_end_marker_is_corrupt(store: WorkspaceStore, cut: str) -> None:
    whole = tar_bytes([f("a", b"a" * 600), f("b", b"b")])
    body = 4 * 512  # root's header, a's header and its two data blocks
    raw = {"member-boundary": whole[:body + 1024], "mid-header": whole[:body + 1024 + 100],
           "garbage": whole[:body] + b"\x01" * 1024, "empty": b"",
           "trailing-data": whole + b"\x07" * 100}[cut]
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [raw])
    assert caught.value.reason == "corrupt"


# --- atomicity ----------------------------------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("at_chunk", [0, 1, 40, 73])
def test_a_source_failure_mid_save_leaves_the_previous_snapshot(store: WorkspaceStore, at_chunk: int) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"previous")])])
    before = entry_files(store, "sesn_a")
    raw = tar_bytes([f("big", os.urandom(300_000))])

    def failing() -> Iterator[bytes]:
        for index, chunk in enumerate(chunks(raw)):
            if index == at_chunk:
                raise Crash("connection reset")
            yield chunk

    with pytest.raises(Crash):
        store.save("sesn_a", failing())
    assert entry_files(store, "sesn_a") == before
    assert restored_members(store, "sesn_a")["v"][1] == b"previous"


@pytest.mark.parametrize("crash_at_rename", [1, 2])
def test_a_process_crash_between_renames_never_exposes_a_half_snapshot(
        store: WorkspaceStore, clock: Clock, monkeypatch: pytest.MonkeyPatch, crash_at_rename: int) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"previous")])])
    renames = []
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        renames.append(dst)
        if len(renames) == crash_at_rename:
            raise Crash("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(store_module, "_unlink_quietly", lambda path: None)  # a dead process cleans nothing up
    with pytest.raises(Crash):
        store.save("sesn_a", [tar_bytes([f("v", b"new")])])
    monkeypatch.undo()
    leftovers = entry_files(store, "sesn_a")
    assert len(leftovers) == 4  # manifest, previous snapshot, and the dead save's files
    assert restored_members(store, "sesn_a")["v"][1] == b"previous"
    assert store.sweep().tmp_removed == 0  # a live writer might still own them
    clock.now += HOUR + 1
    for name in leftovers:
        os.utime(store.entry("sesn_a") / name, (clock.now - HOUR - 1,) * 2)
    counts = store.sweep()
    assert counts.tmp_removed + counts.orphans_removed == 2
    assert restored_members(store, "sesn_a")["v"][1] == b"previous"
    assert len(entry_files(store, "sesn_a")) == 2


def test_a_store_write_error_is_a_snapshot_error(store: WorkspaceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"previous")])])

    def no_space(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([f("v", b"new")])])
    monkeypatch.undo()
    assert caught.value.reason == "io_error"
    assert restored_members(store, "sesn_a")["v"][1] == b"previous"
    assert len(entry_files(store, "sesn_a")) == 2


def test_two_concurrent_savers_never_corrupt_each_other(store: WorkspaceStore) -> None:
    payloads = {name: tar_bytes([f("who", name.encode()), f("data", os.urandom(200_000) + name.encode())])
                for name in ("A", "B")}
    def save(name: str, barrier: threading.Barrier, errors: list[BaseException]) -> None:
        def stream() -> Iterator[bytes]:
            for index, chunk in enumerate(chunks(payloads[name], 8192)):
                if index == 5:
                    barrier.wait(timeout=10)  # both saves are in flight at once
                yield chunk
        try:
            store.save("sesn_shared", stream())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for _ in range(8):
        barrier, errors = threading.Barrier(2), list[BaseException]()
        threads = [threading.Thread(target=save, args=(name, barrier, errors)) for name in payloads]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors
        out = restored_members(store, "sesn_shared")
        winner = out["who"][1]
        assert winner in (b"A", b"B")
        assert out["data"][1] is not None and out["data"][1].endswith(winner)
        snapshots = [n for n in entry_files(store, "sesn_shared") if n.startswith("snap-")]
        assert len(snapshots) == 1


def _save_in_process(root: str, name: str, rounds: int, start: Any) -> None:
    """A second daemon: another process saving the same session into the same store root."""
    store = WorkspaceStore(Path(root), max_bytes=10 << 20, store_max_bytes=1 << 30, retention_seconds=86400,
                           uid=UID, gid=GID)
    start.wait(timeout=60)  # both processes are up: their saves overlap
    for index in range(rounds):
        store.save("sesn_shared", [tar_bytes([f("who", name.encode()), f("n", str(index).encode()),
                                              f("pad", os.urandom(100_000) + name.encode())])])


def test_two_processes_saving_one_session_leave_one_whole_snapshot(root: Path) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [context.Process(target=_save_in_process, args=(str(root), name, 40, start)) for name in ("A", "B")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    store = make_store(root, Clock())
    out = restored_members(store, "sesn_shared")
    assert out["who"][1] in (b"A", b"B") and out["n"][1] == b"39"
    assert out["pad"][1] is not None and out["pad"][1].endswith(out["who"][1])
    assert [n for n in entry_files(store, "sesn_shared") if n.startswith("snap-")] and \
        len(entry_files(store, "sesn_shared")) == 2


def test_a_save_finishing_while_another_is_between_its_renames_keeps_the_other_snapshot(
        store: WorkspaceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interleaving a thread race rarely hits: B completes (and cleans up) after A has named its
    snapshot but before A's manifest rename. A's rename comes last, so A wins and its file must exist."""
    real_rename = os.rename
    interleaved: list[bool] = []

    def rename(src: Any, dst: Any) -> None:
        if str(dst).endswith("manifest.json") and not interleaved:
            interleaved.append(True)
            store.save("sesn_a", [tar_bytes([f("who", b"B")])])
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    store.save("sesn_a", [tar_bytes([f("who", b"A")])])
    monkeypatch.undo()
    assert interleaved
    assert restored_members(store, "sesn_a")["who"][1] == b"A"
    assert len(entry_files(store, "sesn_a")) == 2


def test_a_restore_racing_a_save_gets_a_whole_snapshot(store: WorkspaceStore) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"0")])])
    stop = threading.Event()
    seen: list[bytes | None] = []

    def restore_loop() -> None:
        while not stop.is_set():
            seen.append(restored_members(store, "sesn_a")["v"][1])

    reader = threading.Thread(target=restore_loop)
    reader.start()
    try:
        for index in range(1, 30):
            store.save("sesn_a", [tar_bytes([f("v", str(index).encode()), f("pad", os.urandom(50_000))])])
    finally:
        stop.set()
        reader.join(timeout=30)
    assert seen and all(value is not None and value.isdigit() for value in seen)


# --- corruption, expiry, eviction, sweep --------------------------------------------------------


def snapshot_path(store: WorkspaceStore, session_id: str) -> Path:
    manifest = json.loads((store.entry(session_id) / "manifest.json").read_bytes())
    return store.entry(session_id) / str(manifest["snapshot"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "append", "empty", "delete"])
def test_a_damaged_snapshot_is_corrupt_and_not_restored(
        store: WorkspaceStore, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    store.save("sesn_a", [tar_bytes([f("data", os.urandom(100_000))])])
    path = snapshot_path(store, "sesn_a")
    raw = path.read_bytes()
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes({"flip": raw[:5000] + bytes([raw[5000] ^ 1]) + raw[5001:], "truncate": raw[:len(raw) // 2],
                          "append": raw + b"\0", "empty": b""}[damage])
    restored = store.restore("sesn_a")
    assert restored.result is RestoreResult.CORRUPT and restored.archive is None
    assert f"workspace_snapshot_corrupt session_id=sesn_a reason={restored.reason}" in caplog.text
    assert restored.reason in {"checksum_mismatch", "truncated", "size_mismatch", "decompress_failed",
                               "missing_snapshot"}


@pytest.mark.parametrize("manifest", [b"{not json", b"[]", b'{"format": 2}', b"x" * 100_000, b"compression=[]",
                                      b"stored_bytes=true", b"snapshot=null", b"format=1.5"])
def test_an_unreadable_manifest_is_corrupt(store: WorkspaceStore, manifest: bytes) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"1")])])
    path = store.entry("sesn_a") / "manifest.json"
    if b"=" in manifest:  # one field of a valid manifest replaced by a value of the wrong type
        key, value = manifest.decode().split("=")
        manifest = json.dumps({**json.loads(path.read_bytes()), key: json.loads(value)}).encode()
    path.write_bytes(manifest)
    restored = store.restore("sesn_a")
    assert (restored.result, restored.reason) == (RestoreResult.CORRUPT, "bad_manifest")


def test_sessions_never_see_each_other(store: WorkspaceStore, root: Path) -> None:
    hostile = ["sesn_b", "../sesn_b", "sesn_b/../../etc", "/etc/passwd", "", "séssion\n", "a" * 5000]
    for index, session_id in enumerate(hostile):
        store.save(session_id, [tar_bytes([f("who", str(index).encode())])])
    for index, session_id in enumerate(hostile):
        assert restored_members(store, session_id)["who"][1] == str(index).encode()
    assert all(len(name) == 64 and set(name) <= set("0123456789abcdef") for name in os.listdir(root))
    assert len(os.listdir(root)) == len(hostile)


def test_a_manifest_of_another_session_is_refused(store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    store.save("sesn_a", [tar_bytes([f("secret", b"of a")])])
    os.rename(store.entry("sesn_a"), store.entry("sesn_b"))  # e.g. a store tampered with by hand
    restored = store.restore("sesn_b")
    assert (restored.result, restored.reason) == (RestoreResult.CORRUPT, "session_mismatch")
    assert "workspace_snapshot_corrupt session_id=sesn_b reason=session_mismatch" in caplog.text


def test_a_manifest_naming_a_file_outside_its_entry_is_refused(store: WorkspaceStore) -> None:
    store.save("sesn_a", [tar_bytes([f("secret", b"of a")])])
    store.save("sesn_b", [tar_bytes([f("mine", b"b")])])
    manifest_path = store.entry("sesn_b") / "manifest.json"
    manifest = json.loads(manifest_path.read_bytes())
    manifest["snapshot"] = f"../{store.entry('sesn_a').name}/{snapshot_path(store, 'sesn_a').name}"
    manifest_path.write_text(json.dumps(manifest))
    assert result(store, "sesn_b") is RestoreResult.CORRUPT


def test_an_old_snapshot_expires_and_is_deleted(store: WorkspaceStore, clock: Clock) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"1")])])
    clock.now += 7 * 86400 - 1
    assert result(store, "sesn_a") is RestoreResult.HIT
    clock.now += 2
    assert result(store, "sesn_a") is RestoreResult.EXPIRED
    assert not store.entry("sesn_a").exists()
    assert result(store, "sesn_a") is RestoreResult.MISS


def test_sweep_expires_then_evicts_oldest_first(root: Path, clock: Clock) -> None:
    store = make_store(root, clock, compression="none")
    sizes = {}
    start = clock.now
    for index, session_id in enumerate(["s0", "s1", "s2", "s3", "s4"]):
        clock.now = start + index * 1000
        sizes[session_id] = store.save(session_id, [tar_bytes([f("d", os.urandom(20_000))])]).stored_bytes
    clock.now += 7 * 86400 - 2500  # s0 and s1 are now past retention
    store.store_max_bytes = sizes["s4"] + sizes["s3"] + 2000  # and the cap holds two of the rest
    counts = store.sweep()
    assert (counts.expired, counts.evicted, counts.entries) == (2, 1, 2)
    assert counts.store_bytes <= store.store_max_bytes
    assert [result(store, s) for s in ["s2", "s3", "s4"]] == [RestoreResult.MISS, RestoreResult.HIT,
                                                                     RestoreResult.HIT]


def test_sweep_evicts_fresh_entries_whole(root: Path, clock: Clock) -> None:
    store = make_store(root, clock, compression="none")
    for index in range(3):
        clock.now += 10
        store.save(f"s{index}", [tar_bytes([f("d", os.urandom(20_000))])])
    store.store_max_bytes = 40_000  # one entry: a 30 KB tar and its manifest
    counts = store.sweep()
    assert (counts.evicted, counts.entries) == (2, 1) and counts.store_bytes <= 40_000
    assert not store.entry("s0").exists() and not store.entry("s1").exists()
    assert result(store, "s2") is RestoreResult.HIT


def test_expiry_never_removes_a_save_that_landed_meanwhile(
        store: WorkspaceStore, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"old")])])
    clock.now += 8 * 86400
    real_read = WorkspaceStore._read_manifest
    calls = []

    def read_manifest(self: WorkspaceStore, entry: Path) -> Any:
        manifest = real_read(self, entry)
        calls.append(1)
        if len(calls) == 1:  # the restore has judged it expired: another daemon saves right now
            clock.now -= 8 * 86400
            self.save("sesn_a", [tar_bytes([f("v", b"new")])])
            clock.now += 8 * 86400
        return manifest

    monkeypatch.setattr(WorkspaceStore, "_read_manifest", read_manifest)
    assert result(store, "sesn_a") is RestoreResult.EXPIRED
    monkeypatch.undo()
    clock.now -= 8 * 86400
    assert restored_members(store, "sesn_a")["v"][1] == b"new"


def test_a_snapshot_replaced_while_opening_is_retried_from_the_manifest(
        store: WorkspaceStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"old")])])
    raised: list[Any] = []

    def stale_open(path: Any, mode: str = "r", *args: Any) -> Any:
        if str(path).endswith(".tar.zst") and not raised:
            raised.append(path)
            store.save("sesn_a", [tar_bytes([f("v", b"new")])])  # another host replaced and deleted it
            raise OSError(116, "Stale file handle")  # ESTALE, as NFS reports it
        return open(path, mode, *args)

    monkeypatch.setattr(store_module, "open", stale_open, raising=False)
    assert restored_members(store, "sesn_a")["v"][1] == b"new"
    assert raised


def test_sweep_removes_only_stale_tmp_files(store: WorkspaceStore, clock: Clock, root: Path) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"1")])])
    entry = store.entry("sesn_a")
    stale = [entry / "snap-1-old-1-aa.tar.zst.tmp", entry / "manifest-1-old-1-aa.json.tmp"]
    fresh = [entry / "snap-2-new-2-bb.tar.zst.tmp", entry / "manifest-2-new-2-bb.json.tmp"]
    for path in stale + fresh:
        path.write_bytes(b"partial")
    for path in stale:
        os.utime(path, (clock.now - HOUR - 10,) * 2)
    for path in fresh:
        os.utime(path, (clock.now - 60,) * 2)
    counts = store.sweep()
    assert counts.tmp_removed == 2 and all(not p.exists() for p in stale) and all(p.exists() for p in fresh)
    assert result(store, "sesn_a") is RestoreResult.HIT


def test_delete_removes_the_entry(store: WorkspaceStore) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"1")])])
    store.save("sesn_b", [tar_bytes([f("v", b"2")])])
    assert store.delete("sesn_a") == 2 and store.delete("sesn_a") == 0
    assert result(store, "sesn_a") is RestoreResult.MISS
    assert result(store, "sesn_b") is RestoreResult.HIT


def test_untrusted_session_ids_are_logged_by_hash(store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store.save("evil\nworkspace_snapshot_saved session_id=admin", [tar_bytes([f("v", b"1")])])
    assert "session_id=sha256:" in caplog.text and "\nworkspace_snapshot_saved session_id=admin" not in caplog.text


# --- hostile links never reach the host ---------------------------------------------------------


class OpenAudit:
    """Every path this process opens, lists, renames or removes while `active` (sys.addaudithook)."""

    EVENTS = {"open", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod",
              "os.utime", "os.link", "os.symlink", "os.truncate", "shutil.rmtree"}

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.active and event in self.EVENTS:
            for arg in args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]:
                if isinstance(arg, str | bytes | os.PathLike):
                    self.paths.append(os.path.abspath(os.fsdecode(arg)))


AUDIT = OpenAudit()


def test_hostile_links_are_data_and_nothing_outside_the_store_is_touched(
        store: WorkspaceStore, root: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_bytes(b"host secret")
    os.utime(canary, (1_600_000_000, 1_600_000_000))
    store.save("sesn_other", [tar_bytes([f("secret", b"of another session")])])
    other_entry = store.entry("sesn_other")
    members = [sym("passwd", "/etc/passwd"), sym("canary", str(canary)), sym("other", str(other_entry)),
               sym("other-manifest", str(other_entry / "manifest.json")), sym("up", "../../../../../../"),
               hard("canary-hard", str(canary)), hard("passwd-hard", "/etc/passwd"),
               hard("other-hard", "workspace/../" + str(other_entry / "manifest.json"))]
    AUDIT.active = True
    try:
        saved = store.save("sesn_evil", chunks(tar_bytes(members), 100))
        out = restored_members(store, "sesn_evil")
        store.sweep()
        store.delete("sesn_evil")
    finally:
        AUDIT.active = False
    allowed = (str(root) + os.sep, str(tmp_path) + os.sep)  # the store and its spool dir (tmp_path)
    outside = [p for p in AUDIT.paths if not p.startswith(allowed) and p != str(root) and p != str(tmp_path)]
    assert not outside, outside
    assert all(not p.startswith(str(canary)) for p in AUDIT.paths)
    assert canary.read_bytes() == b"host secret" and canary.stat().st_mtime == 1_600_000_000
    assert saved.dropped == {"hardlink": 3}
    assert {name: m.linkname for name, (m, _) in out.items()} == {
        "passwd": "/etc/passwd", "canary": str(canary), "other": str(other_entry),
        "other-manifest": str(other_entry / "manifest.json"), "up": "/"}  # where ../../../../../../ leads
    assert all(m.issym() for m, _ in out.values())
    assert restored_members(store, "sesn_other")["secret"][1] == b"of another session"
    assert hashlib.sha256(b"sesn_evil").hexdigest() not in os.listdir(root)


# --- bounds: whatever the workspace holds, a save costs linear time and bounded memory (issue 18) ---


def lazy_tar(members: Iterable[Member]) -> Iterator[bytes]:
    """The stream of `members` made one header at a time (a big hostile stream is never held whole)."""
    yield info("workspace", tarfile.DIRTYPE, mode=0o755).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    for member, data in members:
        yield member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if data:
            yield data + b"\0" * (-len(data) % 512)
    yield b"\0" * 1024


def deep_tree(depth: int, files: int, name_bytes: int = NAME_MAX_BYTES) -> Iterator[Member]:
    """A chain of `depth` directories, then `files` empty files in the deepest, each name `name_bytes` long."""
    path = ""
    for _ in range(depth):
        path = f"{path}/d" if path else "d"
        yield d(path)
    pad = name_bytes - len(f"workspace/{path}/") - 8
    for index in range(files):
        yield f(f"{path}/{index:08d}" + "x" * pad, b"")


def test_a_name_or_link_target_longer_than_linux_allows_fails_the_save(store: WorkspaceStore) -> None:
    store.save("sesn_a", [tar_bytes([f("v", b"previous")])])
    too_long = {"name": [f("n" * (NAME_MAX_BYTES - len("workspace/") + 1), b"")],
                "symlink": [sym("s", "t" * (LINK_MAX_BYTES + 1))],
                "hardlink": [f("a", b""), hard("h", "workspace/" + "a" * LINK_MAX_BYTES)]}
    for members in too_long.values():
        with pytest.raises(SnapshotError) as caught:
            store.save("sesn_a", [tar_bytes(members)])
        assert caught.value.reason == "name_too_long"
    gnu = io.BytesIO()  # a GNU long-name header ('L') is refused before its data is read
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info("n" * 5000))
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [gnu.getvalue()])
    assert caught.value.reason == "name_too_long"
    assert restored_members(store, "sesn_a")["v"][1] == b"previous"
    # The longest names a sandbox can hold are kept.
    store.save("sesn_a", [tar_bytes([f("n" * (NAME_MAX_BYTES - len("workspace/")), b"x"),
                                     sym("s", "t" * LINK_MAX_BYTES)])])
    assert restored_members(store, "sesn_a")["s"][0].linkname == "t" * LINK_MAX_BYTES


def test_names_over_the_budget_fail_the_save(root: Path, clock: Clock) -> None:
    store = make_store(root, clock, max_name_bytes=50_000, max_members=100_000)
    store.save("sesn_a", [tar_bytes([f("v", b"previous")])])
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", lazy_tar(deep_tree(1, 100, name_bytes=1000)))
    assert caught.value.reason == "names_too_large"
    with pytest.raises(SnapshotError) as caught:  # link targets count too
        store.save("sesn_a", lazy_tar(sym(f"s{i}", "t" * 1000) for i in range(100)))
    assert caught.value.reason == "names_too_large"
    assert restored_members(store, "sesn_a")["v"][1] == b"previous"
    assert store.save("sesn_a", lazy_tar(deep_tree(1, 40, name_bytes=1000))).members == 41


def test_deep_nesting_costs_the_same_per_member_as_a_flat_tree(
        root: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each member is placed with two hash lookups (its name, its directory) whatever its depth: the bytes
    hashed stay within twice the bytes of the names. (The quadratic check it replaces looked up every
    ancestor: 2000 lookups of ~2 KB each per member at depth 2000, ~13 ms a member.)"""
    store = make_store(root, clock, max_members=100_000)
    hashed = []
    real_key = snapshot_module._Copy.key

    def counting_key(self: Any, name: str) -> int:
        hashed.append(len(name))
        return real_key(self, name)

    monkeypatch.setattr(snapshot_module._Copy, "key", counting_key)
    began = time.monotonic()
    saved = store.save("sesn_deep", lazy_tar(deep_tree(2000, 2000)))
    seconds = time.monotonic() - began
    name_bytes = sum(len(m.name) for m, _ in deep_tree(2000, 2000))
    assert saved.members == 4000
    assert len(hashed) <= 2 * saved.members and sum(hashed) <= 2 * name_bytes
    assert seconds < 30, seconds  # ~1 s here; the quadratic check took over a minute
    out = restored_members(store, "sesn_deep")
    assert len(out) == 4000 and max(len(name) for name in out) == NAME_MAX_BYTES - len("workspace/")


def test_memory_of_a_save_does_not_grow_with_name_lengths(root: Path, clock: Clock) -> None:
    """4000 files with 4 KB names (16 MB of names) are saved with ~1 MB of Python heap: per member the copy
    keeps a hash, never the name (the copy it replaces kept every name: ~80 MB for 20k such members)."""
    store = make_store(root, clock, max_members=100_000)
    tracemalloc.start()
    try:
        saved = store.save("sesn_long", lazy_tar(deep_tree(3, 4000)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert saved.members == 4003
    assert peak < 6 << 20, peak


def test_a_save_past_its_deadline_fails_and_keeps_nothing_new(root: Path, clock: Clock) -> None:
    store = make_store(root, clock, save_timeout_seconds=0.3)
    store.save("sesn_a", [tar_bytes([f("v", b"previous")])])
    raw = tar_bytes([f("big", os.urandom(200_000))])

    def slow() -> Iterator[bytes]:
        for chunk in chunks(raw, 2000):
            time.sleep(0.02)  # 100 chunks: 2 s in all
            yield chunk

    began = time.monotonic()
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", slow())
    assert caught.value.reason == "timed_out" and time.monotonic() - began < 1.5
    assert restored_members(store, "sesn_a")["v"][1] == b"previous"
    assert len(entry_files(store, "sesn_a")) == 2


def pax_member(records: bytes, name: str = "workspace/x") -> bytes:
    """A pax header with the raw `records`, then a ustar header for an empty file `name`."""
    header = info("././@PaxHeader", tarfile.XHDTYPE, size=len(records)).tobuf(tarfile.USTAR_FORMAT)
    return header + records + b"\0" * (-len(records) % 512) + tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT)


def record(keyword: bytes, value: bytes) -> bytes:
    body = b" " + keyword + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return str(length).encode() + body


def test_a_pax_header_is_parsed_in_linear_time(store: WorkspaceStore) -> None:
    """tarfile's parser of Python 3.11.7 searches the records with a backtracking regular expression:
    900 KB of digits take it ~15 minutes. Here the records are read by their lengths."""
    digits = record(b"comment", b"1" * 900_000)
    named = record(b"path", "workspace/ünï".encode())
    began = time.monotonic()
    saved = store.save("sesn_a", [tar_bytes([])[:512] + pax_member(digits + named) + b"\0" * 1024])
    assert time.monotonic() - began < 10
    assert saved.members == 1 and set(restored_members(store, "sesn_a")) == {"ünï"}


@pytest.mark.parametrize("raw", [
    pax_member(b"12 path=a\n"),  # a length that does not end on the newline
    pax_member(b"99 path=workspace/x\n"),  # past the header's end
    pax_member(b"path=workspace/x\n"),  # no length
    pax_member(b"9 =value\n"),  # no keyword
], ids=["wrong-length", "past-the-end", "no-length", "no-keyword"])
def test_a_malformed_pax_header_is_corrupt(store: WorkspaceStore, raw: bytes) -> None:
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([])[:512] + raw + b"\0" * 1024])
    assert caught.value.reason == "corrupt"


def test_global_headers_and_chains_of_extended_headers_are_refused(store: WorkspaceStore) -> None:
    glob = info("pax_global_header", tarfile.XGLTYPE, size=len(record(b"comment", b"x")))
    raw = glob.tobuf(tarfile.USTAR_FORMAT) + record(b"comment", b"x").ljust(512, b"\0")
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([])[:512] + raw + tar_bytes([f("a", b"")], root_dir=False)])
    assert caught.value.reason == "unsafe"
    one = record(b"comment", b"x")
    chained = b"".join(info("x", tarfile.XHDTYPE, size=len(one)).tobuf(tarfile.USTAR_FORMAT) + one.ljust(512, b"\0")
                       for _ in range(5000))  # a recursion in tarfile per header
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([])[:512] + chained + tar_bytes([f("a", b"")], root_dir=False)])
    assert caught.value.reason == "corrupt"


# --- links: a snapshot is always something put_archive extracts, and nothing lands through a link ---


@pytest.mark.parametrize(("name", "target", "accepted"), [
    # as measured against docker 20.10's put_archive(container, "/workspace", ...)
    ("up", "../../etc", False), ("up", "/etc", True), ("up", "/../../etc", False), ("d/up", "../../etc", False),
    ("d/up", "../x", True), ("a", "d/../../etc", False), ("esc", "sub/p/..", True), ("x", "../workspace2", True),
    ("up", "..", False), ("d/up", "..", True), ("e", "", False),
])
def test_the_engine_model_matches_what_put_archive_refuses(name: str, target: str, accepted: bool) -> None:
    directory = posixpath.dirname(f"/workspace/{name}")
    assert snapshot_module.engine_accepts_symlink(directory, target) is accepted


def test_symlinks_leaving_the_workspace_by_dot_dot_are_kept_with_the_target_they_resolve_to(
        store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    members = [sym("up", "../../etc"), d("a"), d("a/b"), sym("a/b/passwd", "../../../../etc/passwd"),
               sym("a/in", "../x"), sym("a/root", "../../.."), sym("abs", "/etc/shadow"),
               sym("abs-up", "/../../etc/hosts"), sym("mid", "a/../../etc"), sym("dir-slash", ".././../usr/"),
               sym("weird", "../../x/../../../../y"), sym("empty", "")]
    saved = store.save("sesn_links", [tar_bytes(members)])
    out = restored_members(store, "sesn_links")
    assert {name: m.linkname for name, (m, _) in out.items() if m.issym()} == {
        "up": "/etc", "a/b/passwd": "/etc/passwd", "a/in": "../x", "a/root": "/", "abs": "/etc/shadow",
        "abs-up": "/etc/hosts", "mid": "/workspace/a/../../etc", "dir-slash": "/usr/"}
    assert saved.links_rewritten == 6 and saved.dropped == {"symlink": 2}  # weird and empty: no such target
    assert "workspace_snapshot_links_rewritten session_id=sesn_links count=6" in caplog.text
    assert "workspace_snapshot_dropped session_id=sesn_links kind=symlink count=2" in caplog.text
    for name, (member, _) in out.items():
        if member.issym():
            assert snapshot_module.engine_accepts_symlink(posixpath.dirname(f"/workspace/{name}"), member.linkname)


@pytest.mark.parametrize("members", [
    [d("a"), sym("a", "/etc"), f("a/passwd", b"root::0:0")],  # a directory turned into a link, then written through
    [f("q/r", b"no directory q before it")],
    [f("f", b"x"), hard("h", "workspace/f"), f("h/x", b"below a hard link")],
    [(info("p", tarfile.FIFOTYPE), None), f("p/x", b"below a dropped fifo")],
], ids=["dir-then-symlink-then-file", "ahead-of-its-directory", "below-a-hard-link", "below-a-dropped-member"])
def test_a_member_not_below_a_directory_copied_before_it_is_refused(
        store: WorkspaceStore, members: list[Member]) -> None:
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes(members)])
    assert caught.value.reason == "unsafe"


def test_error_messages_show_names_cut_short(store: WorkspaceStore, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SnapshotError) as caught:
        store.save("sesn_a", [tar_bytes([f("a" * 3000, b"1"), f("a" * 3000, b"2")])])
    assert caught.value.reason == "unsafe" and len(str(caught.value)) < 200
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


@pytest.mark.parametrize("outcome", ["refused", "saved"])
def test_the_engine_stream_is_closed_when_the_copy_ends(store: WorkspaceStore, outcome: str) -> None:
    """Left open, docker's get_archive stream keeps the engine busy with the container: its next
    get_archive (or removal) waits for the client's timeout. It is closed however the copy ends."""
    closed = []
    members = [f(f"f{i}", b"x" * 1000) for i in range(2000 if outcome == "refused" else 10)]  # max_members=1000

    def engine_stream() -> Iterator[bytes]:
        try:
            yield from chunks(tar_bytes(members), 4096)
        finally:
            closed.append(True)

    if outcome == "refused":
        with pytest.raises(SnapshotError):
            store.save("sesn_a", engine_stream())
    else:
        store.save("sesn_a", engine_stream())
    assert closed == [True]
