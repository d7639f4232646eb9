"""The proxy checks what it forwards: the Host of every request, the body framing, the SNI of a tunnel.

The client is one end of a unix socketpair served by `EgressProxy.handle`; every upstream is a fake
HTTP/1.1 server (h11) on another socketpair, which records the bytes it received. No packet leaves.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import h11
import pytest

from sandboxd.network.allowlist import EgressPolicy
from sandboxd.network.egress import Decision, EgressProxy, RefusalReason
from tests.unit.client_hello import ECH, ESNI, build_client_hello, real_client_hello, sni_extension
from tests.unit.test_egress import FakeResolver, RecordingConnector

pytestmark = pytest.mark.anyio

ALLOWED = ["ok.example.com", "other.example.com", "*.cdn.example.net", "203.0.113.9:8443"]
Respond = Callable[[h11.Request, bytes], bytes]


def echo(request: h11.Request, body: bytes) -> bytes:
    """200 with JSON naming the request's method, target, Host and body."""
    host = dict(request.headers).get(b"host", b"").decode()
    payload = json.dumps({"method": request.method.decode(), "target": request.target.decode(), "host": host,
                          "body": body.decode("latin-1")}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)


@dataclass
class Upstream:
    """A connector whose every connection is a fake HTTP server: one request read, `respond`'s bytes sent back."""

    tg: anyio.abc.TaskGroup
    respond: Respond = echo
    calls: list[tuple[str, int]] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)  # every byte each connection received

    async def __call__(self, address: str, port: int) -> anyio.abc.ByteStream:
        self.calls.append((address, port))
        ours, theirs = socket.socketpair()
        self.received.append(b"")
        self.tg.start_soon(self._serve, await anyio.abc.UNIXSocketStream.from_socket(theirs), len(self.received) - 1)
        return await anyio.abc.UNIXSocketStream.from_socket(ours)

    async def _serve(self, stream: anyio.abc.SocketStream, index: int) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            request, body = None, b""
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError:
                    return  # the proxy ended the request early
                if event is h11.NEED_DATA:
                    data = await _receive(stream)
                    self.received[index] += data
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            await stream.send(self.respond(request, body))
            await stream.send_eof()  # marks the end of a close-delimited response
            while data := await _receive(stream):  # anything more the proxy sends is recorded
                self.received[index] += data


async def _receive(stream: anyio.abc.ByteStream) -> bytes:
    try:
        return await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return b""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """The sandbox's side of one proxy connection: raw bytes out, responses read with h11."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def response(self, method: str = "GET") -> Reply:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        if self.buffer:
            conn.receive_data(self.buffer)  # (an empty one would mean the end of the stream)
        reply = Reply(0, {}, b"")
        with anyio.fail_after(5):
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await _receive(self.stream))
                elif isinstance(event, h11.Response):
                    reply.status = event.status_code
                    reply.headers = {name.decode(): value.decode() for name, value in event.headers}
                elif isinstance(event, h11.Data):
                    reply.body += event.data
                elif isinstance(event, h11.ConnectionClosed):
                    raise EOFError("the proxy closed the connection")
        self.buffer = bytes(conn.trailing_data[0])
        return reply

    async def json(self, method: str = "GET") -> dict[str, Any]:
        reply = await self.response(method)
        assert reply.status == 200, reply
        result: dict[str, Any] = json.loads(reply.body)
        return result

    async def closed(self) -> bool:
        """Whether the proxy ends the connection (within 5 s) without sending anything more."""
        with anyio.fail_after(5):
            return not self.buffer and not await _receive(self.stream)


@dataclass
class Running:
    proxy: EgressProxy
    upstream: Upstream
    resolver: FakeResolver
    decisions: list[Decision]
    refusals: list[RefusalReason]

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Client]:
        ours, theirs = socket.socketpair()
        async with await anyio.abc.UNIXSocketStream.from_socket(ours) as client, anyio.create_task_group() as tg:
            tg.start_soon(self._serve, theirs)
            yield Client(client)
            tg.cancel_scope.cancel()

    async def _serve(self, sock: socket.socket) -> None:
        async with await anyio.abc.UNIXSocketStream.from_socket(sock) as server:
            await self.proxy.handle(server)


@asynccontextmanager
async def running(respond: Respond = echo, *, allowed: list[str] | None = None, audit: bool = False,
                  **options: Any) -> AsyncIterator[Running]:
    decisions: list[Decision] = []
    refusals: list[RefusalReason] = []
    resolver = FakeResolver(["93.184.216.34"])
    async with anyio.create_task_group() as tg:
        upstream = Upstream(tg, respond)
        proxy = EgressProxy(EgressPolicy(ALLOWED if allowed is None else allowed, audit=audit), tcp_port=0,
                            resolver=resolver, connector=upstream, on_decision=decisions.append,
                            on_refused=refusals.append, **options)
        yield Running(proxy, upstream, resolver, decisions, refusals)
        tg.cancel_scope.cancel()


def get(url: str, *fields: str, version: str = "1.1", method: str = "GET") -> bytes:
    return (f"{method} {url} HTTP/{version}\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n").encode()


# --- the Host header --------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["not-listed.example", "other.example.com", "ok.example.com:8080", "ok.example.com:",
                                  "ok.example.com.evil", "[::1]", "", "ok.example.com:80:80"])
async def test_a_host_header_naming_another_authority_is_refused(host: str) -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", f"Host: {host}"))
        reply = await client.response()
        assert reply.status == 403
        assert reply.body.startswith(b"sandboxd egress: refused (host_mismatch)")
        assert await client.closed()
    assert run.refusals == [RefusalReason.HOST_MISMATCH]
    assert run.upstream.calls == [] and run.resolver.calls == [] and run.decisions == []


@pytest.mark.parametrize(("url", "host"), [("http://ok.example.com/", "ok.example.com"),
                                           ("http://ok.example.com/", "OK.Example.COM."),
                                           ("http://ok.example.com/", "ok.example.com:80"),
                                           ("http://ok.example.com:8080/", "ok.example.com"),
                                           ("http://203.0.113.9:8443/", "203.0.113.9:8443")])
async def test_a_host_header_naming_the_target_is_forwarded_as_sent(url: str, host: str) -> None:
    allowed = ["ok.example.com", "ok.example.com:8080", "203.0.113.9:8443"]
    async with running(allowed=allowed) as run, run.connection() as client:
        await client.send(get(url, f"Host: {host}"))
        assert (await client.json())["host"] == host
    assert run.refusals == []


async def test_two_host_headers_are_refused_even_when_both_match() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", "Host: ok.example.com", "Host: ok.example.com"))
        assert (await client.response()).status == 403
    assert run.refusals == [RefusalReason.HOST_MISMATCH] and run.upstream.calls == []


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_a_missing_host_is_filled_with_the_checked_authority(version: str) -> None:
    async with running(allowed=["ok.example.com:8080"]) as run, run.connection() as client:
        await client.send(get("http://ok.example.com:8080/p?q=1", "Accept: */*", version=version))
        seen = await client.json()
    assert (seen["host"], seen["target"]) == ("ok.example.com:8080", "/p?q=1")
    assert run.upstream.received[0].startswith(b"GET /p?q=1 HTTP/1.1\r\nHost: ok.example.com:8080\r\n")


async def test_the_host_mismatch_refusal_logs_no_header_value(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sandboxd.network.egress")
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", "Host: attacker-chosen.example"))
        await client.response()
    assert caplog.messages == ["egress_refused host=ok.example.com port=80 reason=host_mismatch "
                               "detail=the Host header does not name the requested host"]
    assert "attacker-chosen" not in caplog.text


# --- every request on a connection is checked --------------------------------------------------------


async def test_a_pipelined_request_with_a_host_not_listed_is_refused_while_the_first_succeeds() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/first", "Host: ok.example.com")
                          + get("http://ok.example.com/second", "Host: not-listed.example"))
        assert (await client.json())["target"] == "/first"
        second = await client.response()
        assert second.status == 403 and b"host_mismatch" in second.body
        assert await client.closed()
    assert run.decisions == [Decision.ALLOWED] and run.refusals == [RefusalReason.HOST_MISMATCH]
    assert len(run.upstream.calls) == 1
    assert run.upstream.received[0].count(b"HTTP/1.1\r\n") == 1, "the upstream saw one request, the first"


async def test_a_pipelined_request_to_a_target_not_listed_is_refused_while_the_first_succeeds() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", "Host: ok.example.com")
                          + get("http://evil.example.org/", "Host: evil.example.org"))
        assert (await client.json())["host"] == "ok.example.com"
        assert (await client.response()).status == 403
    assert run.decisions == [Decision.ALLOWED, Decision.REFUSED]
    assert run.refusals == [RefusalReason.NOT_ALLOWED]
    assert len(run.upstream.calls) == 1


async def test_a_kept_alive_connection_decides_each_request_afresh_on_a_new_upstream_connection() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/1"))
        assert (await client.json())["target"] == "/1"
        await client.send(get("http://other.example.com/2"))
        assert (await client.json())["host"] == "other.example.com"
        await client.send(get("http://ok.example.com/3", method="HEAD"))
        head = await client.response("HEAD")
        assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0
        await client.send(get("http://ok.example.com/4", "Connection: close"))
        assert (await client.json())["target"] == "/4"
        assert await client.closed()
    assert run.decisions == [Decision.ALLOWED] * 4 and run.refusals == []
    assert run.resolver.calls == [("ok.example.com", 80), ("other.example.com", 80), ("ok.example.com", 80),
                                  ("ok.example.com", 80)]
    assert len(run.upstream.calls) == 4
    assert all(raw.endswith(b"Connection: close\r\n\r\n") for raw in run.upstream.received)


async def test_an_http_1_0_client_gets_one_response_then_the_connection_closes() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", version="1.0") + get("http://ok.example.com/again"))
        assert (await client.json())["target"] == "/"
        assert await client.closed()
    assert len(run.upstream.calls) == 1


@pytest.mark.parametrize(("response", "method", "body"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", "GET", b"abcde"),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", "GET", b"until the end"),  # close-delimited
    (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", b""),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", "GET", b""),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "HEAD", b""),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "GET", b"ok"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n", "GET", b"x"),
])
async def test_responses_are_framed_afresh_and_the_connection_carries_the_next_request(
    response: bytes, method: str, body: bytes
) -> None:
    async with running(lambda request, _: response if request.target != b"/next" else echo(request, b"")) as run:
        async with run.connection() as client:
            await client.send(get("http://ok.example.com/", method=method))
            reply = await client.response(method)
            assert reply.body == body
            assert "connection" not in reply.headers
            await client.send(get("http://ok.example.com/next"))
            assert (await client.json())["target"] == "/next"


async def test_an_upstream_that_does_not_speak_http_is_answered_502() -> None:
    async with running(lambda *_: b"SSH-2.0-OpenSSH\r\n\r\n") as run, run.connection() as client:
        await client.send(get("http://ok.example.com/"))
        assert (await client.response()).status == 502
        assert await client.closed()
    assert run.refusals == []


# --- request bodies, and smuggling ----------------------------------------------------------------------


async def test_request_bodies_are_forwarded_by_their_framing() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/cl", "Content-Length: 5", method="POST") + b"hello")
        assert (await client.json())["body"] == "hello"
        await client.send(get("http://ok.example.com/te", "Transfer-Encoding: chunked", method="POST")
                          + b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer-Field: x\r\n\r\n")
        assert (await client.json())["body"] == "abcde"
    assert b"Transfer-Encoding: chunked\r\n" in run.upstream.received[1]
    assert b"Trailer-Field" not in run.upstream.received[1]


@pytest.mark.parametrize("fields", [
    ("Content-Length: 5", "Transfer-Encoding: chunked"),
    ("Transfer-Encoding: chunked", "Content-Length: 5"),
    ("Content-Length: 5", "Content-Length: 5"),
    ("Content-Length: 5, 5",),
    ("Content-Length: +5",),
    ("Content-Length: 0x5",),
    ("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
    ("Transfer-Encoding: gzip, chunked",),
    ("Transfer-Encoding: chunked, identity",),
    ("Transfer-Encoding: xchunked",),
])
async def test_ambiguous_framing_is_refused_before_any_connect(fields: tuple[str, ...]) -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", *fields, method="POST") + b"0\r\n\r\nGET /smuggled HTTP/1.1")
        reply = await client.response()
        assert reply.status == 400 and b"smuggling" in reply.body
        assert await client.closed()
    assert run.refusals == [RefusalReason.SMUGGLING]
    assert run.upstream.calls == [] and run.decisions == []


async def test_chunked_is_refused_in_an_http_1_0_request() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", "Transfer-Encoding: chunked", version="1.0", method="POST"))
        assert (await client.response()).status == 400
    assert run.refusals == [RefusalReason.SMUGGLING]


async def test_a_malformed_chunk_ends_the_request_and_nothing_after_it_reaches_the_upstream() -> None:
    async with running() as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", "Transfer-Encoding: chunked", method="POST")
                          + b"5\r\nhello\r\nzz\r\nGET /smuggled HTTP/1.1\r\nHost: ok.example.com\r\n\r\n")
        reply = await client.response()
        assert reply.status == 400 and b"smuggling" in reply.body
        assert await client.closed()
    assert run.refusals == [RefusalReason.SMUGGLING]
    assert b"smuggled" not in b"".join(run.upstream.received)


@pytest.mark.parametrize("head", [
    get("http://ok.example.com/", " Host: ok.example.com"),  # obs-fold / leading space
    get("http://ok.example.com/", "Host : ok.example.com"),
    get("http://ok.example.com/", "X: a\rb"),
    get("http://ok.example.com/", "X: a\x00b"),
    get("http://ok.example.com/", "X\tY: 1"),
    b"GET http://ok.example.com/ HTTP/1.1\nHost: ok.example.com\n\r\n\r\n",
    get("http://user@ok.example.com/"),
    get("http://ok.example.com:0/"),
    get("http://ok.example.com:65536/"),
    get("http://[::1/"),
    get("http://ok.example.com/\x7f"),
    b"GET  http://ok.example.com/ HTTP/1.1\r\n\r\n",
    b"GET http://ok.example.com/ HTTP/1.2\r\n\r\n",
])
async def test_malformed_heads_are_refused(head: bytes) -> None:
    async with running() as run, run.connection() as client:
        await client.send(head)
        reply = await client.response()
        assert reply.status == 400, reply
    assert run.refusals == [RefusalReason.BAD_REQUEST] and run.upstream.calls == []


# --- bounds and timeouts ----------------------------------------------------------------------------------


async def test_too_many_header_fields_are_refused_431() -> None:
    async with running(max_headers=10) as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", *(f"X-{i}: {i}" for i in range(11))))
        assert (await client.response()).status == 431
    assert run.refusals == [RefusalReason.TOO_LARGE]


async def test_a_head_over_the_size_bound_is_refused_431_without_waiting_for_its_end() -> None:
    async with running(max_head_bytes=1024) as run, run.connection() as client:
        await client.send(b"GET http://ok.example.com/ HTTP/1.1\r\nX: " + b"a" * 2048)
        assert (await client.response()).status == 431
    assert run.refusals == [RefusalReason.TOO_LARGE]


async def test_a_head_that_does_not_arrive_in_time_is_refused_408() -> None:
    async with running(header_timeout_seconds=0.2) as run, run.connection() as client:
        await client.send(b"GET http://ok.example.com/ HTTP/1.1\r\nHost: ok.exa")
        reply = await client.response()
        assert reply.status == 408
    assert run.refusals == [RefusalReason.HEADER_TIMEOUT]


async def test_the_header_timeout_covers_the_whole_head_not_each_read() -> None:
    async with running(header_timeout_seconds=0.3) as run, run.connection() as client:
        with anyio.fail_after(2):
            for _ in range(20):  # a byte every 50 ms: 1 s in all
                try:
                    await client.send(b"X")
                except (anyio.BrokenResourceError, OSError):
                    break
                await anyio.sleep(0.05)
        assert (await client.response()).status == 408
    assert run.refusals == [RefusalReason.HEADER_TIMEOUT]


async def test_an_idle_kept_alive_connection_is_closed_quietly() -> None:
    async with running(idle_timeout_seconds=0.2, header_timeout_seconds=5) as run, run.connection() as client:
        await client.send(get("http://ok.example.com/"))
        await client.json()
        with anyio.fail_after(2):
            assert await client.closed()
    assert run.refusals == []


async def test_an_empty_line_after_a_request_counts_as_idle_not_as_a_slow_head() -> None:
    async with running(idle_timeout_seconds=5, header_timeout_seconds=0.2) as run, run.connection() as client:
        await client.send(get("http://ok.example.com/", "Content-Length: 2", method="POST") + b"hi\r\n")
        await client.json()
        await anyio.sleep(0.4)  # past the header timeout, within the idle timeout
        await client.send(get("http://ok.example.com/next"))
        assert (await client.json())["target"] == "/next"
    assert run.refusals == []


async def test_a_slow_second_head_has_its_own_header_timeout() -> None:
    async with running(idle_timeout_seconds=5, header_timeout_seconds=0.2) as run, run.connection() as client:
        await client.send(get("http://ok.example.com/"))
        await client.json()
        await anyio.sleep(0.3)  # idle, within the idle timeout
        await client.send(b"GET http://ok.exa")
        assert (await client.response()).status == 408
    assert run.refusals == [RefusalReason.HEADER_TIMEOUT]


# --- CONNECT: the ClientHello must name the host ---------------------------------------------------------


async def _tunnel(options: dict[str, Any], target: str, first_bytes: bytes, *,
                  allowed: list[str] | None = None) -> tuple[bytes, bytes, RecordingConnector, list[RefusalReason]]:
    """CONNECT `target`, send `first_bytes`, then `ping`: (what the client got, what the upstream got, ...)."""
    connector = RecordingConnector()
    refusals: list[RefusalReason] = []
    proxy = EgressProxy(EgressPolicy(ALLOWED if allowed is None else allowed), tcp_port=0,
                        resolver=FakeResolver(["93.184.216.34"]), connector=connector, on_refused=refusals.append,
                        **options)
    ours, theirs = socket.socketpair()
    async with await anyio.abc.UNIXSocketStream.from_socket(ours) as client, anyio.create_task_group() as tg:
        async def serve() -> None:
            async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as server:
                await proxy.handle(server)

        tg.start_soon(serve)
        await client.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        answer = b""
        with anyio.fail_after(5):
            while not answer.endswith(b"\r\n\r\n"):
                answer += await client.receive()
            await client.send(first_bytes)
            if connector.peers:
                upstream_got = await _read_available(connector.peers[0], len(first_bytes))
            else:
                upstream_got = b""
            answer += await _drain(client)
        tg.cancel_scope.cancel()
    for peer in connector.peers:
        await peer.aclose()
    return answer, upstream_got, connector, refusals


async def _read_available(stream: anyio.abc.ByteStream, expected: int) -> bytes:
    """Bytes from `stream` until `expected` arrived, it ended, or 0.5 s of silence."""
    received = b""
    while len(received) < expected:
        with anyio.move_on_after(0.5):
            chunk = await _receive(stream)
            if not chunk:
                break
            received += chunk
            continue
        break
    return received


async def _drain(stream: anyio.abc.ByteStream) -> bytes:
    """What `stream` still sends until it ends (or 0.5 s of silence)."""
    return await _read_available(stream, 1 << 30)


@pytest.mark.parametrize(("target", "name"), [("ok.example.com:443", "ok.example.com"),
                                              ("OK.example.com.:443", "ok.example.com"),
                                              ("ok.example.com:443", "OK.Example.Com."),
                                              ("a.cdn.example.net:443", "a.cdn.example.net")])
async def test_a_client_hello_naming_the_connect_host_is_forwarded_unchanged(target: str, name: str) -> None:
    hello = real_client_hello(name) if not name.endswith(".") else build_client_hello(name)
    answer, upstream_got, connector, refusals = await _tunnel({}, target, hello)
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert upstream_got == hello
    assert refusals == [] and len(connector.calls) == 1


async def test_after_a_matching_client_hello_the_tunnel_carries_bytes_both_ways() -> None:
    connector = RecordingConnector()
    proxy = EgressProxy(EgressPolicy(ALLOWED), tcp_port=0, resolver=FakeResolver(["93.184.216.34"]),
                        connector=connector)
    hello = real_client_hello("ok.example.com")
    ours, theirs = socket.socketpair()
    async with await anyio.abc.UNIXSocketStream.from_socket(ours) as client, anyio.create_task_group() as tg:
        async def serve() -> None:
            async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as server:
                await proxy.handle(server)

        tg.start_soon(serve)
        with anyio.fail_after(5):
            await client.send(b"CONNECT ok.example.com:443 HTTP/1.1\r\n\r\n")
            assert await client.receive() == b"HTTP/1.1 200 Connection established\r\n\r\n"
            await client.send(hello[:100])  # in two writes
            await client.send(hello[100:] + b"early data")
            upstream = connector.peers[0]
            assert await _read_available(upstream, len(hello) + 10) == hello + b"early data"
            await upstream.send(b"server flight")
            assert await client.receive() == b"server flight"
            await upstream.aclose()
            assert await _drain(client) == b""
        tg.cancel_scope.cancel()


async def test_a_client_hello_split_over_records_and_writes_is_read_whole() -> None:
    hello = build_client_hello("ok.example.com", record_size=9)
    answer, upstream_got, _, refusals = await _tunnel({}, "ok.example.com:443", hello)
    assert upstream_got == hello and refusals == []


@pytest.mark.parametrize(("hello", "reason"), [
    (real_client_hello("other.example.com"), RefusalReason.SNI_MISMATCH),  # listed, but not the CONNECT host
    (real_client_hello("not-listed.example"), RefusalReason.SNI_MISMATCH),
    (real_client_hello("b.cdn.example.net"), RefusalReason.SNI_MISMATCH),  # same wildcard, another name
    (real_client_hello("ok.example.com.evil"), RefusalReason.SNI_MISMATCH),
    (build_client_hello("ok.example.com\x00.evil"), RefusalReason.SNI_MISMATCH),
    (real_client_hello(None), RefusalReason.NO_SNI),
    (build_client_hello(None), RefusalReason.NO_SNI),
    (build_client_hello("ok.example.com", extensions=[(ECH, b"\x00" * 40)]), RefusalReason.HIDDEN_SNI),
    (build_client_hello("ok.example.com", extensions=[(ESNI, b"\x00" * 40)]), RefusalReason.HIDDEN_SNI),
    (build_client_hello(None, extensions=[sni_extension(b"ok.example.com", b"evil.example")]), RefusalReason.NOT_TLS),
    (build_client_hello(None, extensions=[sni_extension(b"ok.example.com")] * 2), RefusalReason.NOT_TLS),
    (b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", RefusalReason.NOT_TLS),
    (b"SSH-2.0-OpenSSH_9.2\r\n", RefusalReason.NOT_TLS),
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", RefusalReason.NOT_TLS),  # a ServerHello
    (b"\x16\x03\x01\xff\xff" + b"\x00" * 100, RefusalReason.NOT_TLS),  # a record over 2^14
    (b"\x80\x2e\x01\x00\x02", RefusalReason.NOT_TLS),  # SSLv2-style
])
async def test_a_tunnel_whose_first_bytes_do_not_name_the_connect_host_is_closed(hello: bytes,
                                                                                 reason: RefusalReason) -> None:
    answer, upstream_got, connector, refusals = await _tunnel({}, "ok.example.com:443", hello)
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n", "closed after the 200, nothing more"
    assert upstream_got == b"", "not one byte reached the upstream"
    assert refusals == [reason]


async def test_a_client_hello_over_the_size_bound_is_refused() -> None:
    hello = build_client_hello("ok.example.com", extensions=[(0x15, b"\x00" * 3000)])  # padding
    answer, upstream_got, _, refusals = await _tunnel({"max_hello_bytes": 2048}, "ok.example.com:443", hello)
    assert upstream_got == b"" and refusals == [RefusalReason.TOO_LARGE]


async def test_a_client_hello_that_does_not_arrive_in_time_is_refused() -> None:
    hello = real_client_hello("ok.example.com")
    answer, upstream_got, _, refusals = await _tunnel({"hello_timeout_seconds": 0.2}, "ok.example.com:443",
                                                      hello[:20])
    assert upstream_got == b"" and refusals == [RefusalReason.HELLO_TIMEOUT]


async def test_a_connect_to_an_ip_literal_rule_is_not_checked_for_tls() -> None:
    answer, upstream_got, _, refusals = await _tunnel({}, "203.0.113.9:8443", b"any protocol at all",
                                                      allowed=["203.0.113.9:8443"])
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert upstream_got == b"any protocol at all" and refusals == []


async def test_the_sni_is_checked_in_audit_mode_too() -> None:
    connector = RecordingConnector()
    refusals: list[RefusalReason] = []
    proxy = EgressProxy(EgressPolicy([], audit=True), tcp_port=0, resolver=FakeResolver(["93.184.216.34"]),
                        connector=connector, on_refused=refusals.append)
    ours, theirs = socket.socketpair()
    async with await anyio.abc.UNIXSocketStream.from_socket(ours) as client, anyio.create_task_group() as tg:
        async def serve() -> None:
            async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as server:
                await proxy.handle(server)

        tg.start_soon(serve)
        await client.send(b"CONNECT any.example.org:443 HTTP/1.1\r\n\r\n" + real_client_hello("else.example.org"))
        with anyio.fail_after(5):
            received = await _drain(client)
    for peer in connector.peers:
        await peer.aclose()
    assert received == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert refusals == [RefusalReason.SNI_MISMATCH]


@pytest.mark.parametrize(("answer", "reason", "status"), [(["10.0.0.1"], RefusalReason.ADDRESS, 403),
                                                          ([], RefusalReason.UNRESOLVED, 502)])
async def test_the_gates_refusals_are_counted_with_their_reason(answer: list[str], reason: RefusalReason,
                                                               status: int) -> None:
    async with running() as run, run.connection() as client:
        run.resolver.answers = [answer] if answer else []
        await client.send(get("http://ok.example.com/"))
        assert (await client.response()).status == status
    assert run.refusals == [reason] and run.decisions == [Decision.REFUSED]


def test_the_refusal_reasons() -> None:
    assert [reason.value for reason in RefusalReason] == [
        "not_allowed", "address", "unresolved", "bad_request", "too_large", "smuggling", "host_mismatch",
        "header_timeout", "not_tls", "no_sni", "sni_mismatch", "hidden_sni", "hello_timeout", "placeholder",
        "upstream_tls", "client_tls"]
