"""The session metadata schema, URL rules, settings mapping and the pure helpers of sandboxd.workspace.

No network and no disk: everything here is what `Workspaces.plan` decides before a container starts.
"""

from __future__ import annotations

import base64
import shlex
from pathlib import Path, PurePosixPath

import pytest

from sandboxd.errors import WorkspaceError
from sandboxd.metrics import WORKSPACE_REASONS
from sandboxd.settings import Settings
from sandboxd.workspace import WorkspaceConfig, Workspaces
from sandboxd.workspace.archive import symlink_stays_inside
from sandboxd.workspace.gitcmd import Credentials, GitFailed, local_env
from sandboxd.workspace.schema import parse_metadata
from sandboxd.workspace.urls import host_allowed, parse_remote

CONFIG = WorkspaceConfig(
    git_allowed_hosts=frozenset({"github.com", "git.internal:8443"}),
    file_allowed_hosts=frozenset({"data.example.com"}),
    api_key="sk-ant-test",
)
SHA = "0123456789abcdef0123456789abcdef01234567"


def plan(metadata: dict[str, str], config: WorkspaceConfig = CONFIG):  # type: ignore[no-untyped-def]
    return parse_metadata(metadata, config)


def rejected(metadata: dict[str, str], config: WorkspaceConfig = CONFIG) -> WorkspaceError:
    with pytest.raises(WorkspaceError) as caught:
        parse_metadata(metadata, config)
    assert caught.value.reason in WORKSPACE_REASONS
    return caught.value


def test_unrelated_keys_and_no_keys_give_an_empty_plan() -> None:
    assert Workspaces(CONFIG).plan({}).empty
    assert plan({"owner": "me", "Repo": "x", "repository": "y", "file_count": "3", "ticket": "ABC-1"}).empty


def test_a_single_repo_url_clones_the_default_branch_shallow_into_its_name() -> None:
    (repo,) = plan({"repo": "https://github.com/org/app.git"}).repos
    assert repo.remote.url == "https://github.com/org/app.git"
    assert (repo.ref, repo.target, repo.depth, repo.submodules) == (None, PurePosixPath("app"), 1, False)


def test_every_repo_option() -> None:
    (repo,) = plan({"repo.api": "https://github.com/org/api ref=v1.2 path=/workspace/src/api/ depth=full "
                                 "submodules=true"}).repos
    assert (repo.key, repo.ref, repo.target, repo.depth, repo.submodules) == (
        "repo.api", "v1.2", PurePosixPath("src/api"), None, True)
    (repo,) = plan({"repo": f"https://github.com/org/api ref={SHA.upper()} depth=50"}).repos
    assert repo.ref == SHA and repo.ref_is_commit and repo.depth == 50


def test_several_entries_are_planned_in_key_order() -> None:
    result = plan({
        "repo.b": "https://github.com/org/b", "repo": "https://github.com/org/a",
        "file.x": f"https://data.example.com/d/x.csv?sig=abc sha256={'A' * 64}",
        "file": "file_011CNha8iCJcU1wXNR6q4V8w path=inputs/report.pdf",
    })
    assert [r.key for r in result.repos] == ["repo", "repo.b"]
    first, second = result.files
    assert (first.file_id, first.target) == ("file_011CNha8iCJcU1wXNR6q4V8w", PurePosixPath("inputs/report.pdf"))
    assert (second.target, second.sha256) == (PurePosixPath("x.csv"), "a" * 64)
    assert second.source == "https://data.example.com/d/x.csv?…"  # a query may carry a signature: never logged


def test_a_file_id_without_path_is_named_when_fetched() -> None:
    (spec,) = plan({"file": "file_abc"}).files
    assert spec.target is None and spec.source == "file_abc"


@pytest.mark.parametrize(("value", "reason"), [
    ("https://github.com/org/app path=/etc/app", "path_escape"),
    ("https://github.com/org/app path=/workspace/../etc", "path_escape"),
    ("https://github.com/org/app path=a/../../b", "path_escape"),
    ("https://github.com/org/app path=..", "path_escape"),
    ("https://github.com/org/app path=/workspace", "invalid_metadata"),
    ("https://github.com/org/app path=./", "invalid_metadata"),
    ("https://github.com/org/app path=src/.git/hooks", "invalid_metadata"),
    ("https://github.com/org/app path=skills/x", "invalid_metadata"),
    ("https://github.com/org/app path=/workspace/skills", "invalid_metadata"),
    ("https://github.com/org/app path=" + "x" * 256, "invalid_metadata"),
])
def test_target_paths_stay_below_the_workspace(value: str, reason: str) -> None:
    assert rejected({"repo": value}).reason == reason


@pytest.mark.parametrize(("url", "reason"), [
    ("file:///srv/git/app.git", "scheme_not_allowed"),
    ("FILE:///srv/git/app.git", "scheme_not_allowed"),
    ("git://github.com/org/app.git", "scheme_not_allowed"),
    ("ext::sh -c touch% /tmp/pwned", "scheme_not_allowed"),
    ("fd::17", "scheme_not_allowed"),
    ("/srv/git/app.git", "scheme_not_allowed"),
    ("./app.git", "scheme_not_allowed"),
    ("~/app.git", "scheme_not_allowed"),
    ("http://github.com/org/app.git", "scheme_not_allowed"),
    ("ssh://git@github.com/org/app.git", "scheme_not_allowed"),  # no known_hosts configured
    ("git@github.com:org/app.git", "scheme_not_allowed"),
    ("ftp://github.com/org/app.git", "scheme_not_allowed"),
    ("-uhttps://github.com/org/app", "option_injection"),
    ("--upload-pack=touch /tmp/pwned", "option_injection"),
    ("https://gitlab.com/org/app.git", "host_not_allowed"),
    ("https://github.com.evil.com/org/app.git", "host_not_allowed"),
    ("https://git.internal/org/app.git", "host_not_allowed"),  # only port 8443 is allowed
    ("https://git.internal:9999/org/app.git", "host_not_allowed"),
    ("https://user:pw@github.com/org/app.git", "invalid_metadata"),
    ("https://ghp_token@github.com/org/app.git", "invalid_metadata"),
    ("https://github.com/org/app.git?x=1", "invalid_metadata"),
    ("https://github.com/", "invalid_metadata"),
    ("https://github.com:notaport/org/app", "invalid_metadata"),
])
def test_git_urls_that_are_refused(url: str, reason: str) -> None:
    error = rejected({"repo": url})
    assert error.reason == reason
    assert "'repo'" in str(error)


def test_ssh_urls_need_a_known_hosts_file_and_refuse_option_injection() -> None:
    config = WorkspaceConfig(git_allowed_hosts=frozenset({"github.com"}), git_ssh_known_hosts_file=Path("/kh"))
    (repo,) = plan({"repo": "git@github.com:org/app.git"}, config).repos
    assert (repo.remote.scheme, repo.remote.host, repo.remote.user, repo.target) == (
        "ssh", "github.com", "git", PurePosixPath("app"))
    assert plan({"repo": "ssh://git@github.com:22/org/app.git"}, config).repos[0].remote.port == 22
    assert rejected({"repo": "ssh://-oProxyCommand=touch%20x/org/app"}, config).reason == "option_injection"
    assert rejected({"repo": "-oProxyCommand=x@github.com:org/app"}, config).reason == "option_injection"
    assert rejected({"repo": "ssh://-oProxyCommand=x@github.com/org/app"}, config).reason == "option_injection"


def test_http_is_allowed_only_when_insecure_http_is_on() -> None:
    config = WorkspaceConfig(git_allowed_hosts=frozenset({"127.0.0.1"}), allow_insecure_http=True)
    assert plan({"repo": "http://127.0.0.1:8080/r.git"}, config).repos[0].remote.port == 8080


@pytest.mark.parametrize(("options", "reason"), [
    ("ref=-x", "option_injection"),
    ("ref=--upload-pack=touch", "option_injection"),
    ("ref=a..b", "invalid_metadata"),
    ("ref=main.lock", "invalid_metadata"),
    ("ref=feature/", "invalid_metadata"),
    ("ref=.hidden", "invalid_metadata"),
    ("ref=a@{1}", "invalid_metadata"),
    ("ref=a:b", "invalid_metadata"),
    ("depth=0", "invalid_metadata"),
    ("depth=shallow", "invalid_metadata"),
    ("submodules=yes", "invalid_metadata"),
    ("branch=main", "invalid_metadata"),
    ("ref=a ref=b", "invalid_metadata"),
    ("ref=", "invalid_metadata"),
    ("main", "invalid_metadata"),
])
def test_malformed_repo_options(options: str, reason: str) -> None:
    assert rejected({"repo": f"https://github.com/org/app {options}"}).reason == reason


@pytest.mark.parametrize(("metadata", "reason"), [
    ({"repo.": "https://github.com/org/app"}, "invalid_metadata"),
    ({"repo.a.b": "https://github.com/org/app"}, "invalid_metadata"),
    ({"file.-x": "file_abc"}, "invalid_metadata"),
    ({"repo": "   "}, "invalid_metadata"),
    ({"file": "report.pdf"}, "invalid_metadata"),
    ({"file": "-file_abc"}, "option_injection"),
    ({"file": "https://data.example.com/x sha256=abc"}, "invalid_metadata"),
    ({"file": "https://data.example.com/dir/"}, "invalid_metadata"),
    ({"file": "https://data.example.com/x checksum=1"}, "invalid_metadata"),
    ({"file": "http://data.example.com/x"}, "scheme_not_allowed"),
    ({"file": "file:///etc/passwd"}, "scheme_not_allowed"),
    ({"file": "https://other.example.com/x"}, "host_not_allowed"),
    ({"file": "https://u:p@data.example.com/x"}, "invalid_metadata"),
    ({"file": "https://data.example.com/x path=/etc/x"}, "path_escape"),
    ({"file": "file_abc path=../x"}, "path_escape"),
])
def test_malformed_keys_and_file_entries(metadata: dict[str, str], reason: str) -> None:
    assert rejected(metadata).reason == reason


def test_files_api_entries_need_an_api_key() -> None:
    error = rejected({"file": "file_abc"}, WorkspaceConfig())
    assert error.reason == "auth_failed" and "api_key" in str(error)


@pytest.mark.parametrize("metadata", [
    {"repo": "https://github.com/org/app", "repo.2": "https://github.com/other/app"},  # both default to app/
    {"repo": "https://github.com/org/app path=src", "repo.2": "https://github.com/org/lib path=src/lib"},
    {"file": "https://data.example.com/x path=a", "file.2": "https://data.example.com/y path=a"},
    {"file": "https://data.example.com/x path=a", "file.2": "https://data.example.com/y path=a/b"},
    {"file": "https://data.example.com/x path=app", "repo": "https://github.com/org/app"},
    {"file": "https://data.example.com/x path=src", "repo": "https://github.com/org/app path=src/app"},
])
def test_overlapping_targets_are_refused(metadata: dict[str, str]) -> None:
    error = rejected(metadata)
    assert error.reason == "invalid_metadata" and "overlapping" in str(error)


def test_a_file_may_be_placed_inside_a_repository() -> None:
    result = plan({"repo": "https://github.com/org/app",
                   "file": "https://data.example.com/x.json path=app/conf/x.json"})
    assert result.files[0].target == PurePosixPath("app/conf/x.json")


def test_submodule_urls_resolve_relative_to_their_superproject() -> None:
    remote = parse_remote("https://github.com/org/super.git", allowed=CONFIG.git_allowed_hosts, allow_http=False,
                          allow_ssh=False, what="t")
    assert remote.join("../lib.git") == "https://github.com/org/lib.git"
    assert remote.join("./sub") == "https://github.com/org/super.git/sub"
    assert remote.join("../../other/lib") == "https://github.com/other/lib"
    with pytest.raises(WorkspaceError) as caught:
        remote.join("../../../../x")
    assert caught.value.reason == "path_escape"
    scp = parse_remote("git@github.com:org/super.git", allowed=CONFIG.git_allowed_hosts, allow_http=False,
                       allow_ssh=True, what="t")
    assert scp.join("../lib.git") == "git@github.com:org/lib.git"


def test_one_repository_has_one_cache_key_whatever_its_spelling() -> None:
    def key(url: str) -> str:
        return parse_remote(url, allowed=frozenset({"github.com"}), allow_http=True, allow_ssh=True,
                            what="t").cache_key

    assert key("https://github.com/org/app.git") == key("https://GitHub.com/org/app/") == key(
        "https://github.com/org/app")
    assert key("https://github.com/org/app") != key("https://github.com/org/app2")
    assert key("https://github.com/org/app") != key("http://github.com/org/app")


def test_host_allow_list_entries() -> None:
    allowed = frozenset({"github.com", "git.internal:8443"})
    assert host_allowed(allowed, "github.com", None) and host_allowed(allowed, "github.com", 443)
    assert host_allowed(allowed, "git.internal", 8443)
    assert not host_allowed(allowed, "git.internal", None) and not host_allowed(allowed, "evil.com", None)


def test_config_from_settings() -> None:
    settings = Settings(
        sandbox_user="1000:2000", git_allowed_hosts=["GitHub.com ", "git.internal:8443"],
        git_token_files={"GitHub.com": Path("/run/secrets/gh")}, state_dir=Path("/srv/sandboxd"),
        api_key="sk-ant-secret-value", fetch_timeout_seconds=12,
    )
    config = WorkspaceConfig.from_settings(settings)
    assert (config.sandbox_uid, config.sandbox_gid) == (1000, 2000)
    assert config.git_allowed_hosts == frozenset({"github.com", "git.internal:8443"})
    assert config.git_token_files == {"github.com": Path("/run/secrets/gh")}
    assert config.api_key == "sk-ant-secret-value" and "sk-ant-secret-value" not in repr(config)
    assert config.mirror_dir == Path("/srv/sandboxd/git-mirrors") and config.fetch_timeout_seconds == 12


@pytest.mark.parametrize(("stderr", "reason"), [
    ("fatal: could not read Username for 'https://github.com': terminal prompts disabled", "auth_failed"),
    ("remote: Invalid username or password.\nfatal: Authentication failed for 'https://x/'", "auth_failed"),
    ("Host key verification failed.\nfatal: Could not read from remote repository.", "auth_failed"),
    ("fatal: unable to access 'https://x/': Could not resolve host: x", "unreachable"),
    ("fatal: unable to access 'http://127.0.0.1:1/': Failed to connect to 127.0.0.1 port 1", "unreachable"),
    ("fatal: couldn't find remote ref refs/heads/nope", "ref_not_found"),
    ("fatal: remote error: upload-pack: not our ref 0000", "ref_not_found"),
    ("fatal: repository 'http://h/x.git/' not found", "not_found"),
    ("fatal: protocol error: bad pack header", "fetch_failed"),
])
def test_git_errors_are_classified(stderr: str, reason: str) -> None:
    failed = GitFailed(["git", "fetch"], 128, stderr)
    assert failed.reason() == reason
    error = failed.as_workspace_error("repository x")
    assert error.reason == reason and str(error).startswith("repository x: ")
    assert "fatal:" not in str(error)


@pytest.mark.parametrize(("member", "target", "inside"), [
    ("a/link", "b", True), ("a/link", "../b", True), ("a/link", "../../b", False), ("link", "/workspace/x", True),
    ("link", "/etc/passwd", False), ("a/b/link", "../../..", False), ("link", "/workspace/../etc", False),
    ("link", ".", True),
])
def test_symlinks_must_stay_inside_the_workspace(member: str, target: str, inside: bool) -> None:
    assert symlink_stays_inside(member, target) is inside


@pytest.mark.anyio
async def test_git_credentials_live_in_the_environment_only(tmp_path: Path) -> None:
    token_file = tmp_path / "gitlab-token"
    token_file.write_text("oauth2:glpat-secret\n")
    config = WorkspaceConfig(
        git_allowed_hosts=frozenset({"gitlab.com", "github.com"}), git_token_files={"gitlab.com": token_file},
        git_ssh_key_files={"github.com": tmp_path / "id ed25519"}, git_ssh_known_hosts_file=tmp_path / "known_hosts",
    )
    credentials = Credentials(config)
    https = parse_remote("https://gitlab.com/org/app.git", allowed=config.git_allowed_hosts, allow_http=False,
                         allow_ssh=True, what="t")
    env = await credentials.remote_env(https, tmp_path, timeout_seconds=30)
    pairs = {env.env[f"GIT_CONFIG_KEY_{i}"]: env.env[f"GIT_CONFIG_VALUE_{i}"]
             for i in range(int(env.env["GIT_CONFIG_COUNT"]))}
    header = base64.b64encode(b"oauth2:glpat-secret").decode()
    assert pairs["http.https://gitlab.com/.extraHeader"] == f"Authorization: Basic {header}"
    assert pairs["core.hooksPath"] == "/dev/null" and pairs["http.followRedirects"] == "false"
    assert env.env["GIT_ALLOW_PROTOCOL"] == "https:ssh" and env.env["GIT_TERMINAL_PROMPT"] == "0"
    assert "glpat-secret" in env.secrets and "glpat-secret" not in repr(env)
    ssh = parse_remote("git@github.com:org/app.git", allowed=config.git_allowed_hosts, allow_http=False,
                       allow_ssh=True, what="t")
    ssh_env = await credentials.remote_env(ssh, tmp_path, timeout_seconds=30)
    command = shlex.split(ssh_env.env["GIT_SSH_COMMAND"])
    assert command[command.index("-i") + 1] == str(tmp_path / "id ed25519")
    assert "StrictHostKeyChecking=yes" in command and f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in command
    assert "BatchMode=yes" in command and "IdentitiesOnly=yes" in command
    assert not any(k.startswith("GIT_CONFIG_KEY") and "extraHeader" in v for k, v in ssh_env.env.items())
    assert local_env(tmp_path).env["GIT_ALLOW_PROTOCOL"] == "file"


@pytest.mark.anyio
@pytest.mark.parametrize("content", ["", "\n", "a\nb\n", "user:\n"])
async def test_unusable_token_files_fail_with_auth_failed(tmp_path: Path, content: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(content)
    config = WorkspaceConfig(git_allowed_hosts=frozenset({"github.com"}), git_token_files={"github.com": token_file})
    remote = parse_remote("https://github.com/o/r", allowed=config.git_allowed_hosts, allow_http=False,
                          allow_ssh=False, what="t")
    with pytest.raises(WorkspaceError) as caught:
        await Credentials(config).remote_env(remote, tmp_path, timeout_seconds=5)
    assert caught.value.reason == "auth_failed" and "github.com" in str(caught.value)
