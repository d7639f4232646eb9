"""Every kind of bad input fails fast with a clear error and its metric reason, and leaves nothing behind.

Each case runs plan + prepare against real servers on 127.0.0.1 and checks: the WorkspaceError's
reason and message, the time it took, that the staging area is empty, that the mirror cache holds
no new directory (or leftovers) and passes `git fsck`, that no git process outlives the failure, and
that the same Workspaces then serves a good workspace (one bad item never stops the daemon).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandboxd.errors import WorkspaceError
from sandboxd.metrics import WORKSPACE_REASONS
from sandboxd.workspace import Workspaces
from tests.integration.conftest import (
    GitFixture,
    assert_mirrors_consistent,
    assert_nothing_staged,
    mirror_dirs,
    prepare_archive,
)
from tests.integration.git_server import FileServer, StallingServer, closed_port_host

pytestmark = pytest.mark.anyio

TIMEOUT_SECONDS = 2.0


@dataclass
class Ctx:
    git: GitFixture
    files: FileServer
    stall: str
    closed: str
    tmp: Path

    def repo(self, name: str = "app") -> str:
        return self.git.url(getattr(self.git.repos, name))


@dataclass(frozen=True)
class Case:
    metadata: Callable[[Ctx], dict[str, str]]
    reason: str
    says: str  # a fragment of the message
    config: Callable[[Ctx], dict[str, Any]] = field(default=lambda ctx: {})
    slow: bool = False  # bounded by the fetch timeout rather than failing at once
    new_mirrors: int = 0  # mirrors of good repositories the case fetches before failing
    constrained: bool = False  # the case's settings also refuse the good workspace checked afterwards


def _no_token(ctx: Ctx) -> dict[str, Any]:
    return {"git_token_files": {}}


def _wrong_token(ctx: Ctx) -> dict[str, Any]:
    path = ctx.tmp / "wrong-token"
    path.write_text("not-the-token\n")
    return {"git_token_files": {ctx.git.server.host: path}}


def _allow_stall(ctx: Ctx) -> dict[str, Any]:
    return {"git_allowed_hosts": frozenset({ctx.git.server.host, ctx.stall}),
            "file_allowed_hosts": frozenset({ctx.files.host, ctx.stall})}


def _allow_closed(ctx: Ctx) -> dict[str, Any]:
    return {"git_allowed_hosts": frozenset({ctx.git.server.host, ctx.closed}),
            "file_allowed_hosts": frozenset({ctx.files.host, ctx.closed})}


def _big(ctx: Ctx) -> str:
    ctx.files.add("big.bin", b"z" * 5000)
    return "big.bin"


CASES: dict[str, Case] = {
    # target paths
    "absolute_outside": Case(lambda c: {"repo": c.repo() + " path=/etc/cron.d"}, "path_escape", "outside /workspace"),
    "dot_dot": Case(lambda c: {"file": c.files.url("x") + " path=data/../../x"}, "path_escape", "'..'"),
    "symlink_out_absolute": Case(
        lambda c: {"repo": c.repo("escaping_link"), "file": c.files.url("x") + " path=links/evil-dir/x"},
        "path_escape", "crosses a symlink", new_mirrors=1),
    "symlink_out_relative": Case(
        lambda c: {"repo": c.repo("escaping_link"), "file": c.files.url("x") + " path=links/evil-relative/x"},
        "path_escape", "crosses a symlink", new_mirrors=1),
    # schemes and transports
    "file_scheme": Case(lambda c: {"repo": (c.git.server.root / "public/app.git").as_uri()}, "scheme_not_allowed",
                        "file:// git URLs"),
    "ext_transport": Case(lambda c: {"repo": "ext::sh -c touch% /tmp/sandboxd-pwned"}, "scheme_not_allowed",
                          "transport helpers"),
    "local_path": Case(lambda c: {"repo": str(c.git.server.root / "public/app.git")}, "scheme_not_allowed",
                       "local paths"),
    "git_protocol": Case(lambda c: {"repo": f"git://{c.git.server.host}/public/app.git"}, "scheme_not_allowed",
                         "git:// git URLs"),
    "file_url_scheme": Case(lambda c: {"file": "file:///etc/passwd"}, "scheme_not_allowed", "only https"),
    # option injection
    "url_option": Case(lambda c: {"repo": "--upload-pack=touch /tmp/sandboxd-pwned"}, "option_injection",
                       "may not start with '-'"),
    "ref_option": Case(lambda c: {"repo": c.repo() + " ref=--upload-pack=touch"}, "option_injection",
                       "a ref may not start with '-'"),
    # allow-lists
    "git_host": Case(lambda c: {"repo": c.repo().replace("127.0.0.1", "localhost")}, "host_not_allowed",
                     "not on the allow-list"),
    "file_host": Case(lambda c: {"file": c.files.url("x").replace("127.0.0.1", "localhost")}, "host_not_allowed",
                      "not on the allow-list"),
    "submodule_host": Case(lambda c: {"repo": c.repo("bad_sub") + " submodules=true"}, "host_not_allowed",
                           "submodule lib of", new_mirrors=1),
    "redirect_host": Case(lambda c: {"file": c.files.url("redirect/x?to=http://localhost/y") + " path=y"},
                          "host_not_allowed", "(redirect)"),
    # refs and repositories that do not exist
    "missing_branch": Case(lambda c: {"repo": c.repo() + " ref=no-such-branch"}, "ref_not_found",
                           "no branch or tag 'no-such-branch'"),
    "missing_commit": Case(lambda c: {"repo": c.repo() + " ref=" + "0" * 39 + "1"}, "ref_not_found",
                           "not our ref"),
    "missing_repo": Case(lambda c: {"repo": c.git.url("public/nope.git")}, "not_found", "not found"),
    "missing_file": Case(lambda c: {"file": c.files.url("nope.txt")}, "not_found", "404"),
    "missing_file_id": Case(lambda c: {"file": "file_nope"}, "not_found", "no such file"),
    # sizes and digests
    "file_over_cap": Case(lambda c: {"file": c.files.url(_big(c))}, "too_large", "file_max_bytes=4096",
                          lambda c: {"file_max_bytes": 4096}),
    "unsized_over_cap": Case(lambda c: {"file": c.files.url("unsized/" + _big(c))}, "too_large",
                             "file_max_bytes=4096", lambda c: {"file_max_bytes": 4096}),
    "workspace_over_cap": Case(
        lambda c: {"file": c.files.url(_big(c)) + " path=a", "file.2": c.files.url("big.bin") + " path=b"},
        "too_large", "workspace_max_bytes", lambda c: {"workspace_max_bytes": 8000}),
    "repo_over_workspace_cap": Case(lambda c: {"repo": c.repo()}, "too_large", "workspace_max_bytes=100",
                                    lambda c: {"workspace_max_bytes": 100}, constrained=True),
    "digest_mismatch": Case(lambda c: {"file": c.files.url("x") + " sha256=" + "0" * 64}, "digest_mismatch",
                            "sha256 is"),
    # credentials
    "no_token": Case(lambda c: {"repo": c.repo("private")}, "auth_failed", "private/secret.git", _no_token),
    "wrong_token": Case(lambda c: {"repo": c.repo("private")}, "auth_failed", "private/secret.git", _wrong_token),
    "wrong_api_key": Case(lambda c: {"file": "file_abc"}, "auth_failed", "api_key", lambda c: {"api_key": "sk-x"}),
    "same_name_twice": Case(lambda c: {"file": "file_abc", "file.2": "file_abc2"}, "invalid_metadata",
                            "already targets"),
    # servers that do not answer
    "git_unreachable": Case(lambda c: {"repo": f"http://{c.closed}/r.git"}, "unreachable", "connect",
                            _allow_closed),
    "file_unreachable": Case(lambda c: {"file": f"http://{c.closed}/f"}, "unreachable", "cannot connect",
                             _allow_closed),
    "git_stalls": Case(lambda c: {"repo": f"http://{c.stall}/r.git"}, "timed_out", "fetch_timeout_seconds=2",
                       _allow_stall, slow=True),
    "file_stalls": Case(lambda c: {"file": c.files.url("stall/f")}, "timed_out", "fetch_timeout_seconds=2",
                        slow=True),
}


@pytest.fixture
def ctx(git_fixture: GitFixture, file_server: FileServer, tmp_path: Path) -> Iterator[Ctx]:
    file_server.add("x", b"x\n")
    file_server.api_files["file_abc"] = ("same.txt", b"1")
    file_server.api_files["file_abc2"] = ("same.txt", b"2")
    with StallingServer() as stall:
        yield Ctx(git_fixture, file_server, stall.host, closed_port_host(), tmp_path)


def _git_processes_for(host: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("latin-1")
        except OSError:
            continue
        if host in argv:
            found.append(argv)
    return found


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_input_fails_cleanly(name: str, ctx: Ctx, make_workspaces: Callable[..., Workspaces]) -> None:
    case = CASES[name]
    workspaces = make_workspaces(fetch_timeout_seconds=TIMEOUT_SECONDS, **case.config(ctx))
    plain = make_workspaces(fetch_timeout_seconds=TIMEOUT_SECONDS)  # same state_dir, default limits
    await prepare_archive(plain, {"repo": ctx.repo()}, "work_warmup")  # a mirror that must survive intact
    before = mirror_dirs(workspaces.config)
    began = time.monotonic()
    with pytest.raises(WorkspaceError) as caught:
        plan = workspaces.plan(case.metadata(ctx))
        async with workspaces.prepare(plan, "work_bad"):
            pytest.fail("prepare yielded for bad input")
    took = time.monotonic() - began
    error = caught.value
    assert error.reason == case.reason, str(error)
    assert error.reason in WORKSPACE_REASONS
    assert case.says in str(error)
    assert took < (TIMEOUT_SECONDS + 3 if case.slow else 1.5 * TIMEOUT_SECONDS), took
    assert_nothing_staged(workspaces.config)
    after = mirror_dirs(workspaces.config)
    assert before <= after and len(after - before) == case.new_mirrors, (before, after)
    assert_mirrors_consistent(workspaces.config)
    assert _git_processes_for(ctx.stall) == [] and _git_processes_for(ctx.closed) == []
    ws = await prepare_archive(plain if case.constrained else workspaces, {"repo": ctx.repo() + " path=again"},
                               "work_after")
    assert ws.text("again/README.md") == "app v3\n"


async def test_secrets_never_reach_error_messages(
    ctx: Ctx, make_workspaces: Callable[..., Workspaces], caplog: pytest.LogCaptureFixture
) -> None:
    token = ctx.git.server.token
    workspaces = make_workspaces(fetch_timeout_seconds=TIMEOUT_SECONDS)
    with pytest.raises(WorkspaceError) as caught:
        async with workspaces.prepare(workspaces.plan({"repo": ctx.git.url("private/missing.git")}), "work_x"):
            pass
    assert caught.value.reason in ("not_found", "fetch_failed")
    assert token not in str(caught.value) and token not in caplog.text


async def test_cancelling_a_fetch_leaves_nothing_behind(ctx: Ctx, make_workspaces: Callable[..., Workspaces]) -> None:
    """Daemon shutdown in the middle of a fetch: git is killed, the staging dir and the new mirror removed."""
    workspaces = make_workspaces(fetch_timeout_seconds=60, **_allow_stall(ctx))
    plan = workspaces.plan({"repo": ctx.repo(), "repo.2": f"http://{ctx.stall}/r.git"})
    with anyio.move_on_after(1.5) as scope:
        async with workspaces.prepare(plan, "work_cancelled"):
            pytest.fail("prepare yielded although a server never answered")
    assert scope.cancelled_caught
    assert_nothing_staged(workspaces.config)
    assert_mirrors_consistent(workspaces.config)
    assert _git_processes_for(ctx.stall) == []
