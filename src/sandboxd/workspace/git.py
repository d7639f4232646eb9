"""Git checkouts for a session: resolve the ref, update the mirror, check out from it, submodules.

The remote is asked first (`ls-remote`, one round trip) what the ref points to, so a missing ref,
a dead server or bad credentials fail before the mirror cache is touched, and a mirror that
already holds the commit needs no fetch at all. The mirror keeps full history of the refs
sessions asked for (so later fetches are incremental); the session's checkout is made from the
mirror over the file transport — shallow by default — and is self-contained, with a
credential-free `remote.origin.url`. Submodules are resolved the same way, each URL checked
against the allow-list, and checked out with an embedded `.git` directory.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import anyio

from ..errors import WorkspaceError
from .config import WorkspaceConfig
from .gitcmd import Credentials, GitEnv, GitFailed, local_env, run_git
from .mirrors import Mirror, MirrorCache
from .schema import RepoSpec
from .urls import Remote, parse_remote

log = logging.getLogger(__name__)

MAX_SUBMODULES = 32
MAX_SUBMODULE_NESTING = 4
_GITLINK = "160000"


@dataclass(frozen=True)
class Target:
    """What a ref resolved to: the ref to fetch into the mirror (None for a bare commit), its object."""

    ref: str | None
    kind: str  # branch, tag, ref (another refs/... name), commit, or head (a remote HEAD that is no branch)
    sha: str | None  # None for a commit: it is the ref's own value

    def mirror_ref(self, commit: str) -> str:
        if self.kind == "commit":
            return f"refs/sandboxd/commits/{commit}"
        return "refs/sandboxd/HEAD" if self.kind == "head" else str(self.ref)


@dataclass(frozen=True)
class CheckedOut:
    """Provenance of one checkout (a repository or one of its submodules)."""

    url: str
    ref: str
    commit: str
    path: str  # relative to the checkout of the top-level repository ("" for itself)


class GitFetcher:
    """Checks repositories out of the mirror cache into a staging directory."""

    def __init__(self, config: WorkspaceConfig, cache: MirrorCache, git_home: Path) -> None:
        self._config = config
        self._cache = cache
        self._credentials = Credentials(config)
        self._home = git_home

    async def checkout(self, spec: RepoSpec, dest: Path) -> list[CheckedOut]:
        """Check the spec's ref (default: the default branch) out into `dest`, with submodules if asked."""
        remote, depth = spec.remote, spec.depth
        commit = await self._checkout_one(remote, spec.ref, dest, depth=depth, is_commit=spec.ref_is_commit)
        done = [CheckedOut(remote.url, spec.ref or commit.branch, commit.sha, "")]
        if spec.submodules:
            done += await self._submodules(remote, dest, depth=depth, nesting=1, prefix="", count=[0])
        return done

    async def _checkout_one(self, remote: Remote, ref: str | None, dest: Path, *, depth: int | None,
                            is_commit: bool) -> _Commit:
        what = f"repository {remote.url}"
        env = await self._credentials.remote_env(remote, self._home, timeout_seconds=self._config.fetch_timeout_seconds)
        target = Target(None, "commit", None) if is_commit else await self._resolve(remote, ref, env, what)
        async with self._cache.use(remote) as mirror:
            try:
                sha = await self._update_mirror(mirror, remote, target, ref, env, what)
            except BaseException:
                if mirror.created:
                    await self._cache.drop(mirror)
                raise
            return await self._make_checkout(mirror, remote, target, sha, dest, depth)

    async def _resolve(self, remote: Remote, ref: str | None, env: GitEnv, what: str) -> Target:
        patterns = ["HEAD"] if ref is None else [ref] if ref.startswith("refs/") else [
            f"refs/tags/{ref}", f"refs/heads/{ref}"]
        try:
            out = await run_git(["ls-remote", "--symref", remote.url, *patterns], env)
        except GitFailed as exc:
            raise exc.as_workspace_error(what) from None
        refs: dict[str, str] = {}
        symref = None
        for line in out.splitlines():
            value, _, name = line.partition("\t")
            if value.startswith("ref: ") and name == "HEAD":
                symref = value.removeprefix("ref: ")
            elif name:
                refs[name] = value
        for name in patterns:
            if name in refs:
                if name == "HEAD":
                    return Target(symref, "branch", refs[name]) if symref else Target("HEAD", "head", refs[name])
                kind = "tag" if name.startswith("refs/tags/") else "branch" if name.startswith("refs/heads/") else "ref"
                return Target(name, kind, refs[name])
        raise WorkspaceError("ref_not_found", f"{what}: no branch or tag {ref!r}" if ref else f"{what}: no HEAD")

    async def _update_mirror(self, mirror: Mirror, remote: Remote, target: Target, ref: str | None, env: GitEnv,
                             what: str) -> str:
        """Fetch into the mirror unless it already has the wanted object; returns the commit to check out."""
        local = local_env(self._home)
        if target.kind == "commit":
            assert ref is not None
            if await _has_commit(mirror.path, ref, local):  # reachable from another ref: pin it for the checkout
                await run_git(["update-ref", target.mirror_ref(ref), ref], local, cwd=mirror.path)
            else:
                await _fetch(mirror.path, remote, f"+{ref}:{target.mirror_ref(ref)}", env, what)
                if not await _has_commit(mirror.path, ref, local):
                    raise WorkspaceError("ref_not_found", f"{what}: {ref} is not a commit")
            return ref
        mirror_ref = target.mirror_ref("")
        current = await _rev_parse(mirror.path, mirror_ref, local)
        if current != target.sha:
            # By the id ls-remote returned: no second ref listing, and exactly the commit that was resolved.
            await _fetch(mirror.path, remote, f"+{target.sha}:{mirror_ref}", env, what)
        commit = await _rev_parse(mirror.path, f"{mirror_ref}^{{commit}}", local)
        if commit is None:
            raise WorkspaceError("ref_not_found", f"{what}: {ref or 'HEAD'} does not point at a commit")
        return commit

    async def _make_checkout(self, mirror: Mirror, remote: Remote, target: Target, sha: str, dest: Path,
                             depth: int | None) -> _Commit:
        env = local_env(self._home)
        await run_git(["init", "-q", "--template=", str(dest)], env)

        async def git(*args: str) -> str:
            return await run_git(list(args), env, cwd=dest)

        branch = target.ref.removeprefix("refs/heads/") if target.kind == "branch" and target.ref else None
        await git("config", "remote.origin.url", remote.url)
        await git("config", "remote.origin.fetch",
                  f"+refs/heads/{branch}:refs/remotes/origin/{branch}" if branch
                  else "+refs/heads/*:refs/remotes/origin/*")
        local_ref = f"refs/remotes/origin/{branch}" if branch else (
            str(target.ref) if target.kind == "tag" else "refs/sandboxd/checkout")
        fetch = ["fetch", "-q", "--no-tags", "--no-write-fetch-head"]
        fetch += [f"--depth={depth}"] if depth else []
        await git(*fetch, mirror.path.as_uri(), f"+{target.mirror_ref(sha)}:{local_ref}")
        if branch:
            await git("checkout", "-q", "-b", branch, "--track", f"origin/{branch}")
        else:
            await git("checkout", "-q", "--detach", sha)
            if local_ref == "refs/sandboxd/checkout":
                await git("update-ref", "-d", local_ref)
                await anyio.to_thread.run_sync(shutil.rmtree, dest / ".git" / "refs" / "sandboxd", True)
        head = (await git("rev-parse", "HEAD")).strip()
        return _Commit(head, branch or sha)

    async def _submodules(self, remote: Remote, dest: Path, *, depth: int | None, nesting: int, prefix: str,
                          count: list[int]) -> list[CheckedOut]:
        env = local_env(self._home)
        try:
            await run_git(["rev-parse", "-q", "--verify", "HEAD:.gitmodules"], env, cwd=dest)
        except GitFailed:
            return []
        if nesting > MAX_SUBMODULE_NESTING:
            raise WorkspaceError("too_large", f"repository {remote.url}: submodules nest deeper than "
                                 f"{MAX_SUBMODULE_NESTING} levels")
        modules = await _gitmodules(dest, env)
        done: list[CheckedOut] = []
        for path, sha in await _gitlinks(dest, env):
            if path not in modules:
                log.warning("git_submodule_skipped path=%s reason=not_in_gitmodules", prefix + path)
                continue
            count[0] += 1
            if count[0] > MAX_SUBMODULES:
                raise WorkspaceError("too_large", f"repository {remote.url}: more than {MAX_SUBMODULES} submodules")
            name, url = modules[path]
            what = f"submodule {prefix + path} of {remote.url}"
            sub_url = remote.join(url) if url.startswith(("./", "../")) else url
            sub = parse_remote(sub_url, allowed=self._config.git_allowed_hosts,
                               allow_http=self._config.allow_insecure_http, allow_ssh=self._config.allow_ssh, what=what)
            sub_dest = _inside(dest, path, what)
            commit = await self._checkout_one(sub, sha, sub_dest, depth=depth, is_commit=True)
            await run_git(["config", f"submodule.{name}.url", sub.url], env, cwd=dest)
            await run_git(["config", f"submodule.{name}.active", "true"], env, cwd=dest)
            done.append(CheckedOut(sub.url, sha, commit.sha, prefix + path))
            done += await self._submodules(sub, sub_dest, depth=depth, nesting=nesting + 1,
                                           prefix=f"{prefix}{path}/", count=count)
        return done


@dataclass(frozen=True)
class _Commit:
    sha: str
    branch: str


def _inside(root: Path, relative: str, what: str) -> Path:
    """`root/relative`, refusing a path that leaves `root` or passes through a symlink."""
    path = root / relative
    real_root = os.path.realpath(root)
    if os.path.realpath(path) != os.path.join(real_root, os.path.normpath(relative)) or not path.is_dir():
        raise WorkspaceError("path_escape", f"{what}: the submodule path is not a directory inside the repository")
    return path


async def _fetch(mirror: Path, remote: Remote, refspec: str, env: GitEnv, what: str) -> None:
    try:
        await run_git(["fetch", "-q", "--no-tags", "--no-write-fetch-head", remote.url, refspec], env,
                      cwd=mirror)
    except GitFailed as exc:
        raise exc.as_workspace_error(what) from None


async def _rev_parse(repo: Path, ref: str, env: GitEnv) -> str | None:
    try:
        return (await run_git(["rev-parse", "-q", "--verify", ref], env, cwd=repo)).strip() or None
    except GitFailed:
        return None


async def _has_commit(repo: Path, sha: str, env: GitEnv) -> bool:
    return await _rev_parse(repo, f"{sha}^{{commit}}", env) == sha


async def _gitmodules(dest: Path, env: GitEnv) -> dict[str, tuple[str, str]]:
    """{path: (name, url)} from the committed .gitmodules."""
    out = await run_git(["config", "-z", "--blob", "HEAD:.gitmodules", "--get-regexp", r"^submodule\..*\.(path|url)$"],
                        env, cwd=dest)
    names: dict[str, dict[str, str]] = {}
    for record in filter(None, out.split("\0")):
        key, _, value = record.partition("\n")
        name, _, field = key.removeprefix("submodule.").rpartition(".")
        names.setdefault(name, {})[field] = value
    return {v["path"]: (name, v["url"]) for name, v in names.items() if "path" in v and "url" in v}


async def _gitlinks(dest: Path, env: GitEnv) -> list[tuple[str, str]]:
    """(path, commit) of every submodule entry in HEAD's tree."""
    out = await run_git(["ls-tree", "-r", "-z", "HEAD"], env, cwd=dest)
    links = []
    for record in filter(None, out.split("\0")):
        meta, _, path = record.partition("\t")
        mode, _kind, sha = meta.split(" ")
        if mode == _GITLINK:
            links.append((path, sha))
    return links
