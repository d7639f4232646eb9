"""TLS interception for credential injection: the two TLS ends of an intercepted tunnel, and its record.

Only the egress proxy uses this, and only for a CONNECT to a `host:port` with credential rules
(`credentials.py`): the client's TLS is terminated with a leaf of the proxy's CA (`authority.py`),
replaying the ClientHello the proxy already read and checked, and each request goes out on a TLS
connection of its own, verified against the system store and `egress_upstream_ca_file`. Kept apart
from `egress.py`, which decides and relays, so that what touches keys and certificates is in one place.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

from ..logs import log_within_budget
from .authority import CertificateAuthority
from .credentials import Credentials, Rewritten

log = logging.getLogger(__name__)

_TLS_ERRORS = (TimeoutError, ssl.SSLError, anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
               OSError)


class InterceptionFailed(Exception):
    """A TLS handshake of an intercepted tunnel failed; the message is the proxy's own short text."""


@dataclass(frozen=True)
class Injection:
    """What the proxy needs to inject credentials: the rules, its CA, how upstreams are verified."""

    credentials: Credentials
    authority: CertificateAuthority
    upstream_tls: ssl.SSLContext
    on_injected: Callable[[str], None] | None = None  # the rule's name, once per injected request

    async def accept(self, client: anyio.abc.ByteStream, hello: bytes, host: str,
                     timeout_seconds: float) -> TLSStream:
        """The client's TLS, terminated with a leaf for `host` (its already-read ClientHello replayed first)."""
        context = self.authority.server_context(host)
        try:
            with anyio.fail_after(timeout_seconds):
                return await TLSStream.wrap(Replayed(client, hello), server_side=True, ssl_context=context,
                                            standard_compatible=False)
        except _TLS_ERRORS as exc:
            raise InterceptionFailed(f"the TLS handshake failed ({type(exc).__name__})") from None

    async def connect(self, upstream: anyio.abc.ByteStream, host: str, timeout_seconds: float) -> TLSStream:
        """TLS over `upstream`, the certificate verified for `host`."""
        try:
            with anyio.fail_after(timeout_seconds):
                return await TLSStream.wrap(upstream, hostname=host, ssl_context=self.upstream_tls,
                                            standard_compatible=False)
        except _TLS_ERRORS as exc:
            detail = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else type(exc).__name__
            raise InterceptionFailed(f"TLS to the upstream failed ({detail})") from None

    def record(self, rewritten: Rewritten, host: str, sandbox: str, session: str) -> None:
        """Log (never a value) and count what a request had injected or stripped."""
        for rule in rewritten.injected:
            log_within_budget(log, logging.INFO, "egress_credential_injected host=%s rule=%s sandbox=%s session=%s",
                              host, rule, sandbox, session)
            if self.on_injected is not None:
                self.on_injected(rule)
        if rewritten.stripped:
            log_within_budget(log, logging.INFO, "egress_credential_stripped host=%s fields=%d sandbox=%s",
                              host, rewritten.stripped, sandbox)


class Replayed(anyio.abc.ByteStream):
    """A stream whose first bytes are ones already read from it (the checked ClientHello)."""

    def __init__(self, stream: anyio.abc.ByteStream, first: bytes) -> None:
        self._stream = stream
        self._first = first

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first[:max_bytes], self._first[max_bytes:]
            return data
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()
