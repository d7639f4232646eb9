"""Workspace preparation from session metadata (git repositories and files into /workspace).

Public surface used by the session supervisor:

    workspaces = Workspaces(WorkspaceConfig.from_settings(settings))   # built once by the CLI
    plan = workspaces.plan(metadata)                    # pure validation; raises WorkspaceError
    async with workspaces.prepare(plan, work_id) as archive:   # fetch; archive is a tar file or None
        ...deliver archive into the sandbox...

Modules: `schema` (metadata → plan), `urls` (what may be fetched), `gitcmd` (hardened git
processes and credentials), `mirrors` (the git mirror cache), `git` (checkouts), `files`
(downloads), `staging` (the per-item directory and byte budget), `archive` (the tar).
Every failure is a WorkspaceError whose reason is one of sandboxd.metrics.WORKSPACE_REASONS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import IO

import anyio
import httpx2
from anthropic import AsyncAnthropic

from ..errors import WorkspaceError
from .archive import write_archive
from .config import WorkspaceConfig
from .files import FileFetcher
from .git import GitFetcher
from .gitcmd import GitFailed
from .mirrors import MirrorCache, tree_bytes
from .schema import FileSpec, RepoSpec, WorkspacePlan, parse_metadata
from .staging import Budget, Staging, reap

log = logging.getLogger(__name__)

__all__ = ["FileSpec", "RepoSpec", "WorkspaceConfig", "WorkspaceError", "WorkspacePlan", "Workspaces"]


class Workspaces:
    """Plans and prepares session workspaces.

    `anthropic_client` and `http_client` replace the clients built per workspace from the config
    (the Files API client only exists when an api_key is configured).
    """

    def __init__(
        self,
        config: WorkspaceConfig | None = None,
        *,
        anthropic_client: AsyncAnthropic | None = None,
        http_client: httpx2.AsyncClient | None = None,
    ) -> None:
        self.config = config or WorkspaceConfig()
        self._anthropic = anthropic_client
        self._http = http_client
        self._git_home = self.config.state_dir / "git-home"
        self.mirrors = MirrorCache(self.config.mirror_dir, self.config.git_mirror_cache_max_bytes, self._git_home)
        self._git = GitFetcher(self.config, self.mirrors, self._git_home)

    def plan(self, metadata: Mapping[str, str]) -> WorkspacePlan:
        """Validate the metadata's `repo*` and `file*` keys (no network, no disk)."""
        return parse_metadata(metadata, self.config)

    async def reap_abandoned(self) -> None:
        """Remove staging directories a previous run left behind (call once at start-up)."""
        names = await reap(self.config.staging_dir)
        if names:
            log.info("workspace_staging_reaped count=%d", len(names))

    @asynccontextmanager
    async def prepare(self, plan: WorkspacePlan, work_id: str) -> AsyncIterator[IO[bytes] | None]:
        """Fetch everything the plan names and yield the workspace as an open tar file (None if empty).

        Raises WorkspaceError; the staging directory is removed on exit, also on error and cancellation.
        """
        if plan.empty:
            yield None
            return
        staging = Staging(self.config.staging_dir, work_id)
        try:
            began = time.monotonic()
            try:
                await staging.create()
                await anyio.Path(self._git_home).mkdir(parents=True, exist_ok=True, mode=0o700)
                budget = Budget(self.config.workspace_max_bytes)
                await self._fetch_repos(plan, work_id, staging, budget)
                await self._fetch_files(plan, work_id, staging, budget)
                await anyio.to_thread.run_sync(
                    lambda: write_archive(staging.tree, staging.archive, uid=self.config.sandbox_uid,
                                          gid=self.config.sandbox_gid, work_id=work_id))
            except OSError as exc:
                raise WorkspaceError("fetch_failed", f"local I/O error while preparing the workspace: {exc}") from exc
            log.info("workspace_prepared work_id=%s repos=%d files=%d bytes=%d seconds=%.2f", work_id,
                     len(plan.repos), len(plan.files), budget.used, time.monotonic() - began)
            archive = await anyio.to_thread.run_sync(lambda: open(staging.archive, "rb"))  # noqa: SIM115
            try:
                yield archive
            finally:
                archive.close()
        finally:
            await staging.remove()

    async def _fetch_repos(self, plan: WorkspacePlan, work_id: str, staging: Staging, budget: Budget) -> None:
        timeout = self.config.fetch_timeout_seconds
        for spec in plan.repos:
            what = f"repository {spec.remote.url}"
            dest = staging.target(spec.target)
            await anyio.Path(dest.parent).mkdir(parents=True, exist_ok=True, mode=0o755)
            try:
                with anyio.fail_after(timeout):
                    done = await self._git.checkout(spec, dest)
            except TimeoutError:
                raise WorkspaceError("timed_out", f"{what}: not fetched within fetch_timeout_seconds={timeout:g}"
                                     ) from None
            except GitFailed as exc:
                raise exc.as_workspace_error(what) from None
            budget.take(await anyio.to_thread.run_sync(tree_bytes, dest), what)
            for item in done:
                path = spec.target.joinpath(item.path) if item.path else spec.target
                log.info("workspace_repo work_id=%s url=%s ref=%s commit=%s path=%s", work_id, item.url, item.ref,
                         item.commit, path)

    async def _fetch_files(self, plan: WorkspacePlan, work_id: str, staging: Staging, budget: Budget) -> None:
        if not plan.files:
            return
        config = self.config
        async with AsyncExitStack() as stack:
            http = self._http
            if http is None:
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(follow_redirects=False, trust_env=False, timeout=config.fetch_timeout_seconds))
            files_api = self._anthropic
            if files_api is None and config.api_key is not None:
                files_api = await stack.enter_async_context(AsyncAnthropic(
                    api_key=config.api_key, base_url=config.base_url, timeout=config.fetch_timeout_seconds))
            fetcher = FileFetcher(config, http, files_api)
            for spec in plan.files:
                done = await fetcher.fetch(spec, staging, budget)
                log.info("workspace_file work_id=%s source=%s sha256=%s bytes=%d path=%s", work_id, done.source,
                         done.sha256, done.size, done.path)
