"""Real git and HTTP servers on 127.0.0.1 for the workspace tests and the benchmark.

`GitHttpServer` serves bare repositories under a root directory through git's own smart-HTTP
backend (`git http-backend`, run as a CGI per request by a small threading HTTP server); paths
under `/private/` need HTTP basic auth with the server's token. `FileServer` serves in-memory
files, a stalling path, redirects and a stand-in of the Files API download routes.
`build_fixture_repos` creates the repositories the tests use: branches, lightweight and annotated
tags, executable files, symlinks, nested submodules and a private repository. No git is mocked.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "Fixture",
    "GIT_AUTHOR_EMAIL": "fixture@example.invalid",
    "GIT_COMMITTER_NAME": "Fixture",
    "GIT_COMMITTER_EMAIL": "fixture@example.invalid",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "LC_ALL": "C",
}
TOKEN_USER = "x-access-token"


def git(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """Run git with a clean, deterministic configuration; return its stdout."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", **GIT_ENV, **(env or {})}
    done = subprocess.run(
        ["git", "-c", "init.defaultBranch=main", "-c", "protocol.file.allow=always", *args],
        cwd=cwd, env=full_env, check=True, capture_output=True, text=True,
    )
    return done.stdout.strip()


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # clients hanging up is fine
        pass


@dataclass(frozen=True)
class GitRequest:
    """One request the git server answered; `command` is the protocol v2 command (ls-refs, fetch)."""

    method: str
    path: str
    headers: dict[str, str]
    command: str


def _command(body: bytes, encoding: str) -> str:
    if encoding == "gzip":
        body = gzip.decompress(body)
    match = re.search(rb"command=([a-z-]+)", body[:200])
    return match.group(1).decode() if match else ""


class _GitHandler(BaseHTTPRequestHandler):
    server: _GitServerImpl

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._cgi()

    def do_POST(self) -> None:
        self._cgi()

    def _cgi(self) -> None:
        url = urlsplit(self.path)
        body = self._request_body()
        self.server.requests.append(GitRequest(self.command, url.path, dict(self.headers.items()), _command(
            body, self.headers.get("Content-Encoding", ""))))
        if url.path.startswith("/private/") and not self._authorized():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="private"')
            self.end_headers()
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": url.path,
            "QUERY_STRING": url.query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_USER": "fixture",
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        time.sleep(self.server.latency_seconds)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        rate = self.server.bytes_per_second
        for start in range(0, len(payload), 65536):
            chunk = payload[start:start + 65536]
            self.wfile.write(chunk)
            if rate:
                time.sleep(len(chunk) / rate)

    def _authorized(self) -> bool:
        expected = base64.b64encode(f"{TOKEN_USER}:{self.server.token}".encode()).decode()
        return self.headers.get("Authorization", "") == f"Basic {expected}"

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class _GitServerImpl(_Quiet):
    root: Path
    token: str
    latency_seconds: float
    bytes_per_second: int | None
    requests: list[GitRequest]


class _Loopback:
    """A threaded HTTP server on 127.0.0.1 (any free port), stopped on exit."""

    _server: _Quiet | None

    def _serve(self, server: _Quiet, name: str) -> None:
        self._server = server
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"http://{self.host}/{path.lstrip('/')}"


@dataclass
class GitHttpServer(_Loopback):
    """`git http-backend` over HTTP on 127.0.0.1; `/private/...` needs basic auth with `token`.

    `latency_seconds` (per request) and `bytes_per_second` (of responses) imitate a remote server.
    """

    root: Path
    token: str = "fixture-token-" + "s3cr3t"
    latency_seconds: float = 0.0
    bytes_per_second: int | None = None
    _server: _GitServerImpl | None = None

    def __enter__(self) -> GitHttpServer:
        server = _GitServerImpl(("127.0.0.1", 0), _GitHandler)
        server.root, server.token, server.requests = self.root, self.token, []
        server.latency_seconds, server.bytes_per_second = self.latency_seconds, self.bytes_per_second
        self._serve(server, "git-http")
        return self

    @property
    def requests(self) -> list[GitRequest]:
        assert self._server is not None
        return self._server.requests


class StallingServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a server that hangs)."""

    def __enter__(self) -> StallingServer:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="stall", daemon=True).start()
        return self

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                self._held.append(self._sock.accept()[0])
            except OSError:
                continue

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for conn in self._held:
            conn.close()
        self._sock.close()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._sock.getsockname()[1]}"


def closed_port_host() -> str:
    """host:port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# --- files ------------------------------------------------------------------------------------


class _FileHandler(BaseHTTPRequestHandler):
    server: _FileServerImpl

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.server.requests.append((url.path, dict(self.headers.items())))
        if url.path.startswith("/stall/"):
            time.sleep(self.server.stall_seconds)
            return
        if url.path.startswith("/redirect/"):
            target = parse_qs(url.query)["to"][0]
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
            return
        if url.path.startswith("/v1/files/"):
            self._files_api(url.path.removeprefix("/v1/files/"))
            return
        content = self.server.files.get(url.path.lstrip("/"))
        if content is None:
            self._send(404, b"not found")
        else:
            self._send(200, content, lie_length=url.path.startswith("/unsized/"))

    def _files_api(self, rest: str) -> None:
        key = self.server.api_key
        if self.headers.get("x-api-key") != key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, b'{"type":"error","error":{"type":"authentication_error","message":"bad key"}}')
            return
        file_id, _, content_route = rest.partition("/")
        entry = self.server.api_files.get(file_id)
        if entry is None:
            self._send(404, b'{"type":"error","error":{"type":"not_found_error","message":"no such file"}}')
        elif content_route == "content":
            self._send(200, entry[1])
        else:
            meta = (
                f'{{"id":"{file_id}","type":"file","filename":"{entry[0]}","mime_type":"application/octet-stream",'
                f'"size_bytes":{len(entry[1])},"created_at":"2024-01-01T00:00:00Z","downloadable":true}}'
            )
            self._send(200, meta.encode(), content_type="application/json")

    def _send(self, status: int, body: bytes, *, lie_length: bool = False,
              content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if not lie_length:  # /unsized/ omits Content-Length: the size cap must hold while streaming
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FileServerImpl(_Quiet):
    files: dict[str, bytes]
    api_files: dict[str, tuple[str, bytes]]
    api_key: str
    stall_seconds: float
    requests: list[tuple[str, dict[str, str]]]


@dataclass
class FileServer(_Loopback):
    """Static files (`files`), `/stall/*` (never answers), `/redirect/*?to=URL`, `/unsized/*` (no
    Content-Length), and the Files API routes `/v1/files/{id}` and `/v1/files/{id}/content`."""

    files: dict[str, bytes] = field(default_factory=dict)
    api_files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # id -> (filename, content)
    api_key: str = "sk-ant-fixture-" + "api-key"
    stall_seconds: float = 30.0
    _server: _FileServerImpl | None = None

    def __enter__(self) -> FileServer:
        server = _FileServerImpl(("127.0.0.1", 0), _FileHandler)
        server.files, server.api_files, server.api_key = self.files, self.api_files, self.api_key
        server.stall_seconds, server.requests = self.stall_seconds, []
        self._serve(server, "file-http")
        return self

    def add(self, name: str, content: bytes) -> str:
        """Serve `content` at /name (and /unsized/name); returns its sha256."""
        self.files[name] = content
        self.files["unsized/" + name] = content
        return hashlib.sha256(content).hexdigest()

    @property
    def requests(self) -> list[tuple[str, dict[str, str]]]:
        assert self._server is not None
        return self._server.requests


# --- repositories -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FixtureRepos:
    """What `build_fixture_repos` made: names relative to the server root, and commit ids."""

    app: str  # branches main/feature, tags v1.0 (lightweight) and v2.0 (annotated), refs/pull/1/head
    app_commits: dict[str, str]  # main, feature, v1.0, v2.0 (peeled), first (an old main commit)
    super: str  # submodule `libs/lib` (relative URL ../lib.git), which has submodule `leaf`
    bad_sub: str  # submodule pointing at a host that is not allowed
    escaping_link: str  # a symlink to /etc/passwd and one inside the repository
    private: str  # needs the server's token
    private_commit: str


def _new_work(src: Path, name: str) -> Path:
    work = src / name
    work.mkdir(parents=True)
    git("init", "-q", cwd=work)
    return work


def _commit_all(work: Path, message: str) -> str:
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", message, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def _publish(work: Path, bare: Path) -> None:
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", "--bare", str(work), str(bare))
    git("config", "uploadpack.allowFilter", "true", cwd=bare)


def _build_app(src: Path, root: Path) -> dict[str, str]:
    work = _new_work(src, "app")
    commits: dict[str, str] = {}
    (work / "README.md").write_text("app v0\n")
    commits["first"] = _commit_all(work, "first")
    (work / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (work / "run.sh").chmod(0o755)
    (work / "README.md").write_text("app v1\n")
    commits["v1.0"] = _commit_all(work, "v1")
    git("tag", "v1.0", cwd=work)
    (work / "README.md").write_text("app v2\n")
    commits["v2.0"] = _commit_all(work, "v2")
    git("tag", "-a", "v2.0", "-m", "release 2", cwd=work)
    git("checkout", "-q", "-b", "feature", cwd=work)
    (work / "feature.txt").write_text("feature\n")
    commits["feature"] = _commit_all(work, "feature")
    git("checkout", "-q", "main", cwd=work)
    (work / "README.md").write_text("app v3\n")
    commits["main"] = _commit_all(work, "v3")
    _publish(work, root / "public" / "app.git")
    git("update-ref", "refs/pull/1/head", commits["feature"], cwd=root / "public" / "app.git")
    return commits


def _build_submodules(src: Path, root: Path, server: GitHttpServer) -> None:
    for name, text in (("leaf", "leaf\n"), ("lib", "lib\n")):
        work = _new_work(src, name)
        (work / f"{name}.txt").write_text(text)
        if name == "lib":
            git("submodule", "add", "-q", server.url("public/leaf.git"), "leaf", cwd=work)
        _commit_all(work, name)
        _publish(work, root / "public" / f"{name}.git")
    work = _new_work(src, "super")
    (work / "super.txt").write_text("super\n")
    git("submodule", "add", "-q", server.url("public/lib.git"), "libs/lib", cwd=work)
    git("config", "-f", ".gitmodules", "submodule.libs/lib.url", "../lib.git", cwd=work)
    _commit_all(work, "super")
    _publish(work, root / "public" / "super.git")
    work = _new_work(src, "bad-sub")
    git("submodule", "add", "-q", server.url("public/lib.git"), "lib", cwd=work)
    git("config", "-f", ".gitmodules", "submodule.lib.url", "https://evil.example.invalid/lib.git", cwd=work)
    _commit_all(work, "bad submodule")
    _publish(work, root / "public" / "bad-sub.git")


def build_fixture_repos(server: GitHttpServer, scratch: Path) -> FixtureRepos:
    """Create every fixture repository under `server.root` (the server must be running)."""
    root = server.root
    src = scratch / "src"
    commits = _build_app(src, root)
    _build_submodules(src, root, server)
    links = _new_work(src, "links")
    (links / "inside.txt").write_text("inside\n")
    os.symlink("inside.txt", links / "good-link")
    os.symlink("/etc/passwd", links / "evil-link")
    os.symlink("../../outside", links / "evil-relative")
    os.symlink("/etc", links / "evil-dir")
    _commit_all(links, "links")
    _publish(links, root / "public" / "links.git")
    secret = _new_work(src, "secret")
    (secret / "secret.txt").write_text("private\n")
    private_commit = _commit_all(secret, "secret")
    _publish(secret, root / "private" / "secret.git")
    shutil.rmtree(src)
    return FixtureRepos(
        app="public/app.git", app_commits=commits, super="public/super.git", bad_sub="public/bad-sub.git",
        escaping_link="public/links.git", private="private/secret.git", private_commit=private_commit,
    )


def push_commit(server: GitHttpServer, repo: str, scratch: Path, *, message: str, branch: str = "main") -> str:
    """Add one commit to `branch` of a served repository (directly on the bare repo); returns it."""
    work = scratch / f"push-{time.monotonic_ns()}"
    git("clone", "-q", "--branch", branch, str(server.root / repo), str(work))
    (work / "pushed.txt").write_text(message + "\n")
    commit = _commit_all(work, message)
    git("push", "-q", "origin", f"HEAD:{branch}", cwd=work)
    shutil.rmtree(work)
    return commit
