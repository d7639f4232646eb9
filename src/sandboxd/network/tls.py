"""The TLS ClientHello a CONNECT tunnel starts with, read far enough to learn the name it asks for.

The egress proxy checks a CONNECT to a name against its allow-list, but the server at the other
end picks the site from the ClientHello's `server_name` (SNI): one allowed name on a shared CDN or
ingress would open every site behind it if the tunnel carried any SNI. So the proxy reads the
client's first flight (bounded in size, and in time by its caller), takes the SNI from it and
compares it with the CONNECT host; the bytes read are then forwarded unchanged.

The parser is total: on any input it returns a `ClientHello`, None (not complete yet), or raises
`NotClientHello` (`HelloTooLarge` for one over the bound), and nothing else. It is strict where
leniency would let two readers disagree: a record that is not a handshake, a second `server_name`
extension (or a second host name in it), trailing bytes, or a truncated vector all refuse.
Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio.abc

__all__ = ["ClientHello", "HelloTooLarge", "MAX_HELLO_BYTES", "NotClientHello", "parse_client_hello",
           "read_client_hello"]

MAX_HELLO_BYTES = 16384  # a ClientHello with post-quantum key shares is ~2 KiB; 16 KiB is one full record
MAX_HELLO_RECORDS = 32  # TLS may split a ClientHello over records; clients use one (two for a huge one)
_RECORD_HEADER = 5
_MAX_RECORD = 1 << 14  # the largest TLSPlaintext fragment
_HANDSHAKE = 22  # record content type
_CLIENT_HELLO = 1  # handshake message type
_SERVER_NAME = 0  # extension type (RFC 6066)
_HOST_NAME = 0  # server name type
# Extensions that hide the real server name: ECH (RFC 9258 draft, 0xfe0d) and its predecessor ESNI.
_HIDDEN_NAME_EXTENSIONS = frozenset({0xFE0D, 0xFFCE})


class NotClientHello(ValueError):
    """The bytes are not (the start of) a TLS ClientHello this proxy accepts."""


class HelloTooLarge(NotClientHello):
    """No complete ClientHello within the size bound."""


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None  # the SNI host name as sent (ASCII, latin-1 decoded), or None without one
    hidden_name: bool = False  # carries encrypted_client_hello (or ESNI): the real name is not visible


def parse_client_hello(data: bytes, *, max_bytes: int = MAX_HELLO_BYTES) -> ClientHello | None:
    """The ClientHello at the start of `data`, or None while it is incomplete.

    Only the first `max_bytes` are looked at; a ClientHello that does not fit raises HelloTooLarge.
    Raises NotClientHello for anything else that is not a ClientHello.
    """
    message = _handshake_message(data[:max_bytes], max_bytes)
    if message is None:
        if len(data) >= max_bytes:
            raise HelloTooLarge("no complete ClientHello within the size bound")
        return None
    return _parse_hello(message)


async def read_client_hello(stream: anyio.abc.ByteStream, data: bytes = b"", *,
                            max_bytes: int = MAX_HELLO_BYTES) -> tuple[ClientHello, bytes]:
    """Receive until `data` holds a whole ClientHello; returns it and every byte received (to forward).

    Raises NotClientHello (or HelloTooLarge), and anyio.EndOfStream if the client closes first.
    The caller bounds the time.
    """
    while True:
        hello = parse_client_hello(data, max_bytes=max_bytes)
        if hello is not None:
            return hello, data
        data += await stream.receive(max_bytes - len(data))


def _handshake_message(data: bytes, max_bytes: int) -> bytes | None:
    """The body of the first handshake message, joined from its records; None while incomplete."""
    if data and data[0] != _HANDSHAKE:
        raise NotClientHello("not a TLS handshake record")
    payload = bytearray()
    position = records = 0
    while len(data) - position >= _RECORD_HEADER:
        if data[position] != _HANDSHAKE or data[position + 1] != 3:
            raise NotClientHello("not a TLS handshake record")
        length = int.from_bytes(data[position + 3:position + 5], "big")
        records += 1
        if not 0 < length <= _MAX_RECORD or records > MAX_HELLO_RECORDS:
            raise NotClientHello("bad TLS record")
        start = position + _RECORD_HEADER
        if len(data) - start < length:
            return None
        payload += data[start:start + length]
        position = start + length
        if len(payload) >= 4:
            if payload[0] != _CLIENT_HELLO:
                raise NotClientHello("the first handshake message is not a ClientHello")
            size = int.from_bytes(payload[1:4], "big")
            if size > max_bytes:
                raise HelloTooLarge("ClientHello larger than the size bound")
            if len(payload) >= 4 + size:
                return bytes(payload[4:4 + size])
    return None


class _Cursor:
    """Reads TLS's big-endian integers and length-prefixed vectors; NotClientHello past the end."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)  # slices share the message: no copies
        self._position = 0

    @property
    def done(self) -> bool:
        return self._position == len(self._data)

    def take(self, size: int) -> memoryview:
        end = self._position + size
        if end > len(self._data):
            raise NotClientHello("truncated ClientHello")
        chunk = self._data[self._position:end]
        self._position = end
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, *, minimum: int = 0, maximum: int = 1 << 24) -> _Cursor:
        body = self.take(self.uint(length_size))
        if not minimum <= len(body) <= maximum:
            raise NotClientHello("vector length out of range")
        return _Cursor(body)

    def rest(self) -> memoryview:
        return self.take(len(self._data) - self._position)


def _parse_hello(message: bytes) -> ClientHello:
    hello = _Cursor(message)
    hello.take(2 + 32)  # legacy_version, random
    hello.vector(1, maximum=32)  # legacy_session_id
    if len(hello.vector(2, minimum=2).rest()) % 2:  # cipher_suites: two bytes each
        raise NotClientHello("odd cipher_suites length")
    hello.vector(1, minimum=1)  # legacy_compression_methods
    if hello.done:
        return ClientHello(None)  # no extensions at all (TLS 1.0-1.2 allow it)
    extensions = hello.vector(2)
    if not hello.done:
        raise NotClientHello("bytes after the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    while not extensions.done:
        kind = extensions.uint(2)
        body = extensions.vector(2)
        if kind in seen:
            raise NotClientHello("an extension appears twice")
        seen.add(kind)
        if kind == _SERVER_NAME:
            server_name = _server_name(body)
    return ClientHello(server_name, hidden_name=not seen.isdisjoint(_HIDDEN_NAME_EXTENSIONS))


def _server_name(extension: _Cursor) -> str:
    """The one host_name of a server_name extension (RFC 6066 section 3)."""
    names = extension.vector(2, minimum=1)
    if not extension.done:
        raise NotClientHello("bytes after the server name list")
    found: str | None = None
    while not names.done:
        if names.uint(1) != _HOST_NAME or found is not None:
            raise NotClientHello("a server name that is not one host name")
        found = bytes(names.vector(2, minimum=1).rest()).decode("latin-1")
    if found is None:  # cannot happen: the list is not empty
        raise NotClientHello("empty server name list")
    return found
