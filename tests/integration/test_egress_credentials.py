"""Credential injection at the egress proxy, over real sockets: curl through the proxy to a loopback HTTPS service.

The service's certificate comes from a test CA that only the proxy trusts (`egress_upstream_ca_file`);
curl trusts only the proxy's own CA (the bundle a sandbox gets). The service records what it
receives: the real credential where a rule puts it, nothing else anywhere else.
"""

from __future__ import annotations

import base64
import os
import ssl
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.tls import TLSStream
from prometheus_client import generate_latest

from sandboxd.metrics import Metrics
from sandboxd.network.allowlist import EgressPolicy
from sandboxd.network.authority import CertificateAuthority, upstream_context
from sandboxd.network.broker import Grant
from sandboxd.network.channels import CA_BUNDLE, CA_VARIABLES, Channels, SandboxDoors
from sandboxd.network.credentials import CredentialRule, Credentials
from sandboxd.network.egress import EgressProxy, Injection, RefusalReason
from sandboxd.network.relay import relay
from tests.integration.git_server import GIT_ENV, git
from tests.integration.test_broker import make_socket_dir, port_of, serve_api
from tests.integration.test_egress_proxy import build_index
from tests.integration.tls_service import ServiceCa, TlsGitServer, TlsService, make_test_ca, serve_index, serve_tls

pytestmark = pytest.mark.anyio

SECRET = "real-secret-7f3a9c"
CLEAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LC_ALL": "C"}


@dataclass
class Setup:
    tmp: Path
    ca: ServiceCa
    service: TlsService  # the rule's host (localhost:<port>)
    other: TlsService  # a host without rules (127.0.0.1:<port>)
    secret_file: Path


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    ca = make_test_ca(tmp_path / "test-ca")
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET + "\n")
    with serve_tls(ca) as service, serve_tls(ca) as other:
        yield Setup(tmp_path, ca, service, other, secret_file)


def rules(setup: Setup) -> list[CredentialRule]:
    port = setup.service.port
    return [
        CredentialRule.parse(name="api", host="localhost", port=port, header="Authorization", format="bearer",
                             secret_file=setup.secret_file, placeholder_env="API_TOKEN"),
        CredentialRule.parse(name="custom", host="localhost", port=port, header="X-Api-Key", format="replace",
                             secret_file=setup.secret_file, placeholder_env="API_KEY"),
    ]


@dataclass
class Running:
    proxy: EgressProxy
    credentials: Credentials
    bundle: Path  # the proxy's CA, as a sandbox would trust it
    refusals: list[RefusalReason] = field(default_factory=list)
    injected: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.tcp_port}"

    def placeholder(self, rule: str, sandbox: str = "tcp") -> str:
        return self.credentials.placeholder(sandbox, rule)


@asynccontextmanager
async def proxy(setup: Setup, *, trust_service: bool = True, basic: bool = False,
                only: list[CredentialRule] | None = None) -> AsyncIterator[Running]:
    egress_dir = setup.tmp / "egress"
    authority = CertificateAuthority.load_or_create(egress_dir)
    chosen = rules(setup)
    if basic:
        chosen = [CredentialRule.parse(name="git", host="localhost", port=setup.service.port, header="Authorization",
                                       format="basic", secret_file=setup.secret_file, placeholder_env="GIT_TOKEN")]
    if only is not None:
        chosen = only
    credentials = Credentials(chosen, Credentials.load_key(egress_dir))
    injected: list[str] = []
    refusals: list[RefusalReason] = []
    injection = Injection(credentials, authority, upstream_context(setup.ca.cert_file if trust_service else None),
                          on_injected=injected.append)
    allowed = [f"localhost:{setup.service.port}", f"127.0.0.1:{setup.other.port}",
               *(f"localhost:{rule.port}" for rule in chosen)]
    egress = EgressProxy(EgressPolicy(allowed), tcp_port=0, on_refused=refusals.append, injection=injection)
    bundle = setup.tmp / "bundle.pem"
    bundle.write_bytes(authority.cert_pem)
    async with anyio.create_task_group() as tg:
        await tg.start(egress.serve)
        yield Running(egress, credentials, bundle, refusals, injected)
        tg.cancel_scope.cancel()


async def curl(running: Running, url: str, *args: str, cacert: Path | None = None) -> tuple[int, str, str]:
    """curl through the proxy: (exit status, response headers and body, stderr)."""
    command = ["curl", "-sS", "-i", "--max-time", "20", "--proxy", running.url,
               "--cacert", str(cacert or running.bundle), *args, url]
    result = await anyio.run_process(command, check=False, env=CLEAN_ENV)
    return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def only_request(service: TlsService) -> dict[str, str]:
    assert len(service.seen) == 1, service.seen
    return service.seen[0].headers


async def test_a_bearer_placeholder_becomes_the_real_token_and_is_never_echoed_back(setup: Setup) -> None:
    async with proxy(setup) as running:
        url = f"https://localhost:{setup.service.port}/private?x=1"
        status, out, err = await curl(running, url, "-H", f"Authorization: Bearer {running.placeholder('api')}")
    assert status == 0, err
    assert "HTTP/1.1 200" in out and '"path": "/private?x=1"' in out
    assert only_request(setup.service)["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in out  # X-Seen-Authorization was redacted on the way back
    assert "x-seen-authorization" not in out.lower()
    assert running.injected == ["api"]


async def test_a_custom_header_has_its_placeholder_replaced(setup: Setup) -> None:
    async with proxy(setup) as running:
        url = f"https://localhost:{setup.service.port}/"
        status, _, err = await curl(running, url, "-H", f"X-Api-Key: key={running.placeholder('custom')}")
    assert status == 0, err
    headers = only_request(setup.service)
    assert headers["x-api-key"] == f"key={SECRET}" and "authorization" not in headers
    assert running.injected == ["custom"]


async def test_basic_credentials_get_the_real_password_under_the_same_user(setup: Setup) -> None:
    async with proxy(setup, basic=True) as running:
        url = f"https://localhost:{setup.service.port}/repo.git/info/refs"
        status, out, err = await curl(running, url, "-u", f"x-access-token:{running.placeholder('git')}")
    assert status == 0, err
    sent = only_request(setup.service)["authorization"]
    assert sent == "Basic " + base64.b64encode(f"x-access-token:{SECRET}".encode()).decode()
    assert SECRET not in out and sent.split()[1] not in out


@pytest.mark.parametrize("value", ["Bearer my-own-token", "Basic dXNlcjpwYXNz", "Bearer {other}"])
async def test_the_rules_header_without_this_sandboxs_placeholder_is_stripped(setup: Setup, value: str) -> None:
    async with proxy(setup) as running:
        value = value.format(other=running.placeholder("api", sandbox="another-sandbox"))
        status, _, err = await curl(running, f"https://localhost:{setup.service.port}/", "-H",
                                    f"Authorization: {value}")
    assert status == 0, err
    assert "authorization" not in only_request(setup.service)
    assert running.injected == []


@pytest.mark.parametrize("where", ["header", "query"])
async def test_a_placeholder_anywhere_else_is_refused(setup: Setup, where: str) -> None:
    async with proxy(setup) as running:
        placeholder = running.placeholder("api")
        url = f"https://localhost:{setup.service.port}/" + (f"?token={placeholder}" if where == "query" else "")
        extra = ["-H", f"X-Token: {placeholder}"] if where == "header" else []
        status, out, err = await curl(running, url, *extra)
    assert status == 0, err
    assert "HTTP/1.1 403" in out and "placeholder" in out
    assert setup.service.seen == []
    assert running.refusals == [RefusalReason.PLACEHOLDER]


async def test_plain_http_with_a_placeholder_is_refused_and_without_one_carries_nothing(setup: Setup) -> None:
    with serve_api() as plain:
        setup_plain = f"127.0.0.1:{port_of(plain)}"
        async with proxy(setup) as running:
            egress = EgressProxy(EgressPolicy([setup_plain]), tcp_port=0, on_refused=running.refusals.append,
                                 injection=running.proxy.injection)
            async with anyio.create_task_group() as tg:
                await tg.start(egress.serve)
                plain_proxy = f"http://127.0.0.1:{egress.tcp_port}"
                placeholder = running.placeholder("api")
                for header in (f"Authorization: Bearer {placeholder}",
                               "Authorization: Basic " + base64.b64encode(f"u:{placeholder}".encode()).decode()):
                    result = await anyio.run_process(
                        ["curl", "-sS", "-i", "--proxy", plain_proxy, "-H", header, f"http://{setup_plain}/x"],
                        check=False, env=CLEAN_ENV)
                    assert b"HTTP/1.1 403" in result.stdout and b"placeholder" in result.stdout
                ok = await anyio.run_process(["curl", "-sS", "--proxy", plain_proxy, f"http://{setup_plain}/y"],
                                             check=False, env=CLEAN_ENV)
                tg.cancel_scope.cancel()
    assert ok.returncode == 0
    assert [(method, path, auth) for method, path, auth, _ in plain.seen] == [("GET", "/y", None)]
    assert running.refusals == [RefusalReason.PLACEHOLDER] * 2


async def test_a_host_without_rules_is_tunnelled_untouched(setup: Setup) -> None:
    async with proxy(setup) as running:
        placeholder = running.placeholder("api")
        # The service's own certificate (the test CA) verifies: the proxy did not intercept.
        status, out, err = await curl(running, f"https://127.0.0.1:{setup.other.port}/",
                                      "-H", f"Authorization: Bearer {placeholder}", cacert=setup.ca.cert_file)
    assert status == 0, err
    assert only_request(setup.other)["authorization"] == f"Bearer {placeholder}"
    assert SECRET not in str(setup.other.seen) and running.injected == []


async def test_an_upstream_the_proxy_does_not_trust_gets_nothing(setup: Setup) -> None:
    async with proxy(setup, trust_service=False) as running:
        status, out, err = await curl(running, f"https://localhost:{setup.service.port}/",
                                      "-H", f"Authorization: Bearer {running.placeholder('api')}")
    assert status == 0, err
    assert "HTTP/1.1 502" in out and "TLS to the upstream failed" in out
    assert setup.service.seen == [] and running.injected == []
    assert running.refusals == [RefusalReason.UPSTREAM_TLS]


async def test_a_client_that_does_not_trust_the_proxy_ca_sends_nothing(setup: Setup) -> None:
    async with proxy(setup) as running:
        status, _, _ = await curl(running, f"https://localhost:{setup.service.port}/",
                                  "-H", f"Authorization: Bearer {running.placeholder('api')}",
                                  cacert=setup.ca.cert_file)
    assert status != 0  # curl refuses the proxy's leaf: it is not the service's certificate
    assert setup.service.seen == []
    assert running.refusals == [RefusalReason.CLIENT_TLS]


async def raw_tls(running: Running, host: str, port: int, payload: bytes) -> bytes:
    """Open a CONNECT tunnel, speak TLS (trusting the proxy's CA) and send `payload`: what came back."""
    stream = await anyio.connect_tcp("127.0.0.1", running.proxy.tcp_port or 0)
    async with stream:
        await stream.send(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        assert (await stream.receive()).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cafile=str(running.bundle))
        tls = await TLSStream.wrap(stream, hostname=host, ssl_context=context, standard_compatible=False)
        await tls.send(payload)
        received = b""
        with anyio.move_on_after(10):
            try:
                while True:
                    received += await tls.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
        return received


@pytest.mark.parametrize(("payload", "reason"), [
    (b"GET / HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {p}\r\n\r\n", RefusalReason.HOST_MISMATCH),
    (b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n", RefusalReason.BAD_REQUEST),
    (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     RefusalReason.SMUGGLING),
])
async def test_requests_inside_a_terminated_tunnel_are_checked(setup: Setup, payload: bytes,
                                                               reason: RefusalReason) -> None:
    async with proxy(setup) as running:
        data = payload.replace(b"{p}", running.placeholder("api").encode())
        received = await raw_tls(running, "localhost", setup.service.port, data)
    assert received.startswith((b"HTTP/1.1 403", b"HTTP/1.1 400")), received
    assert setup.service.seen == [] and running.refusals == [reason]


async def test_pipelined_requests_are_each_checked_and_injected(setup: Setup) -> None:
    async with proxy(setup) as running:
        placeholder = running.placeholder("api")
        one = f"GET /1 HTTP/1.1\r\nHost: localhost:{setup.service.port}\r\nAuthorization: Bearer {placeholder}\r\n\r\n"
        two = "GET /2 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer mine\r\nConnection: close\r\n\r\n"
        received = await raw_tls(running, "localhost", setup.service.port, (one + two).encode())
    assert received.count(b"HTTP/1.1 200") == 2
    assert [(s.path, s.headers.get("authorization")) for s in setup.service.seen] == [
        ("/1", f"Bearer {SECRET}"), ("/2", None)]


async def test_a_rotated_secret_file_is_used_at_the_next_request(setup: Setup) -> None:
    async with proxy(setup) as running:
        header = f"Authorization: Bearer {running.placeholder('api')}"
        url = f"https://localhost:{setup.service.port}/"
        assert (await curl(running, url, "-H", header))[0] == 0
        setup.secret_file.write_text("rotated-secret\n")
        assert (await curl(running, url, "-H", header))[0] == 0
    assert [s.headers["authorization"] for s in setup.service.seen] == [f"Bearer {SECRET}", "Bearer rotated-secret"]


def test_the_ca_key_is_private_and_kept_across_restarts(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "egress")
    assert stat.S_IMODE((tmp_path / "egress" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "egress").stat().st_mode) == 0o700
    again = CertificateAuthority.load_or_create(tmp_path / "egress")
    assert again.cert_pem == first.cert_pem
    assert first.server_context("localhost") is first.server_context("localhost")  # cached
    assert list((tmp_path / "egress").glob(".leaf-*")) == []  # no leaf left on disk


def channels_for(setup: Setup, socket_dir: Path) -> Channels:
    channels = Channels.build(network_mode="none", socket_dir=socket_dir, base_url="http://127.0.0.1:9",
                              allowed_hosts=[f"localhost:{setup.service.port}"], audit=False,
                              credentials=rules(setup), egress_dir=setup.tmp / "egress",
                              upstream_ca_file=setup.ca.cert_file)
    assert channels is not None
    return channels


async def test_each_sandbox_gets_the_bundle_and_placeholders_of_its_own(setup: Setup) -> None:
    # Unix socket paths are short (~108 bytes); pytest's tmp_path on a CI machine is not.
    with tempfile.TemporaryDirectory(prefix="sbx-", dir="/tmp") as short:
        socket_dir = make_socket_dir(Path(short))
        await _each_sandbox_gets_its_own(setup, socket_dir)


async def _each_sandbox_gets_its_own(setup: Setup, socket_dir: Path) -> None:
    channels = channels_for(setup, socket_dir)
    env = channels.sandbox_env()
    assert {env[name] for name in CA_VARIABLES} == {f"/run/sandboxd/{CA_BUNDLE}"}
    one, two = channels.sandbox_env_for("sandboxd-one"), channels.sandbox_env_for("sandboxd-two")
    assert set(one) == {"API_TOKEN", "API_KEY"} and one["API_TOKEN"] != two["API_TOKEN"]
    assert one["API_TOKEN"].startswith("sandboxd-credential-api-")
    assert SECRET not in str(env) + str(one)
    metrics = Metrics()
    async with anyio.create_task_group() as tg:
        doors: SandboxDoors = await tg.start(channels.serve, metrics)
        door = await doors.open("sandboxd-one", None, lambda traffic: None)
        doors.grant(door, Grant("work_1", "env_1", "sesn_1", "p", "c"))
        bundle = socket_dir / "sandboxd-one" / CA_BUNDLE
        assert bundle.read_bytes().endswith(channels.injection.authority.cert_pem)  # type: ignore[union-attr]
        assert b"PRIVATE KEY" not in bundle.read_bytes()
        # curl in sandbox one, over its own egress.sock and with its bundle: its own placeholder is injected,
        # another sandbox's is not.
        url = f"https://localhost:{setup.service.port}/"
        await via_unix_socket(socket_dir / "sandboxd-one" / "egress.sock", url, bundle,
                              f"Authorization: Bearer {one['API_TOKEN']}")
        await via_unix_socket(socket_dir / "sandboxd-one" / "egress.sock", url, bundle,
                              f"Authorization: Bearer {two['API_TOKEN']}")
        tg.cancel_scope.cancel()
    assert [s.headers.get("authorization") for s in setup.service.seen] == [f"Bearer {SECRET}", None]
    text = generate(metrics)
    assert 'sandboxd_egress_credentials_injected_total{rule="api"} 1.0' in text
    assert 'sandboxd_egress_credentials_injected_total{rule="custom"} 0.0' in text


def generate(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


async def via_unix_socket(sock: Path, url: str, bundle: Path, header: str) -> None:
    """A TCP port relayed to `sock` (what the in-sandbox relay does), and curl through it."""
    async with anyio.create_task_group() as tg:
        port: Any = await tg.start(relay, "127.0.0.1", 0, str(sock))
        result = await anyio.run_process(["curl", "-sS", "--max-time", "20", "--proxy", f"http://127.0.0.1:{port}",
                                          "--cacert", str(bundle), "-H", header, url], check=False, env=CLEAN_ENV)
        assert result.returncode == 0, result.stderr
        tg.cancel_scope.cancel()



def seed_repository(root: Path, scratch: Path) -> Path:
    """A bare repository `private/repo.git` under `root` with one commit on main."""
    bare = root / "private" / "repo.git"
    git("init", "-q", "--bare", str(bare))
    git("clone", "-q", str(bare), str(scratch / "seed"))
    (scratch / "seed" / "README").write_text("seed\n")
    git("add", "README", cwd=scratch / "seed")
    git("commit", "-q", "-m", "seed", cwd=scratch / "seed")
    git("push", "-q", "origin", "HEAD:main", cwd=scratch / "seed")
    return bare


async def test_git_clones_and_pushes_with_its_placeholder_over_https(setup: Setup) -> None:
    root = setup.tmp / "git-root"
    bare = seed_repository(root, setup.tmp)
    with TlsGitServer(root, ca=setup.ca) as server:
        token_file = setup.tmp / "git-token"
        token_file.write_text(server.token)
        rule = CredentialRule.parse(name="git", host="localhost", port=server.port, header="Authorization",
                                    format="basic", secret_file=token_file, placeholder_env="GIT_TOKEN")
        async with proxy(setup, only=[rule]) as running:
            env = {**CLEAN_ENV, **GIT_ENV, "HTTPS_PROXY": running.url, "GIT_SSL_CAINFO": str(running.bundle),
                   "GIT_TERMINAL_PROMPT": "0"}
            url = f"https://x-access-token:{running.placeholder('git')}@localhost:{server.port}/private/repo.git"
            work = setup.tmp / "work"
            clone = await anyio.run_process(["git", "clone", "-q", url, str(work)], check=False, env=env)
            assert clone.returncode == 0, clone.stderr
            (work / "pushed.txt").write_text("from the sandbox\n")
            for args in (["add", "pushed.txt"], ["commit", "-q", "-m", "pushed"],
                         ["push", "-q", "origin", "HEAD:main"]):
                done = await anyio.run_process(["git", *args], cwd=work, check=False, env=env)
                assert done.returncode == 0, done.stderr
        requests = server.requests
    assert git("log", "-1", "--format=%s", "main", cwd=bare) == "pushed"
    expected = "Basic " + base64.b64encode(f"x-access-token:{server.token}".encode()).decode()
    sent = {r.headers.get("Authorization") for r in requests}
    assert sent <= {None, expected} and expected in sent
    assert any(r.path.endswith("git-receive-pack") and r.method == "POST" for r in requests)
    assert "sandboxd-credential" not in str(requests)
    assert running.injected and set(running.injected) == {"git"}


async def test_pip_downloads_from_a_private_index_with_its_placeholder(setup: Setup) -> None:
    root = setup.tmp / "index"
    build_index(root)
    with serve_index(root, setup.ca, SECRET) as index:
        port = int(index.server_address[1])
        rule = CredentialRule.parse(name="index", host="localhost", port=port, header="Authorization",
                                    format="basic", secret_file=setup.secret_file, placeholder_env="PIP_PASSWORD")
        async with proxy(setup, only=[rule]) as running:
            out = setup.tmp / "out"
            done = await anyio.run_process(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
                 "--isolated", "--retries", "0", "--timeout", "20", "--proxy", running.url, "--cert",
                 str(running.bundle), "--index-url",
                 f"https://user:{running.placeholder('index')}@localhost:{port}/simple/", "-d", str(out), "tinypkg"],
                check=False, env=CLEAN_ENV)
            assert done.returncode == 0, done.stdout + done.stderr
        seen = list(index.seen)
    assert [p.name for p in out.iterdir()] == ["tinypkg-1.0-py3-none-any.whl"]
    expected = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()
    assert seen.count(expected) >= 2  # the page and the wheel
    assert set(running.injected) == {"index"}
