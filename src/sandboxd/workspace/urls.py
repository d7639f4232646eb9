"""Which git remotes and file URLs a session may name, decided without touching the network.

A remote is `https://` (or `http://` when insecure http is allowed for local test servers),
`ssh://` or scp-like `user@host:path` (only when a known_hosts file is configured); everything
git could also reach — `file://`, `git://`, `ext::`-style transport helpers, local paths — is
refused, as is anything starting with `-` that git or ssh could read as an option, credentials
inside a URL, and a host that is not on its allow-list.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

from ..errors import WorkspaceError

_TRANSPORT_HELPER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/:]+)@)?(?P<host>[^/:@\[\]]+):(?P<path>.*)$")
_HOST = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\])$")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def reject_control(value: str, what: str) -> None:
    if _CONTROL.search(value):
        raise WorkspaceError("invalid_metadata", f"{what} contains whitespace or control characters")


def host_allowed(allowed: frozenset[str], host: str, port: int | None) -> bool:
    """An allow-list entry `host` admits every port of it, `host:port` only that port."""
    return host in allowed or (port is not None and f"{host}:{port}" in allowed)


@dataclass(frozen=True)
class Remote:
    """A git remote accepted for fetching; `url` is credential-free and safe to log."""

    url: str
    scheme: str  # https, http or ssh
    host: str  # lower case; IPv6 addresses in brackets
    port: int | None
    user: str | None
    path: str  # the repository path on the server, without a leading "/"
    scp: bool = False

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        """The repository's name: the last path component without `.git`."""
        return self.path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")

    @property
    def cache_key(self) -> str:
        """The same for every spelling of one repository (`x` and `x.git/`), different otherwise."""
        path = self.path.strip("/").removesuffix(".git")
        identity = f"{self.scheme}|{self.user or ''}|{self.hostport}|{'~' if self.scp else '/'}{path}"
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def join(self, relative: str) -> str:
        """Resolve a submodule URL relative to this remote, the way git does (`../lib.git`)."""
        parts = self.path.rstrip("/").split("/")
        rest = relative
        while True:
            if rest.startswith("./"):
                rest = rest[2:]
            elif rest.startswith("../"):
                rest = rest[3:]
                if not parts:
                    raise WorkspaceError("path_escape", f"submodule URL {relative!r} climbs above the server root")
                parts.pop()
            else:
                break
        path = "/".join([*parts, rest])
        if self.scp:
            return f"{self.user + '@' if self.user else ''}{self.host}:{path}"
        return urlunsplit((self.scheme, _netloc(self.user, self.hostport), "/" + path.lstrip("/"), "", ""))


def _netloc(user: str | None, hostport: str) -> str:
    return f"{user}@{hostport}" if user else hostport


def _check_host(host: str, port: int | None, allowed: frozenset[str], what: str) -> None:
    if host.startswith("-"):
        raise WorkspaceError("option_injection", f"{what}: a host may not start with '-'")
    if not _HOST.match(host):
        raise WorkspaceError("invalid_metadata", f"{what}: {host!r} is not a valid host name")
    if not host_allowed(allowed, host, port):
        shown = host if port is None else f"{host}:{port}"
        raise WorkspaceError("host_not_allowed", f"{what}: host {shown} is not on the allow-list")


def _split(value: str, what: str) -> tuple[SplitResult, str, int | None]:
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        raise WorkspaceError("invalid_metadata", f"{what}: the port is not a number") from None
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    if not host:
        raise WorkspaceError("invalid_metadata", f"{what}: the URL names no host")
    return parts, host, port


def parse_remote(value: str, *, allowed: frozenset[str], allow_http: bool, allow_ssh: bool, what: str) -> Remote:
    """Validate a git URL; raises WorkspaceError with the reason a metric counts."""
    if value.startswith("-"):
        raise WorkspaceError("option_injection", f"{what}: a git URL may not start with '-'")
    reject_control(value, what)
    if _TRANSPORT_HELPER.match(value):
        raise WorkspaceError("scheme_not_allowed", f"{what}: git transport helpers ({value.split('::')[0]}::) "
                             "are not allowed")
    if "://" in value:
        return _parse_url_remote(value, allowed=allowed, allow_http=allow_http, allow_ssh=allow_ssh, what=what)
    match = _SCP_LIKE.match(value)
    if match is None or value.startswith((".", "/", "~")):
        raise WorkspaceError("scheme_not_allowed", f"{what}: local paths are not allowed; use an https or ssh URL")
    if not allow_ssh:
        raise WorkspaceError("scheme_not_allowed", f"{what}: ssh git URLs need the daemon setting "
                             "git_ssh_known_hosts_file")
    user, host, path = match["user"], match["host"].lower(), match["path"]
    if user and user.startswith("-"):
        raise WorkspaceError("option_injection", f"{what}: an ssh user may not start with '-'")
    _check_host(host, None, allowed, what)
    if not path.strip("/") or path.startswith("-"):
        raise WorkspaceError("invalid_metadata", f"{what}: the URL names no repository path")
    return Remote(url=value, scheme="ssh", host=host, port=None, user=user, path=path, scp=True)


def _parse_url_remote(value: str, *, allowed: frozenset[str], allow_http: bool, allow_ssh: bool,
                      what: str) -> Remote:
    scheme = value.split("://", 1)[0].lower()
    permitted = {"https"} | ({"http"} if allow_http else set()) | ({"ssh"} if allow_ssh else set())
    if scheme not in permitted:
        hint = " (ssh needs git_ssh_known_hosts_file)" if scheme == "ssh" else ""
        raise WorkspaceError("scheme_not_allowed", f"{what}: {scheme}:// git URLs are not allowed{hint}")
    parts, host, port = _split(value, what)
    if parts.username and parts.username.startswith("-"):
        raise WorkspaceError("option_injection", f"{what}: a URL user may not start with '-'")
    if parts.password or (parts.username and scheme != "ssh"):
        raise WorkspaceError("invalid_metadata", f"{what}: credentials do not belong in the URL; the daemon's "
                             "settings provide them per host")
    _check_host(host, port, allowed, what)
    if parts.query or parts.fragment:
        raise WorkspaceError("invalid_metadata", f"{what}: a git URL may not have a query or a fragment")
    path = parts.path.lstrip("/")
    if not path.strip("/"):
        raise WorkspaceError("invalid_metadata", f"{what}: the URL names no repository path")
    return Remote(url=value, scheme=scheme, host=host, port=port, user=parts.username, path=path)


@dataclass(frozen=True)
class FileUrl:
    """An https (or allowed http) file URL; `display` drops the query, which may hold a signature."""

    url: str
    host: str
    port: int | None

    @property
    def display(self) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")) + ("?…" if parts.query else "")

    @property
    def basename(self) -> str:
        return urlsplit(self.url).path.rsplit("/", 1)[-1]


def parse_file_url(value: str, *, allowed: frozenset[str], allow_http: bool, what: str) -> FileUrl:
    """Validate a file URL; raises WorkspaceError with the reason a metric counts."""
    if value.startswith("-"):
        raise WorkspaceError("option_injection", f"{what}: a URL may not start with '-'")
    reject_control(value, what)
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme not in ({"https", "http"} if allow_http else {"https"}):
        raise WorkspaceError("scheme_not_allowed", f"{what}: only https file URLs are allowed")
    parts, host, port = _split(value, what)
    if parts.username or parts.password:
        raise WorkspaceError("invalid_metadata", f"{what}: credentials do not belong in the URL")
    _check_host(host, port, allowed, what)
    return FileUrl(url=urlunsplit(parts._replace(fragment="")), host=host, port=port)
