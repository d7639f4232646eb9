"""Git repositories into the workspace archive, against a real smart-HTTP git server on 127.0.0.1.

Refs of every kind, depth, submodules, credentials (never in argv, logs, the archive or the mirror
cache), the mirror cache (warm fetches, concurrent sessions, restarts, eviction) and ownership.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from sandboxd.workspace import Workspaces
from tests.integration.conftest import (
    GitFixture,
    assert_mirrors_consistent,
    mirror_dirs,
    prepare_archive,
)
from tests.integration.git_server import TOKEN_USER, push_commit

pytestmark = pytest.mark.anyio


def _commits_in(unpacked_shallow: str | None) -> int:
    return 0 if not unpacked_shallow else len(unpacked_shallow.split())


async def test_default_branch_shallow_with_a_clean_config(
    workspaces: Workspaces, git_fixture: GitFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = git_fixture.url(git_fixture.repos.app)
    ws = await prepare_archive(workspaces, {"repo": url}, "work_default")
    assert ws.text("app/README.md") == "app v3\n"
    assert "app/feature.txt" not in ws.contents
    config = ws.text("app/.git/config")
    assert f"url = {url}\n" in config and "[branch \"main\"]" in config
    assert "fetch = +refs/heads/main:refs/remotes/origin/main" in config
    assert "git-mirrors" not in ws.raw.decode("latin-1")  # the daemon's paths do not leak into the sandbox
    assert ws.text("app/.git/HEAD") == "ref: refs/heads/main\n"
    assert ws.text("app/.git/shallow").strip() == git_fixture.repos.app_commits["main"]
    main = git_fixture.repos.app_commits["main"]
    assert f"workspace_repo work_id=work_default url={url} ref=main commit={main} path=app" in caplog.text


async def test_ownership_and_modes_come_from_the_archive(workspaces: Workspaces, git_fixture: GitFixture) -> None:
    ws = await prepare_archive(workspaces, {"repo": git_fixture.url(git_fixture.repos.app) + " ref=v1.0"})
    for info in ws.members.values():
        assert (info.uid, info.gid, info.uname, info.gname) == (10001, 10002, "", "")
        assert info.isdir() or info.isfile() or info.issym(), info.name
        assert not info.mode & 0o7000
        if info.isdir():
            assert info.mode == 0o755
    assert ws.members["app/run.sh"].mode == 0o755
    assert ws.members["app/README.md"].mode == 0o644
    assert ws.members["app/.git/config"].mode == 0o644


@pytest.mark.parametrize(("ref", "expected_key", "readme", "head"), [
    ("feature", "feature", "app v2\n", "ref: refs/heads/feature\n"),
    ("refs/heads/feature", "feature", "app v2\n", "ref: refs/heads/feature\n"),
    ("v1.0", "v1.0", "app v1\n", None),  # lightweight tag: detached
    ("v2.0", "v2.0", "app v2\n", None),  # annotated tag: detached at the tagged commit
    ("first", "first", "app v0\n", None),  # a full commit SHA
    ("refs/pull/1/head", "feature", "app v2\n", None),  # a ref that is neither branch nor tag: detached
])
async def test_refs_of_every_kind(
    workspaces: Workspaces, git_fixture: GitFixture, ref: str, expected_key: str, readme: str, head: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    commits = git_fixture.repos.app_commits
    if ref == "first":
        ref = commits["first"]
    ws = await prepare_archive(workspaces, {"repo": f"{git_fixture.url(git_fixture.repos.app)} ref={ref} path=x"})
    assert ws.text("x/README.md") == readme
    assert ws.text("x/.git/HEAD") == (head or commits[expected_key] + "\n")
    assert f"ref={ref} commit={commits[expected_key]} path=x" in caplog.text
    assert not any(name.startswith("x/.git/refs/sandboxd") for name in ws.members)


async def test_depth_full_and_depth_n(workspaces: Workspaces, git_fixture: GitFixture) -> None:
    url = git_fixture.url(git_fixture.repos.app)
    ws = await prepare_archive(workspaces, {"repo": f"{url} depth=full path=full", "repo.2": f"{url} depth=2 path=two"})
    assert "full/.git/shallow" not in ws.contents
    assert ws.text("two/.git/shallow").strip() != git_fixture.repos.app_commits["main"]  # the boundary is deeper


async def test_submodules_recursively_with_relative_urls(
    workspaces: Workspaces, git_fixture: GitFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = git_fixture.url(git_fixture.repos.super)
    ws = await prepare_archive(workspaces, {"repo": f"{url} submodules=true path=s"})
    assert ws.text("s/super.txt") == "super\n"
    assert ws.text("s/libs/lib/lib.txt") == "lib\n"
    assert ws.text("s/libs/lib/leaf/leaf.txt") == "leaf\n"
    lib_url = git_fixture.url("public/lib.git")
    assert f'[submodule "libs/lib"]\n\turl = {lib_url}\n\tactive = true' in ws.text("s/.git/config")
    assert f"url = {lib_url}\n" in ws.text("s/libs/lib/.git/config")
    assert re.search(rf"workspace_repo .* url={re.escape(lib_url)} ref=[0-9a-f]{{40}} commit=[0-9a-f]{{40}} "
                     r"path=s/libs/lib\n", caplog.text + "\n")
    assert "path=s/libs/lib/leaf" in caplog.text
    plain = await prepare_archive(workspaces, {"repo": f"{url} path=s"})
    assert "s/libs/lib/lib.txt" not in plain.contents and plain.members["s/libs/lib"].isdir()


@contextmanager
def _argv_sampler() -> Iterator[list[str]]:
    """Sample the argv of every git process on the machine while the block runs."""
    seen: list[str] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("latin-1")
                except OSError:
                    continue
                if argv.startswith("git") or "/git" in argv.split(" ")[0]:
                    seen.append(argv)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


async def test_credentials_never_leave_the_fetch(
    workspaces: Workspaces, git_fixture: GitFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = git_fixture.server.token
    basic = base64.b64encode(f"{TOKEN_USER}:{token}".encode()).decode()
    with _argv_sampler() as argvs:
        ws = await prepare_archive(workspaces, {"repo": git_fixture.url(git_fixture.repos.private)})
    assert ws.text("secret/secret.txt") == "private\n"
    assert argvs, "the sampler saw no git process: it cannot vouch for argv"
    for secret in (token, basic):
        assert not any(secret in argv for argv in argvs)
        assert secret not in caplog.text
        assert secret.encode() not in ws.raw
        for path in workspaces.config.state_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
    assert any(r.headers.get("Authorization") == f"Basic {basic}" for r in git_fixture.server.requests)


async def test_a_warm_mirror_fetches_nothing_and_survives_a_restart(
    make_workspaces: Callable[..., Workspaces], git_fixture: GitFixture, own_repo: str, tmp_path: Path
) -> None:
    server = git_fixture.server
    metadata = {"repo": server.url(own_repo) + " path=app"}

    def commands_for(repo: str) -> list[str]:
        return [r.command for r in server.requests if r.path.startswith(f"/{repo}/") and r.command]

    cold = await prepare_archive(make_workspaces(), metadata)
    assert "fetch" in commands_for(own_repo)
    server.requests.clear()
    warm = await prepare_archive(make_workspaces(), metadata)  # a new instance: as after a daemon restart
    assert commands_for(own_repo) == ["ls-refs"]
    assert warm.contents["app/README.md"] == cold.contents["app/README.md"]

    pushed = push_commit(server, own_repo, tmp_path, message="upstream moved")
    server.requests.clear()
    newer = await prepare_archive(make_workspaces(), metadata)
    assert commands_for(own_repo) == ["ls-refs", "fetch"]
    assert newer.text("app/pushed.txt") == "upstream moved\n"
    assert newer.text("app/.git/shallow").strip() == pushed
    assert_mirrors_consistent(make_workspaces().config)


async def test_concurrent_sessions_on_one_repository(
    workspaces: Workspaces, git_fixture: GitFixture
) -> None:
    metadata = {"repo": git_fixture.url(git_fixture.repos.app), "repo.t": git_fixture.url(git_fixture.repos.app)
                + " ref=v2.0 path=t"}
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        ws = await prepare_archive(workspaces, metadata, f"work_{i}")
        results[i] = ws.text("app/README.md") + ws.text("t/README.md")

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    assert set(results.values()) == {"app v3\napp v2\n"}
    assert len(mirror_dirs(workspaces.config)) == 1
    assert_mirrors_consistent(workspaces.config)


async def test_the_mirror_cache_evicts_least_recently_used(
    make_workspaces: Callable[..., Workspaces], git_fixture: GitFixture
) -> None:
    repos = git_fixture.repos
    roomy = make_workspaces()
    await prepare_archive(roomy, {"repo": git_fixture.url(repos.app)})
    app_mirror = roomy.mirrors.path_of(roomy.plan({"repo": git_fixture.url(repos.app)}).repos[0].remote)
    size = int(app_mirror.with_suffix(".size").read_text())
    assert size > 0
    tight = make_workspaces(git_mirror_cache_max_bytes=size + 1)
    tight.mirrors.max_bytes = size + 1
    await prepare_archive(tight, {"repo": git_fixture.url(repos.private)})
    assert not app_mirror.exists()  # the older mirror went; the one just used stays
    assert len(mirror_dirs(tight.config)) == 1
    disabled = make_workspaces(git_mirror_cache_max_bytes=0)
    ws = await prepare_archive(disabled, {"repo": git_fixture.url(repos.app)})
    assert ws.text("app/README.md") == "app v3\n"  # a cache of 0 bytes still serves, then keeps nothing
    assert mirror_dirs(disabled.config) == set()
    assert_mirrors_consistent(disabled.config)


async def test_symlinks_leading_out_of_the_workspace_are_left_out(
    workspaces: Workspaces, git_fixture: GitFixture, caplog: pytest.LogCaptureFixture
) -> None:
    ws = await prepare_archive(workspaces, {"repo": git_fixture.url(git_fixture.repos.escaping_link)})
    assert ws.members["links/good-link"].issym() and ws.members["links/good-link"].linkname == "inside.txt"
    for name in ("evil-link", "evil-relative", "evil-dir"):
        assert f"links/{name}" not in ws.members
        assert f"workspace_symlink_skipped work_id=work_test path=links/{name}" in caplog.text
    assert not any(info.islnk() or info.isdev() for info in ws.members.values())
