"""The API broker for real: a unix socket forwarding to an HTTP server on 127.0.0.1.

The last test runs a `--network none` sandbox container with the socket directory bind-mounted:
it reaches the server through the socket, and cannot reach it directly.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from sandboxd.network.broker import ApiBroker, api_target

pytestmark = pytest.mark.anyio


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.active += 1
            self.server.peak = max(self.server.peak, self.server.active)
        try:
            if self.path.startswith("/slow"):
                time.sleep(0.2)
            body = json.dumps({"path": self.path, "host": self.headers.get("Host")}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with self.server.lock:
                self.server.active -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    lock: threading.Lock
    active: int
    peak: int


@contextmanager
def serve_api() -> Iterator[_Server]:
    """An HTTP server on 127.0.0.1 that answers with the path and Host it saw, and counts concurrency."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.lock, server.active, server.peak = threading.Lock(), 0, 0
    thread = threading.Thread(target=server.serve_forever, name="api-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def make_socket_dir(tmp_path: Path) -> Path:
    """A directory the sandbox user may enter (pytest's own are 0700)."""
    path = tmp_path / "sockets"
    path.mkdir()
    path.chmod(0o755)
    return path


@pytest.fixture
def api_server() -> Iterator[_Server]:
    with serve_api() as server:
        yield server


def port_of(server: _Server) -> int:
    return int(server.server_address[1])


@pytest.fixture
def socket_dir(tmp_path: Path) -> Path:
    return make_socket_dir(tmp_path)


def uds_client(path: Path) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=str(path)), timeout=10)


def test_api_target_from_base_url() -> None:
    assert api_target("https://api.anthropic.com") == ("api.anthropic.com", 443)
    assert api_target("http://127.0.0.1:8123") == ("127.0.0.1", 8123)
    assert api_target("http://localhost/") == ("localhost", 80)
    assert api_target("https://[::1]:9443/v1") == ("::1", 9443)
    with pytest.raises(ValueError):
        api_target("unix:///run/api.sock")
    broker = ApiBroker.for_base_url("http://127.0.0.1:8123", Path("/run/x.sock"), max_connections=2)
    assert (broker.host, broker.port, broker.socket_path) == ("127.0.0.1", 8123, Path("/run/x.sock"))


async def test_a_client_on_the_socket_gets_the_servers_answer(api_server: _Server, socket_dir: Path) -> None:
    path = socket_dir / "api.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(ApiBroker(path, "127.0.0.1", port_of(api_server)).serve)
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        async with uds_client(path) as client:
            response = await client.get("http://api.example.test/v1/environments?x=1")
        assert response.status_code == 200
        assert response.json() == {"path": "/v1/environments?x=1", "host": "api.example.test"}
        tg.cancel_scope.cancel()
    assert not path.exists(), "the socket is removed when the broker stops"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[_Server, ssl.SSLContext]]:
    """The same server over TLS with a throwaway certificate for api.sandbox.test, and a client context trusting it."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=api.sandbox.test", "-addext", "subjectAltName=DNS:api.sandbox.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    with serve_api() as server:
        server.socket = server_context.wrap_socket(server.socket, server_side=True)
        yield server, ssl.create_default_context(cafile=str(cert))


async def test_tls_goes_end_to_end_through_the_broker(
    tls_server: tuple[_Server, ssl.SSLContext], socket_dir: Path
) -> None:
    server, trust = tls_server
    path = socket_dir / "api.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(ApiBroker(path, "127.0.0.1", port_of(server)).serve)
        transport = httpx2.AsyncHTTPTransport(uds=str(path), verify=trust)
        async with httpx2.AsyncClient(transport=transport, timeout=10) as client:
            response = await client.get("https://api.sandbox.test/v1/sessions")
        assert response.json() == {"path": "/v1/sessions", "host": "api.sandbox.test"}
        # The certificate is checked against the name the client asked for, not the broker's target.
        transport = httpx2.AsyncHTTPTransport(uds=str(path), verify=trust)
        async with httpx2.AsyncClient(transport=transport, timeout=10) as client:
            with pytest.raises(httpx2.ConnectError, match="(?i)certificate|hostname"):
                await client.get("https://impostor.sandbox.test/")
        tg.cancel_scope.cancel()


async def test_connections_are_bounded(api_server: _Server, socket_dir: Path) -> None:
    path = socket_dir / "api.sock"
    results: list[int] = []
    async with anyio.create_task_group() as tg:
        await tg.start(ApiBroker(path, "127.0.0.1", port_of(api_server), max_connections=3).serve)

        async def fetch(n: int) -> None:
            async with uds_client(path) as client:
                results.append((await client.get(f"http://api/slow/{n}")).status_code)

        started = time.monotonic()
        async with anyio.create_task_group() as clients:
            for n in range(9):
                clients.start_soon(fetch, n)
        took = time.monotonic() - started
        tg.cancel_scope.cancel()
    assert results == [200] * 9
    assert 2 <= api_server.peak <= 3, "parallel, but never more than max_connections"
    assert took >= 0.55, "nine 0.2 s requests, three at a time, take three rounds"


async def test_a_stale_socket_is_replaced_and_a_live_one_is_not(api_server: _Server, socket_dir: Path) -> None:
    path = socket_dir / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays behind, nobody listens: what a killed daemon leaves
    assert stat.S_ISSOCK(path.stat().st_mode)
    async with anyio.create_task_group() as tg:
        await tg.start(ApiBroker(path, "127.0.0.1", port_of(api_server)).serve)
        async with uds_client(path) as client:
            assert (await client.get("http://api/again")).json()["path"] == "/again"
        with pytest.raises(OSError) as live:
            await ApiBroker(path, "127.0.0.1", port_of(api_server)).serve()
        assert live.value.errno == errno.EADDRINUSE
        tg.cancel_scope.cancel()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await ApiBroker(path, "127.0.0.1", port_of(api_server)).serve()
    assert path.read_text() == "not a socket"


async def test_an_unreachable_target_is_reported_and_closes_the_client(socket_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    errors: list[BaseException] = []
    path = socket_dir / "api.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(ApiBroker(path, "127.0.0.1", closed_port, on_error=errors.append).serve)
        async with uds_client(path) as client:
            with pytest.raises(httpx2.TransportError):
                await client.get("http://api/x")
        tg.cancel_scope.cancel()
    assert len(errors) == 1 and isinstance(errors[0], OSError)


# The probe run inside the sandbox: the API through the socket, then the same server directly.
PROBE = """
import json, socket, sys
port = int(sys.argv[1])
out = {"interfaces": sorted(name for _, name in socket.if_nameindex())}
s = socket.socket(socket.AF_UNIX)
s.connect("/run/sandboxd/api.sock")
s.sendall(b"GET /through-the-broker HTTP/1.0\\r\\nHost: api.sandbox.test\\r\\n\\r\\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
out["via_socket"] = data.decode().split("\\r\\n\\r\\n", 1)[-1]
try:
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    out["direct"] = "connected"
except OSError as exc:
    out["direct"] = type(exc).__name__
print(json.dumps(out))
"""


async def run_probe(image: str, socket_dir: Path, port: int, *runtime: str) -> dict[str, Any]:
    """Run PROBE in a `--network none` container as the sandbox user; return what it printed."""
    command = ["docker", "run", "--rm", "--network", "none", *runtime, "--user", "10001:10001",
               "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
               "--volume", f"{socket_dir}:/run/sandboxd:ro", "--entrypoint", "python3", image, "-c", PROBE, str(port)]
    done = await anyio.run_process(command, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


async def check_sandbox_reaches_only_the_socket(image: str, socket_dir: Path, server: _Server,
                                               *runtime: str) -> None:
    path = socket_dir / "api.sock"
    async with anyio.create_task_group() as tg:
        await tg.start(ApiBroker(path, "127.0.0.1", port_of(server)).serve)
        result = await run_probe(image, socket_dir, port_of(server), *runtime)
        tg.cancel_scope.cancel()
    assert json.loads(result["via_socket"]) == {"path": "/through-the-broker", "host": "api.sandbox.test"}
    assert result["direct"] in ("ConnectionRefusedError", "OSError", "TimeoutError"), result
    assert result["interfaces"] == ["lo"], result


@pytest.mark.docker
async def test_a_sandbox_without_a_network_reaches_the_api_only_through_the_socket(
    sandbox_image: str, socket_dir: Path, api_server: _Server
) -> None:
    assert os.geteuid() == 0 or os.access("/var/run/docker.sock", os.W_OK)
    await check_sandbox_reaches_only_the_socket(sandbox_image, socket_dir, api_server)
