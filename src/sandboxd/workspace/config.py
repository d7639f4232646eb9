"""The workspace module's narrow view of the settings, built once by the CLI.

Everything the fetchers need and nothing else: allow-lists, credential file paths (never the
secrets themselves, which are read at use so a rotated token needs no restart), limits, and
where the staging area and the git mirror cache live.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings


def _hosts(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip().lower() for v in values if v.strip())


def _paths(values: Mapping[str, Path]) -> Mapping[str, Path]:
    return MappingProxyType({k.strip().lower(): Path(v) for k, v in values.items()})


@dataclass(frozen=True)
class WorkspaceConfig:
    """Limits, allow-lists and credential locations for preparing workspaces."""

    state_dir: Path = Path("/var/lib/sandboxd")
    sandbox_uid: int = 10001
    sandbox_gid: int = 10001
    git_allowed_hosts: frozenset[str] = frozenset({"github.com", "gitlab.com", "bitbucket.org"})
    file_allowed_hosts: frozenset[str] = frozenset()
    git_token_files: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    git_ssh_key_files: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    git_ssh_known_hosts_file: Path | None = None
    fetch_timeout_seconds: float = 300.0
    git_mirror_cache_max_bytes: int = 10 * 2**30
    file_max_bytes: int = 100 * 2**20
    workspace_max_bytes: int = 2 * 2**30
    allow_insecure_http: bool = False
    base_url: str = "https://api.anthropic.com"
    api_key: str | None = field(default=None, repr=False)  # Files API downloads only

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkspaceConfig:
        uid, gid = (int(part) for part in settings.sandbox_user.split(":"))
        return cls(
            state_dir=settings.state_dir,
            sandbox_uid=uid,
            sandbox_gid=gid,
            git_allowed_hosts=_hosts(settings.git_allowed_hosts),
            file_allowed_hosts=_hosts(settings.file_allowed_hosts),
            git_token_files=_paths(settings.git_token_files),
            git_ssh_key_files=_paths(settings.git_ssh_key_files),
            git_ssh_known_hosts_file=settings.git_ssh_known_hosts_file,
            fetch_timeout_seconds=settings.fetch_timeout_seconds,
            git_mirror_cache_max_bytes=settings.git_mirror_cache_max_bytes,
            file_max_bytes=settings.file_max_bytes,
            workspace_max_bytes=settings.workspace_max_bytes,
            allow_insecure_http=settings.allow_insecure_http,
            base_url=settings.base_url,
            api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        )

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    @property
    def mirror_dir(self) -> Path:
        return self.state_dir / "git-mirrors"

    @property
    def allow_ssh(self) -> bool:
        """ssh needs a known_hosts file: host keys are always checked strictly."""
        return self.git_ssh_known_hosts_file is not None
