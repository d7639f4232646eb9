"""A loopback HTTPS service with a certificate from a test CA, recording each request's headers.

It stands for a private service a tool's credential is for (an API, a git host, a package index):
it answers every GET/POST with a JSON body naming the path, and echoes the Authorization it saw in
a response header (`X-Seen-Authorization`), so a test can check that the proxy redacts it on the
way back. The test CA is made here, with `cryptography`, and only the proxy is told to trust it.
"""

from __future__ import annotations

import base64
import datetime
import functools
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.git_server import GitHttpServer, _GitHandler, _GitServerImpl


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    all_headers: list[tuple[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: TlsService
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_POST(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with self.server.lock:
            self.server.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                         list(self.headers.items())))
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.headers.get("Authorization"):
            self.send_header("X-Seen-Authorization", self.headers["Authorization"])
        self.end_headers()
        self.wfile.write(body)


class TlsService(ThreadingHTTPServer):
    daemon_threads = True
    lock: threading.Lock
    seen: list[Seen]

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@dataclass(frozen=True)
class ServiceCa:
    cert_file: Path  # what the proxy is told to trust (egress_upstream_ca_file)
    server_pem: Path  # the service's certificate and key


def make_test_ca(directory: Path, names: tuple[str, ...] = ("localhost",)) -> ServiceCa:
    """A CA and a server certificate for `names` (and 127.0.0.1) signed by it, as PEM files in `directory`."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandboxd test service CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, server_pem = directory / "test-ca.pem", directory / "service.pem"
    cert_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ServiceCa(cert_file, server_pem)


@contextmanager
def serve_tls(ca: ServiceCa, host: str = "127.0.0.1") -> Iterator[TlsService]:
    """The service on `host`, a free port, with the certificate of `ca`."""
    server = TlsService((host, 0), _Handler)
    server.lock, server.seen = threading.Lock(), []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(ca.server_pem))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="tls-service", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class TlsGitServer(GitHttpServer):
    """The fixture git server (`git http-backend`; `/private/` needs Basic x-access-token:token) over HTTPS."""

    ca: ServiceCa | None = None

    def __enter__(self) -> TlsGitServer:
        assert self.ca is not None
        server = _GitServerImpl(("127.0.0.1", 0), _GitHandler)
        server.root, server.token, server.requests = self.root, self.token, []
        server.latency_seconds, server.bytes_per_second = self.latency_seconds, self.bytes_per_second
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.ca.server_pem))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._serve(server, "git-https")
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])


class _IndexHandler(SimpleHTTPRequestHandler):
    """A PEP 503 index that wants Basic `user:<the server's password>`, as a private registry does."""

    server: _Index

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        sent = self.headers.get("Authorization")
        self.server.seen.append(sent)
        expected = "Basic " + base64.b64encode(f"user:{self.server.password}".encode()).decode()
        if sent != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="index"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


class _Index(ThreadingHTTPServer):
    daemon_threads = True
    password: str
    seen: list[str | None]


@contextmanager
def serve_index(root: Path, ca: ServiceCa, password: str) -> Iterator[_Index]:
    """The files under `root` over HTTPS on 127.0.0.1 (any port), for Basic `user:password` only."""
    server = _Index(("127.0.0.1", 0), functools.partial(_IndexHandler, directory=str(root)))
    server.password, server.seen = password, []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(ca.server_pem))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="index-https", daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
