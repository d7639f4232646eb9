"""The egress proxy's certificate authority: the CA that signs the leaf certificates of intercepted hosts.

Credentials are injected into HTTPS only by terminating TLS (`credentials.py`), so the proxy
presents a certificate for the host it intercepts, signed by a CA the sandboxes trust (their CA
bundle, `bundle`) and nobody else does. sandboxd makes that CA itself under `state_dir/egress/`
(`ca.key` 0600 in a 0700 directory, never mounted into a sandbox) unless the operator names one of
their own. Leaf certificates share one key made at start-up (kept in memory only), are made only
for hosts with credential rules, and are cached per host in a bounded cache. Rotation: delete
`state_dir/egress/ca.*` and restart the daemon (sandboxes started before then keep the old
bundle until they end), or point `egress_ca_cert_file`/`egress_ca_key_file` at another CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=7)
_LEAF_RENEW = datetime.timedelta(days=1)  # a cached leaf this close to its end is made again
MAX_LEAVES = 1024
_SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


class AuthorityError(Exception):
    """The CA cannot be loaded or made (reported as a configuration error)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CertificateAuthority:
    """Signs, and caches, one TLS server context per intercepted host."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                 work_dir: Path) -> None:
        self.cert = cert
        self._key = key
        self._work_dir = work_dir  # 0700: a leaf is written here for the moment ssl loads it
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: OrderedDict[str, tuple[ssl.SSLContext, datetime.datetime]] = OrderedDict()

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        """The CA kept in `directory` (`ca.crt`, `ca.key`), made there first if missing."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            cert_file, key_file = directory / "ca.crt", directory / "ca.key"
            if not (cert_file.exists() and key_file.exists()):
                cls._create(cert_file, key_file)
        except OSError as exc:
            raise AuthorityError(f"cannot keep the egress CA in {directory}: {exc.strerror or exc}") from None
        return cls.load(cert_file, key_file, directory)

    @classmethod
    def load(cls, cert_file: Path, key_file: Path, work_dir: Path) -> CertificateAuthority:
        """The CA of `cert_file` and its unencrypted PEM key `key_file`."""
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(work_dir, 0o700)
        except (OSError, ValueError, TypeError) as exc:
            raise AuthorityError(f"cannot load the egress CA {cert_file} / {key_file}: {exc}") from None
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise AuthorityError(f"{cert_file} is not a CA certificate (basicConstraints CA:TRUE)")
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise AuthorityError(f"{key_file}: the CA key must be EC or RSA")
        return cls(cert, key, work_dir)

    @staticmethod
    def _create(cert_file: Path, key_file: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandboxd egress CA"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sandboxd")])
        now = _now()
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem_key)
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        log.info("egress_ca_created cert=%s", cert_file)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for `host` (canonical) signed by this CA; cached."""
        cached = self._contexts.get(host)
        if cached is not None and cached[1] - _now() > _LEAF_RENEW:
            self._contexts.move_to_end(host)
            return cached[0]
        context, not_after = self._make_context(host)
        self._contexts[host] = (context, not_after)
        while len(self._contexts) > MAX_LEAVES:
            self._contexts.popitem(last=False)
        return context

    def _make_context(self, host: str) -> tuple[ssl.SSLContext, datetime.datetime]:
        now = _now()
        not_after = min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        issuer_key = self._key.public_key()
        leaf = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject).public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        pem = (leaf.public_bytes(serialization.Encoding.PEM)
               + self._leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # requests are parsed as HTTP/1.x: never h2
        with tempfile.NamedTemporaryFile(dir=self._work_dir, prefix=".leaf-", suffix=".pem") as file:
            file.write(pem)
            file.flush()
            context.load_cert_chain(file.name)
        log.info("egress_leaf_made host=%s not_after=%s", host, not_after.isoformat())
        return context, not_after


def system_roots() -> bytes:
    """The daemon host's trusted roots (PEM), for a sandbox bundle that trusts what it trusted before."""
    paths = [ssl.get_default_verify_paths().cafile, *_SYSTEM_BUNDLES]
    for path in paths:
        if path and os.path.isfile(path):
            try:
                return Path(path).read_bytes()
            except OSError:
                continue
    log.warning("egress_ca_bundle_without_system_roots (no system CA bundle found): sandboxes trust only the "
                "egress CA")
    return b""


def bundle(authority: CertificateAuthority, roots: bytes) -> bytes:
    """A sandbox's CA bundle: the system roots and the egress CA."""
    head = roots if not roots or roots.endswith(b"\n") else roots + b"\n"
    return head + b"# sandboxd egress CA\n" + authority.cert_pem


def upstream_context(ca_file: Path | None) -> ssl.SSLContext:
    """How the proxy verifies intercepted upstreams: the system store, plus `ca_file` when set."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise AuthorityError(f"`egress_upstream_ca_file` {ca_file}: {exc}") from None
    return context
