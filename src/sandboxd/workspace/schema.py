"""The session metadata schema: `repo[.<label>]` and `file[.<label>]` keys, parsed into a plan.

Session metadata is at most 16 string pairs (keys up to 64 characters, values up to 512), so each
entry is one key whose value is a source followed by space-separated `name=value` options:

    repo            = https://github.com/org/app.git ref=v1.2 path=src/app depth=full submodules=true
    file.data       = https://data.example.com/x.csv sha256=<64 hex> path=data/x.csv
    file.report     = file_011CNha8iCJcU1wXNR6q4V8w path=inputs/report.pdf

Parsing is pure (no network, no disk), so every malformed value fails the work item before a
container starts. Other keys are ignored. docs/workspace.md is the reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote

from ..errors import WorkspaceError
from .config import WorkspaceConfig
from .urls import FileUrl, Remote, parse_file_url, parse_remote, reject_control

WORKSPACE = "/workspace"
RESERVED = ("skills",)  # the SDK downloads the session's skills into /workspace/skills/<name>
_KEY = re.compile(r"^(?P<kind>repo|file)(?:\.(?P<label>[A-Za-z0-9][A-Za-z0-9_-]{0,58}))?$")
_FILE_ID = re.compile(r"^file_[A-Za-z0-9]{1,200}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_REPO_OPTIONS = frozenset({"ref", "path", "depth", "submodules"})
_FILE_OPTIONS = frozenset({"path", "sha256"})


@dataclass(frozen=True)
class RepoSpec:
    """One git repository to check out: `ref` None is the default branch, `depth` None full history."""

    key: str
    remote: Remote
    ref: str | None
    target: PurePosixPath
    depth: int | None = 1
    submodules: bool = False

    @property
    def ref_is_commit(self) -> bool:
        return self.ref is not None and _COMMIT.match(self.ref) is not None


@dataclass(frozen=True)
class FileSpec:
    """One file to download: from the Files API (`file_id`) or a URL. `target` None: the file's name."""

    key: str
    file_id: str | None
    url: FileUrl | None
    sha256: str | None
    target: PurePosixPath | None

    @property
    def source(self) -> str:
        return self.file_id or (self.url.display if self.url else "")


@dataclass(frozen=True)
class WorkspacePlan:
    """What a session's metadata asks to be fetched, validated."""

    repos: tuple[RepoSpec, ...] = ()
    files: tuple[FileSpec, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.repos and not self.files


def target_path(raw: str, *, what: str) -> PurePosixPath:
    """A path below /workspace, relative; raises WorkspaceError for anything that could escape it."""
    reject_control(raw, what)
    if raw.startswith("/"):
        if raw.rstrip("/") != WORKSPACE and not raw.startswith(WORKSPACE + "/"):
            raise WorkspaceError("path_escape", f"{what}: {raw!r} is outside {WORKSPACE}")
        raw = raw[len(WORKSPACE):]
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise WorkspaceError("path_escape", f"{what}: {raw!r} contains '..'")
    if not parts:
        raise WorkspaceError("invalid_metadata", f"{what}: the path must name something below {WORKSPACE}")
    if any(p.lower() == ".git" for p in parts):
        raise WorkspaceError("invalid_metadata", f"{what}: the path may not go through a .git directory")
    if parts[0] in RESERVED:
        raise WorkspaceError("invalid_metadata", f"{what}: {WORKSPACE}/{parts[0]} is reserved for the session's "
                             "skills")
    if any(len(p.encode()) > 255 for p in parts):
        raise WorkspaceError("invalid_metadata", f"{what}: a path component is longer than 255 bytes")
    return PurePosixPath(*parts)


def _options(tokens: list[str], allowed: frozenset[str], what: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for token in tokens:
        name, sep, value = token.partition("=")
        if not sep or name not in allowed:
            raise WorkspaceError("invalid_metadata", f"{what}: unknown option {token!r} (known: "
                                 f"{', '.join(sorted(allowed))})")
        if name in options:
            raise WorkspaceError("invalid_metadata", f"{what}: option {name!r} is given twice")
        if not value:
            raise WorkspaceError("invalid_metadata", f"{what}: option {name!r} has no value")
        options[name] = value
    return options


def _ref(value: str, what: str) -> str:
    """A branch, tag, `refs/...` name or full commit SHA, shaped the way git accepts ref names."""
    if value.startswith("-"):
        raise WorkspaceError("option_injection", f"{what}: a ref may not start with '-'")
    if _COMMIT.match(value.lower()):
        return value.lower()
    bad = (
        _REF_FORBIDDEN.search(value) or value == "@" or value.endswith((".", "/", ".lock")) or value.startswith("/")
        or any(part.startswith(".") or part.endswith(".lock") for part in value.split("/"))
    )
    if bad:
        raise WorkspaceError("invalid_metadata", f"{what}: {value!r} is not a valid branch, tag or commit")
    return value


def _depth(value: str, what: str) -> int | None:
    if value == "full":
        return None
    if value.isdigit() and 0 < int(value) <= 1_000_000:
        return int(value)
    raise WorkspaceError("invalid_metadata", f"{what}: depth must be a positive number or 'full'")


def _flag(value: str, what: str) -> bool:
    if value not in ("true", "false"):
        raise WorkspaceError("invalid_metadata", f"{what}: submodules must be true or false")
    return value == "true"


def _repo(key: str, tokens: list[str], config: WorkspaceConfig) -> RepoSpec:
    what = f"metadata {key!r}"
    remote = parse_remote(tokens[0], allowed=config.git_allowed_hosts, allow_http=config.allow_insecure_http,
                          allow_ssh=config.allow_ssh, what=what)
    options = _options(tokens[1:], _REPO_OPTIONS, what)
    path = options.get("path")
    if path is None and remote.name in ("", ".", ".."):
        raise WorkspaceError("invalid_metadata", f"{what}: cannot name a directory after the URL; add path=")
    return RepoSpec(
        key=key,
        remote=remote,
        ref=_ref(options["ref"], what) if "ref" in options else None,
        target=target_path(path if path is not None else remote.name, what=what),
        depth=_depth(options.get("depth", "1"), what),
        submodules=_flag(options.get("submodules", "false"), what),
    )


def _file(key: str, tokens: list[str], config: WorkspaceConfig) -> FileSpec:
    what = f"metadata {key!r}"
    source = tokens[0]
    if source.startswith("-"):
        raise WorkspaceError("option_injection", f"{what}: a source may not start with '-'")
    options = _options(tokens[1:], _FILE_OPTIONS, what)
    digest = options.get("sha256")
    if digest is not None and not _SHA256.match(digest.lower()):
        raise WorkspaceError("invalid_metadata", f"{what}: sha256 must be 64 hexadecimal digits")
    path = options.get("path")
    if _FILE_ID.match(source):
        if config.api_key is None:
            raise WorkspaceError("auth_failed", f"{what}: Files API downloads need the daemon's api_key")
        target = target_path(path, what=what) if path is not None else None
        return FileSpec(key, source, None, digest and digest.lower(), target)
    if "://" not in source:
        raise WorkspaceError("invalid_metadata", f"{what}: {source!r} is neither a file id (file_...) nor a URL")
    url = parse_file_url(source, allowed=config.file_allowed_hosts, allow_http=config.allow_insecure_http,
                         what=what)
    if path is None and not unquote(url.basename).strip():
        raise WorkspaceError("invalid_metadata", f"{what}: cannot name a file after the URL; add path=")
    target = target_path(path if path is not None else unquote(url.basename), what=what)
    return FileSpec(key, None, url, digest and digest.lower(), target)


def _inside(inner: PurePosixPath, outer: PurePosixPath) -> bool:
    return inner == outer or outer in inner.parents


def _check_overlaps(repos: list[RepoSpec], files: list[FileSpec]) -> None:
    """Targets never coincide or nest, except that a file may be placed inside a repository."""
    entries = [(r.key, r.target, True) for r in repos] + [(f.key, f.target, False) for f in files if f.target]
    for i, (key_a, a, a_repo) in enumerate(entries):
        for key_b, b, b_repo in entries[i + 1:]:
            if a == b or (_inside(a, b) and not (b_repo and not a_repo)) or (
                _inside(b, a) and not (a_repo and not b_repo)
            ):
                raise WorkspaceError("invalid_metadata", f"metadata {key_a!r} and {key_b!r} target overlapping "
                                     f"paths ({a} and {b})")


def parse_metadata(metadata: Mapping[str, str], config: WorkspaceConfig) -> WorkspacePlan:
    """Parse the keys this module owns; raise WorkspaceError for the first malformed one."""
    repos: list[RepoSpec] = []
    files: list[FileSpec] = []
    for key in sorted(metadata):
        kind = key.split(".", 1)[0]
        if kind not in ("repo", "file"):
            continue
        if not _KEY.match(key):
            raise WorkspaceError("invalid_metadata", f"metadata {key!r}: a label after '{kind}.' is 1-59 letters, "
                                 "digits, '-' or '_'")
        tokens = str(metadata[key]).split()
        if not tokens:
            raise WorkspaceError("invalid_metadata", f"metadata {key!r}: the value is empty")
        if kind == "repo":
            repos.append(_repo(key, tokens, config))
        else:
            files.append(_file(key, tokens, config))
    _check_overlaps(repos, files)
    return WorkspacePlan(tuple(repos), tuple(files))
