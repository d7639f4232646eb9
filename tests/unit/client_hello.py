"""TLS ClientHellos for the egress proxy's tests: real ones from OpenSSL, and hand-built ones to bend."""

from __future__ import annotations

import ssl

SERVER_NAME, ECH, ESNI, SUPPORTED_VERSIONS = 0, 0xFE0D, 0xFFCE, 43


def real_client_hello(server_name: str | None) -> bytes:
    """The first flight Python's ssl (OpenSSL) sends for `server_name` (None: no SNI at all)."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def sni_extension(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + len(name).to_bytes(2, "big") + name for name in names)
    return SERVER_NAME, len(entries).to_bytes(2, "big") + entries


def build_client_hello(server_name: str | None = "ok.example.com", *, extensions: list[tuple[int, bytes]] | None = None,
                       record_size: int = 16384, version: bytes = b"\x03\x01") -> bytes:
    """A minimal TLS 1.3-style ClientHello: `server_name` (if any), then `extensions`, split into records."""
    listed = ([sni_extension(server_name.encode())] if server_name is not None else []) + (extensions or [])
    listed.append((SUPPORTED_VERSIONS, b"\x02\x03\x04"))
    encoded = b"".join(kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data for kind, data in listed)
    body = (b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(encoded).to_bytes(2, "big") + encoded)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"".join(b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
                    for chunk in (message[i:i + record_size] for i in range(0, len(message), record_size)))
