"""Time to prepare a workspace from a git repository: plain `git clone` vs sandboxd, cold and warm.

Builds once (cached under build/bench/) a repository of 5,000 commits over 400 files with
`git fast-import`, serves it over smart HTTP (`git http-backend`) on 127.0.0.1, and prints one
table: plain full and shallow clones, then `Workspaces.prepare` (default shallow checkout, and
depth=full) on a cold mirror cache, on a warm one, and warm after new commits upstream. Each
figure is the median of a few runs. Nothing about timing is asserted.

    python benchmarks/workspace_bench.py [--runs 3] [--commits 5000]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the git server fixture lives with the tests

from tests.integration.git_server import GitHttpServer, git, push_commit  # noqa: E402

from sandboxd.workspace import WorkspaceConfig, Workspaces  # noqa: E402

CACHE = ROOT / "build" / "bench"
FILES = 400


def _body(i: int, n: int) -> bytes:
    """A revision of file i at commit n: 3 KB of hex that deltas poorly, like real churn does."""
    seed = hashlib.sha256(f"{i}/{n}".encode()).hexdigest()
    return (f"file {i} revision {n}\n" + "".join(
        hashlib.sha256(f"{seed}{k}".encode()).hexdigest() + "\n" for k in range(48))).encode()


def _fast_import_stream(commits: int) -> bytes:
    """A fast-import stream: each commit rewrites three files, every 50th adds one."""
    out = []
    files = FILES
    for n in range(1, commits + 1):
        message = f"commit {n}\n".encode()
        out.append(b"commit refs/heads/main\n")
        out.append(f"committer Bench <bench@example.invalid> {1_600_000_000 + n * 60} +0000\n".encode())
        out.append(b"data %d\n%s" % (len(message), message))
        touched = range(files) if n == 1 else {(n * 7) % files, (n * 13) % files, (n * 31) % files}
        for i in touched:
            body = _body(i, n)
            out.append(b"M 100644 inline src/mod%03d/file%04d.txt\ndata %d\n%s\n" % (i % 40, i, len(body), body))
        if n % 50 == 0:
            files += 1
    return b"".join(out)


def build_repository(commits: int) -> Path:
    """The benchmark repository (a bare repo), built once per commit count."""
    bare = CACHE / f"repo-v2-{commits}" / "bench.git"
    if (bare / "refs" / "heads" / "main").exists() or (bare / "packed-refs").exists():
        return bare
    shutil.rmtree(bare.parent, ignore_errors=True)
    bare.parent.mkdir(parents=True)
    git("init", "-q", "--bare", str(bare))
    began = time.monotonic()
    subprocess.run(["git", "fast-import", "--quiet"], input=_fast_import_stream(commits), cwd=bare, check=True)
    git("repack", "-adq", cwd=bare)
    git("symbolic-ref", "HEAD", "refs/heads/main", cwd=bare)
    print(f"built {commits} commits in {time.monotonic() - began:.1f}s ({bare})", file=sys.stderr)
    return bare


def median_seconds(runs: int, setup: Callable[[int], object], action: Callable[[int], object]) -> float:
    times = []
    for i in range(runs):
        setup(i)
        began = time.perf_counter()
        action(i)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def plain_clone(url: str, dest: Path, *extra: str) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    git("clone", "-q", *extra, url, str(dest))


def prepare(config: WorkspaceConfig, metadata: dict[str, str], work_id: str) -> int:
    async def run() -> int:
        workspaces = Workspaces(config)
        async with workspaces.prepare(workspaces.plan(metadata), work_id) as archive:
            assert archive is not None
            return len(archive.read())

    return anyio.run(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commits", type=int, default=5000)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per request, in the shaped run")
    parser.add_argument("--mbit", type=float, default=100.0, help="response bandwidth in the shaped run")
    args = parser.parse_args()
    source = build_repository(args.commits)
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    links = (("loopback", 0.0, None), (f"{args.latency_ms:g} ms/request, {args.mbit:g} Mbit/s",
                                       args.latency_ms / 1000, int(args.mbit * 1e6 / 8)))
    results = []
    for _label, latency, rate in links:
        with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as scratch_name:
            scratch = Path(scratch_name)
            shutil.copytree(source, scratch / "root" / "bench.git")
            with GitHttpServer(scratch / "root", latency_seconds=latency, bytes_per_second=rate) as server:
                results.append(measure(server, scratch, args.runs, args.commits))
    print(f"\nworkspace from a {args.commits}-commit repository ({size / 2**20:.0f} MiB packed) over smart HTTP "
          f"(git http-backend) on 127.0.0.1; median of {args.runs} runs, seconds")
    width = max(len(name) for name, _, _ in results[0])
    print("scenario".ljust(width) + "".join(f"  {label:>24}" for label, _, _ in links) + "  what it does")
    for row, (name, _, note) in enumerate(results[0]):
        print(name.ljust(width) + "".join(f"  {r[row][1]:24.3f}" for r in results) + f"  {note}")


def measure(server: GitHttpServer, scratch: Path, runs: int, commits: int) -> list[tuple[str, float, str]]:
    url = server.url("bench.git")
    rows: list[tuple[str, float, str]] = []
    dest = scratch / "clone"

    def no_setup(_: int) -> None:
        pass

    rows.append(("git clone (full)", median_seconds(runs, no_setup, lambda i: plain_clone(url, dest)),
                 f"{commits} commits, checkout"))
    rows.append(("git clone --depth 1", median_seconds(runs, no_setup, lambda i: plain_clone(url, dest, "--depth",
                                                                                           "1")), "checkout"))

    for label, options in (("shallow", ""), ("depth=full", " depth=full")):
        rows += _sandboxd_rows(server, scratch, runs, label, {"repo": url + options})
    return rows


def _sandboxd_rows(server: GitHttpServer, scratch: Path, runs: int, label: str,
                   metadata: dict[str, str]) -> list[tuple[str, float, str]]:
    def config(i: int) -> WorkspaceConfig:
        return WorkspaceConfig(state_dir=scratch / f"state-{label}-{i}", git_allowed_hosts=frozenset({server.host}),
                               allow_insecure_http=True)

    def no_setup(_: int) -> None:
        pass

    def push(i: int) -> None:
        for n in range(5):
            push_commit(server, "bench.git", scratch, message=f"new {label} {i}-{n}")

    return [
        (f"sandboxd {label}, cold cache",
         median_seconds(runs, no_setup, lambda i: prepare(config(i), metadata, f"cold-{i}")),
         "mirror fetch (full history) + checkout + tar"),
        (f"sandboxd {label}, warm cache",
         median_seconds(runs, no_setup, lambda i: prepare(config(0), metadata, f"warm-{i}")),
         "ls-remote + checkout from the mirror + tar"),
        (f"sandboxd {label}, warm + 5 new commits",
         median_seconds(runs, push, lambda i: prepare(config(0), metadata, f"warm-push-{i}")),
         "ls-remote + incremental fetch + checkout + tar"),
    ]


if __name__ == "__main__":
    main()
