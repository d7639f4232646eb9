"""The egress proxy for real, driven by the tools sandboxes use: curl, git and pip.

The proxy listens on 127.0.0.1 (TCP, for the host tools) and on a unix socket (for the sandbox).
Its allow-list names one loopback server by exact `127.0.0.1:port` (the only way an address on
loopback may pass); a second loopback server is not listed and must see no request at all. The
last test runs a `--network none` sandbox whose git reaches the allowed server only through the
in-sandbox relay and the unix socket.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandboxd.network.allowlist import EgressPolicy
from sandboxd.network.egress import Decision, EgressProxy, RefusalReason
from sandboxd.network.relay import relay
from tests.integration.conftest import GitFixture
from tests.integration.git_server import GIT_ENV
from tests.integration.test_broker import _Server, make_socket_dir, port_of, serve_api

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
CLEAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LC_ALL": "C"}


@dataclass
class RunningProxy:
    proxy: EgressProxy
    decisions: list[Decision] = field(default_factory=list)
    refusals: list[RefusalReason] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.tcp_port}"


@asynccontextmanager
async def egress(allowed: list[str], socket_path: Path | None = None, *, audit: bool = False,
                 **options: Any) -> AsyncIterator[RunningProxy]:
    decisions: list[Decision] = []
    refusals: list[RefusalReason] = []
    proxy = EgressProxy(EgressPolicy(allowed, audit=audit), socket_path, tcp_port=0, on_decision=decisions.append,
                        on_refused=refusals.append, **options)
    running = RunningProxy(proxy, decisions, refusals)
    async with anyio.create_task_group() as tg:
        await tg.start(running.proxy.serve)
        yield running
        tg.cancel_scope.cancel()


@pytest.fixture
def allowed_server() -> Iterator[_Server]:
    with serve_api() as server:
        yield server


@pytest.fixture
def other_server() -> Iterator[_Server]:
    with serve_api() as server:
        yield server


async def run(*command: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = await anyio.run_process(list(command), check=False, env={**CLEAN_ENV, **(env or {})})
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# --- curl: plain HTTP and CONNECT -----------------------------------------------------------------


async def test_curl_reaches_the_listed_server_and_is_refused_the_other(
    allowed_server: _Server, other_server: _Server
) -> None:
    allowed, other = port_of(allowed_server), port_of(other_server)
    async with egress([f"127.0.0.1:{allowed}"]) as running:
        code, out, err = await run("curl", "-sS", "-x", running.url, f"http://127.0.0.1:{allowed}/plain?q=1")
        assert code == 0, err
        assert json.loads(out) == {"path": "/plain?q=1", "host": f"127.0.0.1:{allowed}"}
        code, out, _ = await run("curl", "-sS", "-w", "\n%{http_code}", "-x", running.url,
                                 f"http://127.0.0.1:{other}/secret")
        body, status = out.rsplit("\n", 1)
        assert status == "403"
        assert body == f"sandboxd egress: 127.0.0.1:{other} refused: not in the allow-list\n"
        # HTTP_PROXY in the environment, as tools in a sandbox get it.
        code, out, err = await run("curl", "-sS", f"http://127.0.0.1:{allowed}/env",
                                   env={"http_proxy": running.url})
        assert code == 0 and json.loads(out)["path"] == "/env", err
    assert running.decisions == [Decision.ALLOWED, Decision.REFUSED, Decision.ALLOWED]
    assert other_server.peak == 0, "the refused server saw no request"


async def test_audit_mode_lets_curl_through_and_counts_it(other_server: _Server) -> None:
    other = port_of(other_server)
    async with egress(["pypi.org"], audit=True) as running:
        code, out, err = await run("curl", "-sS", "-x", running.url, f"http://127.0.0.1:{other}/audited")
        assert code == 0 and json.loads(out)["path"] == "/audited", err
    assert running.decisions == [Decision.AUDIT]


async def test_curl_tunnels_through_connect(allowed_server: _Server, other_server: _Server) -> None:
    allowed, other = port_of(allowed_server), port_of(other_server)
    async with egress([f"127.0.0.1:{allowed}"]) as running:
        code, out, err = await run("curl", "-sS", "--proxytunnel", "-x", running.url,
                                   f"http://127.0.0.1:{allowed}/tunnelled")
        assert code == 0, err
        assert json.loads(out)["path"] == "/tunnelled"
        code, _, err = await run("curl", "-sS", "--proxytunnel", "-x", running.url, f"http://127.0.0.1:{other}/")
        assert code != 0 and "403" in err
    assert running.decisions == [Decision.ALLOWED, Decision.REFUSED]
    assert other_server.peak == 0


@contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo on 127.0.0.1 that echoes until the client half-closes, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

    thread = threading.Thread(target=serve, name="echo", daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


async def test_a_connect_tunnel_carries_bytes_both_ways_and_half_closes(tmp_path: Path) -> None:
    with echo_server() as port:
        async with egress([f"127.0.0.1:{port}"], make_socket_dir(tmp_path) / "egress.sock") as running:
            assert running.proxy.socket_path is not None
            async with await anyio.connect_unix(running.proxy.socket_path) as stream:
                # The first tunnelled bytes ride in the same packet as the request head.
                await stream.send(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nping".encode())
                received = b""
                with anyio.fail_after(5):
                    while not received.endswith(b"ping"):
                        received += await stream.receive()
                    assert received == b"HTTP/1.1 200 Connection established\r\n\r\nping"
                    await stream.send(b" pong" * 10000)
                    await stream.send_eof()
                    rest = b""
                    while True:
                        try:
                            rest += await stream.receive()
                        except anyio.EndOfStream:
                            break
                assert rest == b" pong" * 10000


async def test_bad_requests_are_answered_400(allowed_server: _Server) -> None:
    async with egress([]) as running:
        code, out, _ = await run("curl", "-sS", "-w", "\n%{http_code}", f"{running.url}/not-a-proxy-request")
        assert out.rsplit("\n", 1)[1] == "400"
    assert running.decisions == []


# --- what the proxy checks, through the in-sandbox relay and the unix socket -------------------------


class _Recorder(BaseHTTPRequestHandler):
    """Answers every GET with the path and Host it saw, and records them."""

    server: _RecordingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        seen = {"path": self.path, "host": self.headers.get("Host")}
        with self.server.lock:
            self.server.seen.append(seen)
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.lock = threading.Lock()
        self.seen: list[dict[str, str | None]] = []
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is None:
            return super().finish_request(request, client_address)
        try:  # the handshake in the connection's own thread, so a refused tunnel blocks no one
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with tls:
            super().finish_request(tls, client_address)


@contextmanager
def recording_server(context: ssl.SSLContext | None = None) -> Iterator[_RecordingServer]:
    server = _RecordingServer(context)
    threading.Thread(target=server.serve_forever, name="recording-server", daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@asynccontextmanager
async def relayed(allowed: list[str], tmp_path: Path, **options: Any) -> AsyncIterator[tuple[RunningProxy, str]]:
    """The proxy on a unix socket, and the in-sandbox relay in front of it: (the proxy, the relay's proxy URL)."""
    async with egress(allowed, make_socket_dir(tmp_path) / "egress.sock", **options) as running:
        assert running.proxy.socket_path is not None
        async with anyio.create_task_group() as tg:
            port = await tg.start(relay, "127.0.0.1", 0, str(running.proxy.socket_path))
            yield running, f"http://127.0.0.1:{port}"
            tg.cancel_scope.cancel()


async def test_through_the_relay_every_plain_request_is_checked(tmp_path: Path) -> None:
    with recording_server() as server:
        allowed = server.server_address[1]
        origin = f"http://127.0.0.1:{allowed}"
        async with relayed([f"127.0.0.1:{allowed}"], tmp_path) as (running, relay_url):
            # One allowed address must not open every name behind it.
            code, out, _ = await run("curl", "-sS", "-w", "\n%{http_code}", "-x", relay_url,
                                     "-H", "Host: not-listed.example", f"{origin}/fronted")
            body, status = out.rsplit("\n", 1)
            assert status == "403" and "host_mismatch" in body
            # Two requests on one kept-alive connection: both decided, the second reuses the connection.
            code, out, err = await run("curl", "-sS", "-x", relay_url, "-w", "\n%{num_connects}\n",
                                       f"{origin}/one", f"{origin}/two")
            assert code == 0, err
            lines = out.splitlines()
            assert [json.loads(lines[0])["path"], json.loads(lines[2])["path"]] == ["/one", "/two"]
            assert (lines[1], lines[3]) == ("1", "0"), "the second request rode the same proxy connection"
            # Pipelined: the first request goes through, the second (another Host) is refused.
            answers = await anyio.to_thread.run_sync(
                exchange, relay_url, f"GET {origin}/first HTTP/1.1\r\nHost: 127.0.0.1:{allowed}\r\n\r\n"
                                     f"GET {origin}/second HTTP/1.1\r\nHost: not-listed.example\r\n\r\n".encode())
            assert answers.startswith(b"HTTP/1.1 200 ") and b'"/first"' in answers
            assert answers.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 403 Forbidden" in answers
    assert [seen["path"] for seen in server.seen] == ["/one", "/two", "/first"]
    assert running.decisions == [Decision.ALLOWED] * 3
    assert running.refusals == [RefusalReason.HOST_MISMATCH] * 2


def exchange(proxy_url: str, data: bytes) -> bytes:
    """Send `data` in one write to the proxy at `proxy_url`; what it answers until it closes (blocking)."""
    host, port = proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def handshake_without_sni(proxy_url: str, connect: bytes, cafile: Path) -> bool:
    """CONNECT, then a TLS handshake that sends no server name (blocking); whether it succeeded."""
    host, port = proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(connect)
        assert sock.recv(4096) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        context = ssl.create_default_context(cafile=cafile)
        context.check_hostname = False
        try:
            with context.wrap_socket(sock, server_hostname=None):
                return True
        except (ssl.SSLError, OSError):
            return False


@pytest.fixture
def tls_identity(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for `allowed.test`."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=allowed.test", "-addext", "subjectAltName=DNS:allowed.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_through_the_relay_a_tls_tunnel_must_name_the_connect_host(tmp_path: Path,
                                                                        tls_identity: tuple[Path, Path]) -> None:
    cert, key = tls_identity
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]  # allowed.test (and any other name) is this machine

    with recording_server(context) as server:
        port = server.server_address[1]
        async with relayed([f"allowed.test:{port}"], tmp_path, resolver=resolver) as (running, relay_url):
            code, out, err = await run("curl", "-sS", "--cacert", str(cert), "-x", relay_url,
                                       f"https://allowed.test:{port}/tls")
            assert code == 0, err
            assert json.loads(out) == {"path": "/tls", "host": f"allowed.test:{port}"}
            # Domain fronting: CONNECT to the allowed name, TLS (and Host) for another one.
            code, _, err = await run("curl", "-sS", "-k", "-x", relay_url, "--connect-to",
                                     f"fronted.test:{port}:allowed.test:{port}", f"https://fronted.test:{port}/")
            assert code != 0, "the tunnel was closed"
            # No SNI at all, and not TLS at all.
            connect = f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode()
            assert await anyio.to_thread.run_sync(handshake_without_sni, relay_url, connect, cert) is False
            answer = await anyio.to_thread.run_sync(exchange, relay_url, connect + b"GET / HTTP/1.1\r\n\r\n")
            assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert [seen["path"] for seen in server.seen] == ["/tls"]
    assert running.refusals == [RefusalReason.SNI_MISMATCH, RefusalReason.NO_SNI, RefusalReason.NOT_TLS]


# --- git over http through the proxy ----------------------------------------------------------------


def git_env(proxy_url: str) -> dict[str, str]:
    return {**GIT_ENV, "GIT_TERMINAL_PROMPT": "0", "http_proxy": proxy_url}


async def test_git_clones_through_the_proxy(git_fixture: GitFixture, tmp_path: Path) -> None:
    url = git_fixture.url(git_fixture.repos.app)
    async with egress([git_fixture.server.host]) as running:
        code, _, err = await run("git", "clone", "-q", url, str(tmp_path / "app"), env=git_env(running.url))
        assert code == 0, err
    assert (tmp_path / "app" / "README.md").read_text() == "app v3\n"
    assert running.decisions and set(running.decisions) == {Decision.ALLOWED}


async def test_git_to_a_server_not_listed_is_refused(git_fixture: GitFixture, tmp_path: Path) -> None:
    url = git_fixture.url(git_fixture.repos.app)
    before = len(git_fixture.server.requests)
    async with egress(["127.0.0.1:1"]) as running:
        code, _, err = await run("git", "clone", "-q", url, str(tmp_path / "app"), env=git_env(running.url))
    assert code != 0 and "403" in err
    assert running.decisions == [Decision.REFUSED]
    assert len(git_fixture.server.requests) == before


# --- pip against a PEP 503 index through the proxy -------------------------------------------------


def build_index(root: Path) -> None:
    """A simple index with one hand-built wheel: /simple/tinypkg/ -> /packages/tinypkg-1.0-py3-none-any.whl."""
    members = {
        "tinypkg/__init__.py": b"VALUE = 1\n",
        "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
        "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: sandboxd-tests\nRoot-Is-Purelib: true\n"
                                       b"Tag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip('=')},{len(data)}\n"
        for name, data in members.items()
    ) + "tinypkg-1.0.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in {**members, "tinypkg-1.0.dist-info/RECORD": record.encode()}.items():
            wheel.writestr(name, data)
    content = buffer.getvalue()
    name = "tinypkg-1.0-py3-none-any.whl"
    (root / "packages").mkdir(parents=True)
    (root / "packages" / name).write_bytes(content)
    (root / "simple" / "tinypkg").mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<html><body><a href="tinypkg/">tinypkg</a></body></html>\n')
    digest = hashlib.sha256(content).hexdigest()
    (root / "simple" / "tinypkg" / "index.html").write_text(
        f'<html><body><a href="/packages/{name}#sha256={digest}">{name}</a></body></html>\n')


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def package_index(tmp_path: Path) -> Iterator[int]:
    root = tmp_path / "index"
    build_index(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(root)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="index", daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


async def pip_download(index_port: int, proxy_url: str, dest: Path) -> tuple[int, str, str]:
    return await run(sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                     "--disable-pip-version-check", "--retries", "0", "--timeout", "10",
                     "--index-url", f"http://127.0.0.1:{index_port}/simple/", "--proxy", proxy_url,
                     "-d", str(dest), "tinypkg")


async def test_pip_downloads_through_the_proxy(package_index: int, tmp_path: Path) -> None:
    async with egress([f"127.0.0.1:{package_index}"]) as running:
        code, out, err = await pip_download(package_index, running.url, tmp_path / "out")
        assert code == 0, out + err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["tinypkg-1.0-py3-none-any.whl"]
    assert len(running.decisions) >= 2 and set(running.decisions) == {Decision.ALLOWED}  # the page, the wheel


async def test_pip_to_an_index_not_listed_is_refused(package_index: int, tmp_path: Path) -> None:
    async with egress(["pypi.org"]) as running:
        code, _, _ = await pip_download(package_index, running.url, tmp_path / "out")
    assert code != 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert running.decisions and set(running.decisions) == {Decision.REFUSED}


# --- a sandbox without a network: the relay, the unix socket, the proxy -----------------------------

SANDBOX_GIT = """
import json, sys
import anyio
from sandboxd.network.relay import relay

allowed, refused = sys.argv[1], sys.argv[2]
env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}

async def clone(url, dest, proxy):
    options = ["-c", f"http.proxy={proxy}"] if proxy else []
    done = await anyio.run_process(["git", *options, "clone", "-q", url, dest], check=False, env=env)
    return {"code": done.returncode, "stderr": done.stderr.decode()[-300:]}

async def main():
    async with anyio.create_task_group() as tg:
        port = await tg.start(relay, "127.0.0.1", 3128, "/run/sandboxd/egress.sock")
        proxy = f"http://127.0.0.1:{port}"
        out = {
            "via_proxy": await clone(allowed, "/tmp/via", proxy),
            "direct": await clone(allowed, "/tmp/direct", None),
            "refused": await clone(refused, "/tmp/refused", proxy),
        }
        out["readme"] = open("/tmp/via/README.md").read() if out["via_proxy"]["code"] == 0 else None
        print(json.dumps(out))
        tg.cancel_scope.cancel()

anyio.run(main)
"""


async def check_sandbox_clones_only_through_the_relay(image: str, git_fixture: GitFixture, other_server: _Server,
                                                     tmp_path: Path, *runtime: str) -> None:
    """In a `--network none` sandbox: git through the relay reaches the listed server, not the other; no
    proxy, no route."""
    socket_dir = make_socket_dir(tmp_path)
    allowed_url = git_fixture.url(git_fixture.repos.app)
    refused_url = f"http://127.0.0.1:{port_of(other_server)}/x.git"
    async with egress([git_fixture.server.host], socket_dir / "egress.sock") as running:
        command = ["docker", "run", "--rm", "--network", "none", *runtime, "--user", "10001:10001", "--read-only",
                   "--tmpfs", "/tmp:rw,mode=1777", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
                   "--volume", f"{socket_dir}:/run/sandboxd:ro", "--volume", f"{REPO / 'src'}:/opt/src:ro",
                   "--env", "PYTHONPATH=/opt/src", "--entrypoint", "python3", image,
                   "-c", SANDBOX_GIT, allowed_url, refused_url]
        done = await anyio.run_process(command, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert result["via_proxy"]["code"] == 0, result
    assert result["readme"] == "app v3\n"
    assert result["direct"]["code"] != 0, "no route out without the proxy"
    assert result["refused"]["code"] != 0 and "403" in result["refused"]["stderr"], result
    assert Decision.REFUSED in running.decisions and Decision.ALLOWED in running.decisions
    assert other_server.peak == 0


@pytest.mark.docker
async def test_a_sandbox_without_a_network_clones_only_through_the_relay(
    sandbox_image: str, git_fixture: GitFixture, other_server: _Server, tmp_path: Path
) -> None:
    await check_sandbox_clones_only_through_the_relay(sandbox_image, git_fixture, other_server, tmp_path)
