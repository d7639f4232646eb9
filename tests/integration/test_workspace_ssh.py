"""Git over ssh against a real sshd on 127.0.0.1: key and known_hosts from the settings, never elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType

import pytest

from sandboxd.errors import WorkspaceError
from sandboxd.workspace import Workspaces
from tests.integration.conftest import GitFixture, assert_nothing_staged, prepare_archive
from tests.integration.ssh_server import SshServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def ssh_workspaces(make_workspaces: Callable[..., Workspaces], ssh_server: SshServer) -> Workspaces:
    return make_workspaces(
        git_allowed_hosts=frozenset({ssh_server.host}),
        git_ssh_key_files=MappingProxyType({ssh_server.host: ssh_server.client_key}),
        git_ssh_known_hosts_file=ssh_server.known_hosts,
    )


def _repo(git_fixture: GitFixture, name: str) -> Path:
    return git_fixture.server.root / name


async def test_clone_over_ssh_with_the_configured_key(
    ssh_workspaces: Workspaces, ssh_server: SshServer, git_fixture: GitFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    url = ssh_server.url(_repo(git_fixture, git_fixture.repos.app))
    tree = await prepare_archive(ssh_workspaces, {"repo": f"{url} ref=v1.0 path=app"})

    assert tree.text("app/README.md") == "app v1\n"
    config = tree.text("app/.git/config")
    assert url in config, "origin is the ssh URL"
    assert str(ssh_server.client_key) not in config and "sshCommand" not in config
    private_key = ssh_server.client_key.read_text()
    assert private_key not in tree.raw.decode("latin-1")
    assert f"commit={git_fixture.repos.app_commits['v1.0']}" in caplog.text
    assert_nothing_staged(ssh_workspaces.config)


async def test_unknown_host_key_is_refused(
    make_workspaces: Callable[..., Workspaces], ssh_server: SshServer, git_fixture: GitFixture, tmp_path: Path
) -> None:
    other = tmp_path / "known_hosts"
    other.write_text(f"[127.0.0.1]:{ssh_server.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    workspaces = make_workspaces(
        git_allowed_hosts=frozenset({ssh_server.host}),
        git_ssh_key_files=MappingProxyType({ssh_server.host: ssh_server.client_key}),
        git_ssh_known_hosts_file=other,
    )
    url = ssh_server.url(_repo(git_fixture, git_fixture.repos.app))
    with pytest.raises(WorkspaceError) as caught:
        await prepare_archive(workspaces, {"repo": url})
    assert caught.value.reason == "auth_failed"
    assert "Host key verification failed" in str(caught.value)
    assert_nothing_staged(workspaces.config)


async def test_without_the_key_access_is_denied(
    make_workspaces: Callable[..., Workspaces], ssh_server: SshServer, git_fixture: GitFixture
) -> None:
    workspaces = make_workspaces(git_allowed_hosts=frozenset({ssh_server.host}),
                                 git_ssh_known_hosts_file=ssh_server.known_hosts)
    with pytest.raises(WorkspaceError) as caught:
        await prepare_archive(workspaces, {"repo": ssh_server.url(_repo(git_fixture, git_fixture.repos.app))})
    assert caught.value.reason == "auth_failed"
    assert "Permission denied" in str(caught.value)
    assert_nothing_staged(workspaces.config)
