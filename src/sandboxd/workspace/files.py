"""File downloads for a session: the Files API (through the SDK) and https URLs (through httpx2).

Bytes are streamed to a download file while counted and hashed, so a size cap holds even when the
server sends no or a false Content-Length, and the sha256 is checked before the file is moved
into the workspace. URL redirects are followed by hand, at most five, each hop checked against
the scheme rules and the allow-list like the first URL.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urljoin

import anthropic
import anyio
import httpx2
from anthropic import AsyncAnthropic

from ..errors import WorkspaceError
from .config import WorkspaceConfig
from .schema import FileSpec, target_path
from .staging import Budget, Staging
from .urls import FileUrl, parse_file_url

FILES_API_BETA = "files-api-2025-04-14"
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Downloaded:
    """Provenance of one file placed in the workspace."""

    source: str
    path: PurePosixPath
    sha256: str
    size: int


class _Sink:
    """Counts, hashes and writes streamed bytes; raises `too_large` past `cap`."""

    def __init__(self, handle: anyio.AsyncFile[bytes], cap: int, what: str, cap_name: str) -> None:
        self._handle = handle
        self._cap = cap
        self._what = what
        self._cap_name = cap_name
        self.size = 0
        self.digest = hashlib.sha256()

    def check_declared(self, length: str | None) -> None:
        if length is not None and length.isdigit() and int(length) > self._cap:
            self._too_large()

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._cap:
            self._too_large()
        self.digest.update(chunk)
        await self._handle.write(chunk)

    def _too_large(self) -> None:
        raise WorkspaceError("too_large", f"{self._what}: larger than {self._cap_name}={self._cap} bytes")


class FileFetcher:
    """Downloads the files of one workspace; `anthropic` is None when no api_key is configured."""

    def __init__(self, config: WorkspaceConfig, http: httpx2.AsyncClient, anthropic_client: AsyncAnthropic | None):
        self._config = config
        self._http = http
        self._anthropic = anthropic_client

    async def fetch(self, spec: FileSpec, staging: Staging, budget: Budget) -> Downloaded:
        """Download one file into the staging tree, bounded by fetch_timeout_seconds."""
        what = f"file {spec.source}"
        download = staging.downloads / secrets.token_hex(8)
        config = self._config
        cap, cap_name = config.file_max_bytes, "file_max_bytes"
        if budget.remaining < cap:
            cap, cap_name = budget.remaining, "the rest of workspace_max_bytes"
        try:
            with anyio.fail_after(config.fetch_timeout_seconds):
                async with await anyio.open_file(download, "wb") as handle:
                    sink = _Sink(handle, cap, what, cap_name)
                    if spec.file_id is not None:
                        target = await self._from_files_api(spec, sink, what)
                    else:
                        assert spec.url is not None and spec.target is not None
                        await self._from_url(spec.url, sink, what)
                        target = spec.target
        except TimeoutError:
            raise WorkspaceError("timed_out", f"{what}: no complete answer within fetch_timeout_seconds="
                                 f"{config.fetch_timeout_seconds:g}") from None
        digest = sink.digest.hexdigest()
        if spec.sha256 is not None and digest != spec.sha256:
            raise WorkspaceError("digest_mismatch", f"{what}: sha256 is {digest}, the metadata says {spec.sha256}")
        budget.take(sink.size, what)
        await anyio.to_thread.run_sync(staging.place, download, target, what)
        return Downloaded(spec.source, target, digest, sink.size)

    async def _from_url(self, url: FileUrl, sink: _Sink, what: str) -> None:
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                async with self._http.stream("GET", url.url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = parse_file_url(urljoin(url.url, response.headers["location"]),
                                             allowed=self._config.file_allowed_hosts,
                                             allow_http=self._config.allow_insecure_http, what=f"{what} (redirect)")
                        continue
                    _check_status(response.status_code, what)
                    sink.check_declared(response.headers.get("content-length"))
                    async for chunk in response.aiter_bytes():
                        await sink.write(chunk)
                    return
            except httpx2.ConnectError as exc:
                raise WorkspaceError("unreachable", f"{what}: cannot connect to {url.host}: {exc}") from None
            except httpx2.TimeoutException:
                raise WorkspaceError("timed_out", f"{what}: {url.host} did not answer in time") from None
            except httpx2.HTTPError as exc:
                raise WorkspaceError("fetch_failed", f"{what}: {type(exc).__name__}: {exc}") from None
        raise WorkspaceError("fetch_failed", f"{what}: more than {MAX_REDIRECTS} redirects")

    async def _from_files_api(self, spec: FileSpec, sink: _Sink, what: str) -> PurePosixPath:
        assert spec.file_id is not None
        if self._anthropic is None:
            raise WorkspaceError("auth_failed", f"{what}: Files API downloads need the daemon's api_key")
        files = self._anthropic.beta.files
        try:
            meta = await files.retrieve_metadata(spec.file_id, betas=[FILES_API_BETA])
            sink.check_declared(str(meta.size_bytes))
            if meta.downloadable is False:
                raise WorkspaceError("fetch_failed", f"{what}: the Files API does not allow downloading this file")
            target = spec.target or _name_from_files_api(meta.filename, spec.file_id, what)
            async with files.with_streaming_response.download(spec.file_id, betas=[FILES_API_BETA]) as response:
                async for chunk in response.iter_bytes():
                    await sink.write(chunk)
        except anthropic.APIError as exc:
            raise _api_error(exc, what) from None
        return target


def _name_from_files_api(filename: str, file_id: str, what: str) -> PurePosixPath:
    """The Files API's own file name as a workspace path, when it is a plain name; else the file id."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    try:
        return target_path(name, what=what) if name and not name.startswith(".") else PurePosixPath(file_id)
    except WorkspaceError:
        return PurePosixPath(file_id)


def _check_status(status: int, what: str) -> None:
    if status in (401, 403):
        raise WorkspaceError("auth_failed", f"{what}: the server answered {status}")
    if status in (404, 410):
        raise WorkspaceError("not_found", f"{what}: the server answered {status}")
    if status != 200:
        raise WorkspaceError("fetch_failed", f"{what}: the server answered {status}")


def _api_error(exc: anthropic.APIError, what: str) -> WorkspaceError:
    if isinstance(exc, anthropic.NotFoundError):
        return WorkspaceError("not_found", f"{what}: the Files API has no such file")
    if isinstance(exc, anthropic.AuthenticationError | anthropic.PermissionDeniedError):
        return WorkspaceError("auth_failed", f"{what}: the Files API refused the daemon's api_key ({exc.status_code})")
    if isinstance(exc, anthropic.APITimeoutError):
        return WorkspaceError("timed_out", f"{what}: the Files API did not answer in time")
    if isinstance(exc, anthropic.APIConnectionError):
        return WorkspaceError("unreachable", f"{what}: cannot connect to the Files API")
    return WorkspaceError("fetch_failed", f"{what}: the Files API failed: {exc}")
