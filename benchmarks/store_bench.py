"""Save and restore throughput of the workspace snapshot store: plain tar vs gzip vs zstd.

Builds once (cached under build/bench/) a docker-like tar of a synthetic ~500 MB workspace with a
realistic mix: source-like text files (~40%), a git-like pack of random bytes (~30%) and
already-compressed blobs (~30%). Each codec then saves it through `WorkspaceStore.save` from 2 MB
chunks (what docker-py's get_archive yields) and restores it through `WorkspaceStore.restore`
(verify + decompress into the spool file) read to the end, as put_archive would. One table is
printed; nothing is asserted.

    python benchmarks/store_bench.py [--mb 500] [--runs 1]
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import zstandard  # noqa: E402

from sandboxd.workspace.snapshot import CODECS, Codec  # noqa: E402
from sandboxd.workspace.store import RestoreResult, WorkspaceStore  # noqa: E402

CACHE = ROOT / "build" / "bench"
MB = 1 << 20
WORDS = ("def class return import from self if else elif for while in not and or None True False try except "
         "raise with as yield async await lambda pass break continue value result config session workspace "
         "sandbox container archive request response error logger client server handler token snapshot "
         "manifest stream buffer index offset length count total name path file data item key").split()


def _source_file(rng: random.Random, size: int) -> bytes:
    lines, used = [], 0
    while used < size:
        indent = "    " * rng.randint(0, 3)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
        line = f"{indent}{words}({rng.choice(WORDS)}_{rng.randint(0, 999)})  # {rng.choice(WORDS)}\n"
        lines.append(line)
        used += len(line)
    return "".join(lines).encode()[:size]


def _compressed_blob(rng: random.Random, size: int) -> bytes:
    """Already-compressed data (like .png, .whl, .gz): zlib output of semi-random text."""
    out = b""
    while len(out) < size:
        out += zlib.compress(rng.randbytes(4096) + _source_file(rng, 4096), 9)
    return out[:size]


def _member(tar: tarfile.TarFile, name: str, data: bytes | None, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(f"workspace/{name}")
    info.mode, info.mtime, info.uid, info.gid = mode, 1_700_000_000, 10001, 10001
    if data is None:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def build_workspace(total_mb: int) -> Path:
    path = CACHE / f"store-workspace-{total_mb}mb.tar"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = random.Random(12)
    text_budget, pack_budget = int(total_mb * MB * 0.4), int(total_mb * MB * 0.3)
    blob_budget = total_mb * MB - text_budget - pack_budget
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _member(tar, "", None, 0o755)
        for directory in ("src", ".git", ".git/objects", ".git/objects/pack", "assets"):
            _member(tar, directory, None, 0o755)
        used, index = 0, 0
        while used < text_budget:
            size = min(rng.randint(500, 40_000), text_budget - used)
            if index % 200 == 0:
                _member(tar, f"src/m{index // 200}", None, 0o755)
            _member(tar, f"src/m{index // 200}/f{index}.py", _source_file(rng, size))
            used, index = used + size, index + 1
        _member(tar, ".git/objects/pack/pack-1.pack", rng.randbytes(pack_budget), 0o444)
        used, index = 0, 0
        while used < blob_budget:
            size = min(rng.randint(200_000, 4 * MB), blob_budget - used)
            _member(tar, f"assets/blob{index}.png", _compressed_blob(rng, size))
            used, index = used + size, index + 1
    tmp.rename(path)
    return path


def _zstd_variant(name: str, level: int, threads: int) -> None:
    """Register a zstd codec with other settings, only for this benchmark (the store uses level 3)."""
    def writer(raw: IO[bytes]) -> IO[bytes]:
        compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        return cast(IO[bytes], compressor.stream_writer(raw, closefd=False))

    CODECS[name] = Codec(name, ".tar.zst", writer, CODECS["zstd"].reader)


ROWS = {"none": "tar", "gzip": "gzip -6", "zstd-1": "zstd -1", "zstd": "zstd -3 (default)",
        "zstd-3-t2": "zstd -3, 2 threads"}


def chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while data := handle.read(2 * MB):
            yield data


def measure(tar_path: Path, compression: str, scratch: Path) -> tuple[float, float, int]:
    root = scratch / compression
    store = WorkspaceStore(root, max_bytes=4 << 30, store_max_bytes=64 << 30, retention_seconds=86400,
                           uid=10001, gid=10001, compression=compression, spool_dir=scratch)
    began = time.perf_counter()
    saved = store.save("sesn_bench", chunks(tar_path))
    save_seconds = time.perf_counter() - began
    began = time.perf_counter()
    with store.restore("sesn_bench") as restored:
        assert restored.result is RestoreResult.HIT and restored.archive is not None
        while restored.archive.read(2 * MB):
            pass
    restore_seconds = time.perf_counter() - began
    shutil.rmtree(root)
    return save_seconds, restore_seconds, saved.stored_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    tar_path = build_workspace(args.mb)
    size = tar_path.stat().st_size
    print(f"workspace: {size / MB:.0f} MB tar; median of {args.runs} run(s)")
    print(f"{'compressor':<20} {'save MB/s':>10} {'restore MB/s':>13} {'stored MB':>10} {'ratio':>7}")
    _zstd_variant("zstd-1", 1, 0)
    _zstd_variant("zstd-3-t2", 3, 2)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        for compression, label in ROWS.items():
            runs = [measure(tar_path, compression, Path(scratch)) for _ in range(args.runs)]
            save = statistics.median(r[0] for r in runs)
            restore = statistics.median(r[1] for r in runs)
            stored = runs[0][2]
            print(f"{label:<20} {size / MB / save:>10.0f} {size / MB / restore:>13.0f} {stored / MB:>10.0f} "
                  f"{size / stored:>7.2f}")


if __name__ == "__main__":
    main()
