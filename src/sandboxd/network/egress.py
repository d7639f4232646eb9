"""The egress proxy: the only way out of a sandbox, and only to what the operator allowed.

Sandboxes have no network; their tools use `HTTP_PROXY`/`HTTPS_PROXY`, which the in-sandbox relay
(`relay.py`) carries over a bind-mounted unix socket to this proxy in the daemon. It speaks the
HTTP proxy protocol: `CONNECT host:port` tunnels (TLS stays end to end) and absolute-form plain
HTTP requests. Every decision is taken before any connect, in this order: the name must be on the
allow-list (`allowlist.py`); it is resolved once; *every* resolved address must pass
`addresses.refusal` unless an explicit `host:port` entry names that endpoint; and the proxy then
connects to one of those same checked addresses, never resolving again, so a rebinding DNS answer
cannot swap the target. Audit mode lets refusals through, logged and counted as `audit`.

What is forwarded must be what was checked. Plain HTTP is parsed and framed request by request
(`http1.py`): the Host header must name the checked target, the body framing must be unambiguous,
and each request on a kept-alive connection is decided afresh and gets its own upstream
connection. A CONNECT to a name carries TLS whose ClientHello names that same host (`tls.py`).
Every refusal is logged and reported to `on_refused` with its `RefusalReason`.

Credentials (`credentials.py`): a CONNECT to a host:port with credential rules is not spliced but
terminated (`interception.py`), with a leaf certificate of the proxy's CA (`authority.py`) for the
name the CONNECT and the SNI agree on. Each request inside is parsed like plain HTTP (`parse_tunnelled`: origin form,
Host must name that host), rewritten (this sandbox's placeholder swapped for the real value, the
rule's header without it dropped, a placeholder elsewhere refused) and sent on its own TLS
connection, verified against the system store (and `egress_upstream_ca_file`), to a checked
address. Hosts without rules stay end-to-end tunnels. Plain HTTP is never injected: a plain request
that shows a placeholder is refused (`placeholder`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import anyio
import anyio.abc

from ..logs import log_within_budget
from .addresses import refusal
from .allowlist import EgressPolicy, is_ip_literal, normalise_host
from .broker import Door
from .credentials import CredentialRule, CredentialUnavailable, PlaceholderMisuse, carries_placeholder
from .http1 import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    AmbiguousFraming,
    BadRequest,
    ClientGone,
    Exchange,
    HeadTooLarge,
    HostMismatch,
    ProxyRequest,
    UpstreamFailed,
    answer,
    parse_request,
    parse_tunnelled,
    read_head,
    receive_some,
)
from .interception import Injection, InterceptionFailed
from .sockets import serve_connections, splice, unix_listener
from .tls import MAX_HELLO_BYTES, ClientHello, HelloTooLarge, NotClientHello, read_client_hello

__all__ = ["BadRequest", "Decision", "EgressGate", "EgressPolicy", "EgressProxy", "Injection", "ProxyRequest",
           "RefusalReason", "Verdict", "parse_request"]

log = logging.getLogger(__name__)

_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)

# (host, port) -> addresses, in preference order. Raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# (address, port) -> a connected stream.
Connector = Callable[[str, int], Awaitable[anyio.abc.ByteStream]]


class Decision(StrEnum):
    """The `decision` label of sandboxd_egress_requests_total."""

    ALLOWED = "allowed"
    REFUSED = "refused"
    AUDIT = "audit"


class RefusalReason(StrEnum):
    """Why the proxy refused a request or a tunnel: a bounded set, fit for a metric label."""

    NOT_ALLOWED = "not_allowed"  # the name, or the port, is not on the allow-list (403)
    ADDRESS = "address"  # the name resolves to, or is, an address on the refusal list (403)
    UNRESOLVED = "unresolved"  # the name does not resolve (502)
    BAD_REQUEST = "bad_request"  # malformed, or not a proxy request (400)
    TOO_LARGE = "too_large"  # a head over the size bound or with too many fields (431); a ClientHello too large
    SMUGGLING = "smuggling"  # ambiguous or invalid body framing: CL and TE, a bad CL, TE not chunked, bad chunks (400)
    HOST_MISMATCH = "host_mismatch"  # the Host header names another host or port, or appears twice (403)
    HEADER_TIMEOUT = "header_timeout"  # the request head did not arrive in time (408)
    NOT_TLS = "not_tls"  # a CONNECT to a name whose first bytes are not a TLS ClientHello
    NO_SNI = "no_sni"  # a ClientHello without server_name
    SNI_MISMATCH = "sni_mismatch"  # a ClientHello naming another host than the CONNECT
    HIDDEN_SNI = "hidden_sni"  # a ClientHello with encrypted_client_hello (or ESNI): the real name is hidden
    HELLO_TIMEOUT = "hello_timeout"  # the ClientHello did not arrive in time
    PLACEHOLDER = "placeholder"  # a credential placeholder where it is not injected: plain HTTP, another header (403)
    UPSTREAM_TLS = "upstream_tls"  # an intercepted host's certificate did not verify (502)
    CLIENT_TLS = "client_tls"  # the TLS handshake of an intercepted tunnel failed (the client distrusts our CA?)


_STATUS = {RefusalReason.TOO_LARGE: 431, RefusalReason.HOST_MISMATCH: 403, RefusalReason.HEADER_TIMEOUT: 408,
           RefusalReason.PLACEHOLDER: 403}



@dataclass(frozen=True)
class Verdict:
    """What the proxy decided for one request, and the checked addresses it may connect to."""

    decision: Decision
    host: str
    port: int
    addresses: tuple[str, ...] = ()
    reason: str = ""
    status: int = 200  # the HTTP status a refusal is answered with (403, or 502 for a name that does not resolve)
    refused_for: RefusalReason | None = None  # set on a refusal


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to for a TCP connection, in the resolver's order, without duplicates."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def connect(address: str, port: int) -> anyio.abc.ByteStream:
    return await anyio.connect_tcp(address, port)


class EgressGate:
    """Decides one `host:port` request; logs it and reports it to `on_decision`. Never connects."""

    def __init__(self, policy: EgressPolicy, *, resolver: Resolver = resolve,
                 on_decision: Callable[[Decision], None] | None = None) -> None:
        self.policy = policy
        self._resolver = resolver
        self._on_decision = on_decision

    async def decide(self, host: str, port: int) -> Verdict:
        """The verdict for `host:port`; raises ValueError for a host that is not a name or IP literal."""
        canonical = normalise_host(host)
        if canonical is None:
            raise ValueError(f"invalid host {host!r}")
        host = canonical
        verdict = await self._judge(host, port)
        if verdict.decision is Decision.ALLOWED:
            log_within_budget(log, logging.INFO, "egress_allowed host=%s port=%d address=%s", host, port,
                              verdict.addresses[0])
        elif verdict.decision is Decision.AUDIT:
            log_within_budget(log, logging.WARNING, "egress_audit host=%s port=%d address=%s reason=%s",
                              host, port, verdict.addresses[0], verdict.reason)
        else:
            log_within_budget(log, logging.WARNING, "egress_refused host=%s port=%d reason=%s", host, port,
                              verdict.reason)
        if self._on_decision is not None:
            self._on_decision(verdict.decision)
        return verdict

    async def _judge(self, host: str, port: int) -> Verdict:
        rule = self.policy.rule_for(host, port)
        problem = None if rule is not None else "not in the allow-list"
        if problem and not self.policy.audit:
            return Verdict(Decision.REFUSED, host, port, reason=problem, status=403,
                           refused_for=RefusalReason.NOT_ALLOWED)
        try:
            addresses = tuple(dict.fromkeys(await self._addresses(host, port)))
        except OSError as exc:
            return Verdict(Decision.REFUSED, host, port, reason=f"does not resolve ({exc})", status=502,
                           refused_for=RefusalReason.UNRESOLVED)
        if not addresses:
            return Verdict(Decision.REFUSED, host, port, reason="does not resolve", status=502,
                           refused_for=RefusalReason.UNRESOLVED)
        if problem is None and not (rule is not None and rule.explicit):
            # Every address, not the first: a name with one public and one internal address is refused.
            for address in addresses:
                try:
                    why = refusal(address)
                except ValueError:
                    why = "not an IP address"
                if why is not None:
                    problem = f"resolves to {address} ({why})"
                    break
        if problem is None:
            return Verdict(Decision.ALLOWED, host, port, addresses)
        if self.policy.audit:
            return Verdict(Decision.AUDIT, host, port, addresses, reason=problem)
        return Verdict(Decision.REFUSED, host, port, reason=problem, status=403, refused_for=RefusalReason.ADDRESS)

    async def _addresses(self, host: str, port: int) -> Sequence[str]:
        if is_ip_literal(host):
            return [host]  # checked like any resolved address
        return await self._resolver(host, port)


class EgressProxy:
    """The allow-list proxy, served on a unix socket and, for tests, optionally on a loopback TCP port.

    `handle(client)` serves one client connection; `serve()` listens and calls it for each. Bounds
    per connection: `header_timeout_seconds` to receive a whole request head, `idle_timeout_seconds`
    between requests on a kept-alive connection, `hello_timeout_seconds` for a tunnel's ClientHello;
    `max_head_bytes` and `max_headers` per request head, `max_hello_bytes` per ClientHello.
    """

    def __init__(self, policy: EgressPolicy, socket_path: Path | None = None, *, tcp_port: int | None = None,
                 resolver: Resolver = resolve, connector: Connector = connect,
                 on_decision: Callable[[Decision], None] | None = None,
                 on_refused: Callable[[RefusalReason], None] | None = None, max_connections: int = 256,
                 connect_timeout_seconds: float = 10.0, header_timeout_seconds: float = 10.0,
                 idle_timeout_seconds: float = 60.0, hello_timeout_seconds: float = 10.0,
                 max_head_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADERS,
                 max_hello_bytes: int = MAX_HELLO_BYTES, injection: Injection | None = None,
                 tcp_sandbox: str = "tcp") -> None:
        if socket_path is None and tcp_port is None:
            raise ValueError("the egress proxy needs a socket path or a TCP port")
        self.gate = EgressGate(policy, resolver=resolver, on_decision=on_decision)
        self.socket_path = socket_path
        self.tcp_port = tcp_port  # after start-up: the bound port (tcp_port=0 picks a free one)
        self._connector = connector
        self._on_refused = on_refused
        self._max_connections = max_connections
        self._connect_timeout_seconds = connect_timeout_seconds
        self._header_timeout_seconds = header_timeout_seconds
        self._idle_timeout_seconds = idle_timeout_seconds
        self._hello_timeout_seconds = hello_timeout_seconds
        self._max_head_bytes = max_head_bytes
        self._max_headers = max_headers
        self._max_hello_bytes = max_hello_bytes
        self.injection = injection
        self._tcp_sandbox = tcp_sandbox  # the sandbox name (placeholders) of clients on the TCP port (tests)

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, report started, and serve until cancelled; the socket file is removed on exit."""
        async with anyio.create_task_group() as tg:
            if self.socket_path is not None:
                await tg.start(self._serve_unix, self.socket_path, name="egress-unix")
            if self.tcp_port is not None:
                await tg.start(self._serve_tcp, self.tcp_port, name="egress-tcp")
            log.info("egress_proxy_listening socket=%s tcp_port=%s audit=%s rules=%d", self.socket_path,
                     self.tcp_port, self.gate.policy.audit, len(self.gate.policy.rules))
            task_status.started()

    async def _serve_unix(self, path: Path, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with unix_listener(path) as listener:
            task_status.started()
            await serve_connections(listener, self.handle, max_connections=self._max_connections, name="egress")

    async def _serve_tcp(self, port: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        listeners = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        async with listeners:
            listener = listeners.listeners[0]  # 127.0.0.1 binds exactly one
            assert isinstance(listener, anyio.abc.SocketListener)
            self.tcp_port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started()
            await serve_connections(listener, self.handle, max_connections=self._max_connections, name="egress")

    async def handle(self, client: anyio.abc.ByteStream, door: Door | None = None) -> None:
        """Serve one client connection: plain HTTP requests, each checked and forwarded in turn, or one tunnel.

        `door` is the sandbox whose socket it came in on (None: the TCP port). Returns when the
        connection is done (the caller closes it); a client or upstream that breaks off ends it
        quietly, without raising.
        """
        try:
            await self._serve_client(client, door)
        except (anyio.EndOfStream, *_STREAM_ERRORS) as exc:
            log.debug("egress_connection_broken error=%r", exc)

    async def _serve_client(self, client: anyio.abc.ByteStream, door: Door | None) -> None:
        buffered: bytes | None = b""
        first = True
        while buffered is not None:
            head = await self._next_head(client, buffered, first)
            if head is None:
                return
            try:
                request = parse_request(head[0], max_head_bytes=self._max_head_bytes, max_headers=self._max_headers)
            except BadRequest as exc:
                await self._refuse_request(client, exc)
                return
            if request.method == "CONNECT":
                await self._tunnel(client, request, head[1], door)
                return
            buffered = await self._forward(client, request, head[1])
            first = False

    async def _next_head(self, client: anyio.abc.ByteStream, buffered: bytes,
                         first: bool) -> tuple[bytes, bytes] | None:
        """The next request head and the bytes after it; None (a refusal answered) when there is none to serve."""
        buffered = buffered.lstrip(b"\r\n")  # empty lines between requests are not a request (RFC 9112 2.2)
        if not buffered and not first:
            with anyio.move_on_after(self._idle_timeout_seconds):
                buffered = await receive_some(client)
            if not buffered:
                return None  # closed, or idle too long: a kept-alive connection ends quietly
        try:
            with anyio.fail_after(self._header_timeout_seconds):
                return await read_head(client, buffered, max_bytes=self._max_head_bytes)
        except TimeoutError:
            self._refused(RefusalReason.HEADER_TIMEOUT, None, None, "the request head did not arrive in time")
            await answer(client, 408, "refused (header_timeout): the request head did not arrive in time")
        except BadRequest as exc:  # HeadTooLarge
            await self._refuse_request(client, exc)
        except _STREAM_ERRORS:
            pass
        return None

    async def _forward(self, client: anyio.abc.ByteStream, request: ProxyRequest, buffered: bytes) -> bytes | None:
        """Forward one plain HTTP request and relay its response: what the client sent next, or None to close."""
        try:
            exchange = Exchange(client, request, buffered, max_head_bytes=self._max_head_bytes)
        except BadRequest as exc:
            await self._refuse_request(client, exc)
            return None
        if carries_placeholder(request.target) or any(carries_placeholder(v) for _, v in request.fields):
            self._refused(RefusalReason.PLACEHOLDER, request.host, request.port,
                          "plain HTTP never carries a credential")
            await answer(client, 403, "refused (placeholder): credentials are only injected into HTTPS to their host")
            return None
        verdict = await self._decide(client, request)
        upstream = await self._open(client, verdict) if verdict is not None else None
        if upstream is None:
            return None
        return await self._relay(client, request, exchange, upstream)

    async def _relay(self, client: anyio.abc.ByteStream, request: ProxyRequest, exchange: Exchange,
                     upstream: anyio.abc.ByteStream) -> bytes | None:
        """Relay one request and its response: what the client sent next, or None to close."""
        async with upstream:
            try:
                await exchange.relay(upstream)
            except BadRequest as exc:  # the body's framing
                await self._refuse_request(client, exc, respond=not exchange.answered)
                return None
            except UpstreamFailed as exc:
                log.warning("egress_upstream_failed host=%s port=%d error=%s", request.host, request.port, exc)
                if not exchange.answered:
                    await answer(client, 502, f"{request.host}:{request.port} sent no valid HTTP/1.x response")
                return None
            except ClientGone:
                return None
        return exchange.leftover

    async def _tunnel(self, client: anyio.abc.ByteStream, request: ProxyRequest, buffered: bytes,
                      door: Door | None) -> None:
        """A CONNECT: decided and connected; to a name, the ClientHello is checked before any byte goes up."""
        verdict = await self._decide(client, request)
        opt_in = door.credential_opt_in if door is not None else frozenset()
        rules = self.injection.credentials.rules_for(request.host, request.port, opt_in) if self.injection else ()
        if verdict is not None and rules:
            await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            checked = await self._checked_hello(client, request, buffered)
            if checked is not None:
                await self._intercept(client, verdict, rules, checked, door)
            return
        upstream = await self._open(client, verdict) if verdict is not None else None
        if upstream is None:
            return
        async with upstream:
            await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if not is_ip_literal(request.host):  # an address was checked itself: there is no name to compare
                checked = await self._checked_hello(client, request, buffered)
                if checked is None:
                    return
                buffered = checked
            if buffered:
                await upstream.send(buffered)
            await splice(client, upstream)

    async def _intercept(self, client: anyio.abc.ByteStream, verdict: Verdict, rules: tuple[CredentialRule, ...],
                         buffered: bytes, door: Door | None) -> None:
        """A tunnel to a host with credential rules: TLS terminated here, each request checked and rewritten."""
        assert self.injection is not None
        try:
            tls = await self.injection.accept(client, buffered, verdict.host, self._hello_timeout_seconds)
        except InterceptionFailed as exc:
            self._refused(RefusalReason.CLIENT_TLS, verdict.host, verdict.port, str(exc))
            return
        pending: bytes | None = b""
        first = True
        try:
            while pending is not None:
                head = await self._next_head(tls, pending, first)
                if head is None:
                    return
                try:
                    request = parse_tunnelled(head[0], verdict.host, verdict.port,
                                              max_head_bytes=self._max_head_bytes, max_headers=self._max_headers)
                except BadRequest as exc:
                    await self._refuse_request(tls, exc)
                    return
                pending = await self._inject(tls, request, head[1], verdict, rules, door)
                first = False
        finally:
            with anyio.CancelScope(shield=True):
                await tls.aclose()

    async def _inject(self, client: anyio.abc.ByteStream, request: ProxyRequest, buffered: bytes, verdict: Verdict,
                      rules: tuple[CredentialRule, ...], door: Door | None) -> bytes | None:
        """One request inside an intercepted tunnel, its credential injected; what the client sent next, or None."""
        assert self.injection is not None
        sandbox = door.name if door is not None else self._tcp_sandbox
        try:
            rewritten = self.injection.credentials.rewrite(request.fields, request.target, rules, sandbox)
        except PlaceholderMisuse as exc:
            self._refused(RefusalReason.PLACEHOLDER, request.host, request.port, str(exc))
            await answer(client, 403, f"refused (placeholder): {exc}")
            return None
        except CredentialUnavailable as exc:
            log.error("egress_credential_unavailable host=%s error=%s", request.host, exc)
            await answer(client, 502, "the credential for this host is not available")
            return None
        try:
            exchange = Exchange(client, request, buffered, max_head_bytes=self._max_head_bytes,
                                outgoing=rewritten.fields, redact=rewritten.redact)
        except BadRequest as exc:
            await self._refuse_request(client, exc)
            return None
        upstream = await self._open_tls(client, verdict)
        if upstream is None:
            return None
        session = door.grant.session_id if door is not None and door.grant is not None else "-"
        self.injection.record(rewritten, request.host, sandbox, session)
        return await self._relay(client, request, exchange, upstream)

    async def _open_tls(self, client: anyio.abc.ByteStream, verdict: Verdict) -> anyio.abc.ByteStream | None:
        """A verified TLS connection to a checked address of an intercepted host; None when refused (answered)."""
        assert self.injection is not None
        upstream = await self._open(client, verdict)
        if upstream is None:
            return None
        try:
            return await self.injection.connect(upstream, verdict.host, self._connect_timeout_seconds)
        except InterceptionFailed as exc:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
            self._refused(RefusalReason.UPSTREAM_TLS, verdict.host, verdict.port, str(exc))
            await answer(client, 502, f"{verdict.host}:{verdict.port}: {exc}")
            return None

    async def _checked_hello(self, client: anyio.abc.ByteStream, request: ProxyRequest,
                             buffered: bytes) -> bytes | None:
        """The client's first bytes, a ClientHello naming the CONNECT host; None when refused or gone."""
        try:
            with anyio.fail_after(self._hello_timeout_seconds):
                hello, data = await read_client_hello(client, buffered, max_bytes=self._max_hello_bytes)
        except TimeoutError:
            reason = RefusalReason.HELLO_TIMEOUT
        except HelloTooLarge:
            reason = RefusalReason.TOO_LARGE
        except NotClientHello:
            reason = RefusalReason.NOT_TLS
        except (anyio.EndOfStream, *_STREAM_ERRORS):
            return None
        else:
            problem = _sni_problem(hello, request.host)
            if problem is None:
                return data
            reason = problem
        self._refused(reason, request.host, request.port, "the tunnel is closed")
        return None

    async def _decide(self, client: anyio.abc.ByteStream, request: ProxyRequest) -> Verdict | None:
        """The gate's verdict on the target; None when it refuses (answered, and counted: the gate logged it)."""
        verdict = await self.gate.decide(request.host, request.port)
        if verdict.decision is not Decision.REFUSED:
            return verdict
        if self._on_refused is not None and verdict.refused_for is not None:
            self._on_refused(verdict.refused_for)
        await answer(client, verdict.status, f"{request.host}:{request.port} refused: {verdict.reason}")
        return None

    async def _open(self, client: anyio.abc.ByteStream, verdict: Verdict) -> anyio.abc.ByteStream | None:
        """Connect to the first of the verdict's checked addresses that answers (never a fresh lookup)."""
        for address in verdict.addresses:
            try:
                with anyio.fail_after(self._connect_timeout_seconds):
                    return await self._connector(address, verdict.port)
            except (OSError, TimeoutError) as exc:
                log.warning("egress_connect_failed host=%s port=%d address=%s error=%s",
                            verdict.host, verdict.port, address, exc)
        await answer(client, 502, f"{verdict.host}:{verdict.port} could not be reached")
        return None

    async def _refuse_request(self, client: anyio.abc.ByteStream, exc: BadRequest, *, respond: bool = True) -> None:
        reason = _reason_for(exc)
        self._refused(reason, exc.host, exc.port, str(exc))
        if respond:
            await answer(client, _STATUS.get(reason, 400), f"refused ({reason}): {exc}")

    def _refused(self, reason: RefusalReason, host: str | None, port: int | None, detail: str) -> None:
        """Log and count a refusal. `detail` is the proxy's own text: never a header value or other client bytes."""
        log_within_budget(log, logging.WARNING, "egress_refused host=%s port=%s reason=%s detail=%s", host or "-",
                          port or "-", reason, detail)
        if self._on_refused is not None:
            self._on_refused(reason)


def _reason_for(exc: BadRequest) -> RefusalReason:
    if isinstance(exc, HeadTooLarge):
        return RefusalReason.TOO_LARGE
    if isinstance(exc, HostMismatch):
        return RefusalReason.HOST_MISMATCH
    if isinstance(exc, AmbiguousFraming):
        return RefusalReason.SMUGGLING
    return RefusalReason.BAD_REQUEST


def _sni_problem(hello: ClientHello, host: str) -> RefusalReason | None:
    """Why a ClientHello may not open a tunnel to `host` (canonical), or None: its SNI must be that host."""
    if hello.hidden_name:
        return RefusalReason.HIDDEN_SNI
    if hello.server_name is None:
        return RefusalReason.NO_SNI
    if hello.server_name.lower().removesuffix(".") != host:
        return RefusalReason.SNI_MISMATCH
    return None
