"""Fixtures of the integration suite."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from sandboxd.workspace import WorkspaceConfig, Workspaces
from tests.integration.git_server import FileServer, FixtureRepos, GitHttpServer, build_fixture_repos, git

# --- workspace: git and file servers on 127.0.0.1 (issue 3) -----------------------------------


@dataclass(frozen=True)
class GitFixture:
    """A running smart-HTTP git server and the repositories on it."""

    server: GitHttpServer
    repos: FixtureRepos

    def url(self, repo: str) -> str:
        return self.server.url(repo)


@pytest.fixture(scope="session")
def git_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitFixture]:
    """Session-wide git server with the fixture repositories. Tests must not change them: use
    `own_repo` for a repository a test pushes to."""
    root = tmp_path_factory.mktemp("git-root")
    with GitHttpServer(root) as server:
        repos = build_fixture_repos(server, tmp_path_factory.mktemp("git-scratch"))
        yield GitFixture(server, repos)


@pytest.fixture
def own_repo(git_fixture: GitFixture, request: pytest.FixtureRequest) -> str:
    """A private copy of the `app` fixture repository on the server, for tests that push to it."""
    import shutil

    name = f"public/own-{request.node.name.replace('[', '-').replace(']', '')}.git"
    target = git_fixture.server.root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(git_fixture.server.root / git_fixture.repos.app, target)
    return name


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """A fresh file server (static files, stalls, redirects, the Files API routes)."""
    with FileServer(stall_seconds=10) as server:
        yield server


@pytest.fixture
def workspace_config(tmp_path: Path, git_fixture: GitFixture, file_server: FileServer) -> WorkspaceConfig:
    """A config allowing both servers (plain http), with the git server's token for its host."""
    token_file = tmp_path / "git-token"
    token_file.write_text(git_fixture.server.token + "\n")
    return WorkspaceConfig(
        state_dir=tmp_path / "state",
        sandbox_uid=10001,
        sandbox_gid=10002,
        git_allowed_hosts=frozenset({git_fixture.server.host}),
        file_allowed_hosts=frozenset({file_server.host}),
        git_token_files=MappingProxyType({git_fixture.server.host: token_file}),
        fetch_timeout_seconds=20,
        allow_insecure_http=True,
        base_url=file_server.url("").rstrip("/"),
        api_key=file_server.api_key,
    )


@pytest.fixture
def make_workspaces(workspace_config: WorkspaceConfig) -> Callable[..., Workspaces]:
    """`make_workspaces(**overrides)`: Workspaces over `workspace_config` with fields replaced."""

    def make(**overrides: Any) -> Workspaces:
        return Workspaces(replace(workspace_config, **overrides))

    return make


@pytest.fixture
def workspaces(make_workspaces: Callable[..., Workspaces]) -> Workspaces:
    return make_workspaces()


@dataclass
class Unpacked:
    """A prepared workspace archive, read back: members by name and the raw bytes."""

    raw: bytes
    members: dict[str, tarfile.TarInfo]
    contents: dict[str, bytes]

    def text(self, name: str) -> str:
        return self.contents[name].decode()


async def prepare_archive(workspaces: Workspaces, metadata: dict[str, str], work_id: str = "work_test") -> Unpacked:
    """Plan and prepare `metadata`, and read the archive back (asserting the staging dir is gone)."""
    plan = workspaces.plan(metadata)
    async with workspaces.prepare(plan, work_id) as archive:
        assert archive is not None
        raw = archive.read()
    assert not (workspaces.config.staging_dir / work_id).exists()
    members, contents = {}, {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for info in tar.getmembers():
            members[info.name] = info
            if info.isfile():
                handle = tar.extractfile(info)
                assert handle is not None
                contents[info.name] = handle.read()
    return Unpacked(raw, members, contents)


def assert_nothing_staged(config: WorkspaceConfig) -> None:
    staging = config.staging_dir
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())


def mirror_dirs(config: WorkspaceConfig) -> set[str]:
    """Every directory in the mirror cache (mirrors and any leftovers), as host/name."""
    root = config.mirror_dir
    return {f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if p.is_dir()} if root.exists() else set()


def assert_mirrors_consistent(config: WorkspaceConfig) -> None:
    """No temporary or half-evicted directory, and every mirror passes `git fsck`."""
    for name in mirror_dirs(config):
        assert name.endswith(".git"), f"leftover {name} in the mirror cache"
        git("fsck", "--no-progress", cwd=config.mirror_dir / name)
