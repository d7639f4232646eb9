"""The egress proxy: the only way out of a sandbox, and only to what the operator allowed.

Sandboxes have no network; their tools use `HTTP_PROXY`/`HTTPS_PROXY`, which the in-sandbox relay
(`relay.py`) carries over a bind-mounted unix socket to this proxy in the daemon. It speaks the
HTTP proxy protocol: `CONNECT host:port` tunnels (TLS stays end to end) and absolute-form plain
HTTP requests. Every decision is taken before any connect, in this order: the name must be on the
allow-list (`allowlist.py`); it is resolved once; *every* resolved address must pass
`addresses.refusal` unless an explicit `host:port` entry names that endpoint; and the proxy then
connects to one of those same checked addresses, never resolving again, so a rebinding DNS answer
cannot swap the target. Audit mode lets refusals through, logged and counted as `audit`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.abc

from .addresses import refusal
from .allowlist import EgressPolicy, is_ip_literal, normalise_host, parse_port, split_host_port
from .sockets import serve_connections, splice, unix_listener

__all__ = ["Decision", "EgressGate", "EgressPolicy", "EgressProxy", "ProxyRequest", "Verdict", "parse_request"]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 16384
_HOP_BY_HOP = frozenset({"proxy-connection", "proxy-authorization", "connection", "keep-alive"})

# (host, port) -> addresses, in preference order. Raises OSError when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# (address, port) -> a connected stream.
Connector = Callable[[str, int], Awaitable[anyio.abc.ByteStream]]


class Decision(StrEnum):
    """The `decision` label of sandboxd_egress_requests_total."""

    ALLOWED = "allowed"
    REFUSED = "refused"
    AUDIT = "audit"


@dataclass(frozen=True)
class Verdict:
    """What the proxy decided for one request, and the checked addresses it may connect to."""

    decision: Decision
    host: str
    port: int
    addresses: tuple[str, ...] = ()
    reason: str = ""
    status: int = 200  # the HTTP status a refusal is answered with (403, or 502 for a name that does not resolve)


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
            log.info("egress_allowed host=%s port=%d address=%s", host, port, verdict.addresses[0])
        elif verdict.decision is Decision.AUDIT:
            log.warning("egress_audit host=%s port=%d address=%s reason=%s",
                        host, port, verdict.addresses[0], verdict.reason)
        else:
            log.warning("egress_refused host=%s port=%d reason=%s", host, port, verdict.reason)
        if self._on_decision is not None:
            self._on_decision(verdict.decision)
        return verdict

    async def _judge(self, host: str, port: int) -> Verdict:
        rule = self.policy.rule_for(host, port)
        problem = None if rule is not None else "not in the allow-list"
        if problem and not self.policy.audit:
            return Verdict(Decision.REFUSED, host, port, reason=problem, status=403)
        try:
            addresses = tuple(dict.fromkeys(await self._addresses(host, port)))
        except OSError as exc:
            return Verdict(Decision.REFUSED, host, port, reason=f"does not resolve ({exc})", status=502)
        if not addresses:
            return Verdict(Decision.REFUSED, host, port, reason="does not resolve", status=502)
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
        return Verdict(Decision.REFUSED, host, port, reason=problem, status=403)

    async def _addresses(self, host: str, port: int) -> Sequence[str]:
        if is_ip_literal(host):
            return [host]  # checked like any resolved address
        return await self._resolver(host, port)


@dataclass(frozen=True)
class ProxyRequest:
    """A parsed proxy request: where to, and for plain HTTP the head to send upstream."""

    method: str
    host: str
    port: int
    upstream_head: bytes = b""  # empty for CONNECT


class BadRequest(ValueError):
    """The client's request is not one this proxy serves (answered 400)."""


def parse_request(head: bytes) -> ProxyRequest:
    """Parse a request head (without its blank line): CONNECT authority, or absolute-form http:// URL."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("malformed request line")
    method, target, version = parts
    if method == "CONNECT":
        host, port_text = split_host_port(target)
        if port_text is None:
            raise BadRequest("CONNECT needs host:port")
        return ProxyRequest(method, _valid_host(host), parse_port(port_text))
    url = urlsplit(target)
    if url.scheme.lower() != "http" or not url.hostname:
        raise BadRequest("only absolute http:// URLs are proxied; use CONNECT for https")
    port = url.port or 80
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    kept = [f"{method} {path} {version}"]
    has_host = False
    for line in lines[1:]:
        name, sep, _ = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        if name.lower() in _HOP_BY_HOP:
            continue
        has_host = has_host or name.lower() == "host"
        kept.append(line)
    if not has_host:
        kept.append(f"Host: {url.netloc.rpartition('@')[2]}")
    kept.append("Connection: close")  # one request per upstream connection: its target was checked
    return ProxyRequest(method, _valid_host(url.hostname), port, ("\r\n".join(kept) + "\r\n\r\n").encode("latin-1"))


def _valid_host(host: str) -> str:
    canonical = normalise_host(host)
    if canonical is None:
        raise BadRequest("the target is not a host name or IP address")
    return canonical


class EgressProxy:
    """The allow-list proxy, served on a unix socket and, for tests, optionally on a loopback TCP port."""

    def __init__(self, policy: EgressPolicy, socket_path: Path | None = None, *, tcp_port: int | None = None,
                 resolver: Resolver = resolve, connector: Connector = connect,
                 on_decision: Callable[[Decision], None] | None = None, max_connections: int = 256,
                 connect_timeout_seconds: float = 10.0, header_timeout_seconds: float = 30.0) -> None:
        if socket_path is None and tcp_port is None:
            raise ValueError("the egress proxy needs a socket path or a TCP port")
        self.gate = EgressGate(policy, resolver=resolver, on_decision=on_decision)
        self.socket_path = socket_path
        self.tcp_port = tcp_port  # after start-up: the bound port (tcp_port=0 picks a free one)
        self._connector = connector
        self._max_connections = max_connections
        self._connect_timeout_seconds = connect_timeout_seconds
        self._header_timeout_seconds = header_timeout_seconds

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

    async def handle(self, client: anyio.abc.ByteStream) -> None:
        """Serve one client connection: one CONNECT tunnel or one plain HTTP request."""
        try:
            with anyio.fail_after(self._header_timeout_seconds):
                head, rest = await _read_head(client)
            request = parse_request(head)
        except TimeoutError:
            return
        except ValueError as exc:  # BadRequest, a bad port or address
            log.warning("egress_bad_request error=%s", exc)
            await _answer(client, 400, f"bad request: {exc}")
            return
        verdict = await self.gate.decide(request.host, request.port)
        if verdict.decision is Decision.REFUSED:
            await _answer(client, verdict.status, f"{request.host}:{request.port} refused: {verdict.reason}")
            return
        upstream = await self._connect(verdict)
        if upstream is None:
            await _answer(client, 502, f"{request.host}:{request.port} could not be reached")
            return
        async with upstream:
            if request.method == "CONNECT":
                await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                await upstream.send(request.upstream_head)
            if rest:
                await upstream.send(rest)
            await splice(client, upstream, end_with_b=request.method != "CONNECT")

    async def _connect(self, verdict: Verdict) -> anyio.abc.ByteStream | None:
        """Connect to the first of the verdict's checked addresses that answers (never a fresh lookup)."""
        for address in verdict.addresses:
            try:
                with anyio.fail_after(self._connect_timeout_seconds):
                    return await self._connector(address, verdict.port)
            except (OSError, TimeoutError) as exc:
                log.warning("egress_connect_failed host=%s port=%d address=%s error=%s",
                            verdict.host, verdict.port, address, exc)
        return None


async def _read_head(stream: anyio.abc.ByteStream) -> tuple[bytes, bytes]:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadRequest("request head too large")
        try:
            buffer += await stream.receive()
        except anyio.EndOfStream:
            raise BadRequest("connection closed before the request head ended") from None
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


async def _answer(client: anyio.abc.ByteStream, status: int, message: str) -> None:
    phrase = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
    body = f"sandboxd egress: {message}\n".encode("utf-8", "replace")
    head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        await client.send(head + body)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
