"""Property tests of what the egress proxy parses from a sandbox: request heads and TLS ClientHellos.

Whatever the bytes, `parse_request` returns a checked request or raises `BadRequest`, and
`parse_client_hello` returns a ClientHello, None (incomplete) or raises `NotClientHello`; nothing
else escapes, and both stay within bounded time and memory. What `parse_request` accepts, h11
(which then frames the body) reads the same way. Random bytes thrown at `EgressProxy.handle` end
the connection without an error and never reach an upstream. No example database is written.
"""

from __future__ import annotations

import socket
import time
import tracemalloc
from datetime import timedelta

import anyio
import anyio.abc
import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxd.network.allowlist import EgressPolicy, normalise_host, split_host_port
from sandboxd.network.egress import EgressProxy, RefusalReason
from sandboxd.network.http1 import MAX_HEAD_BYTES, BadRequest, ProxyRequest, parse_request
from sandboxd.network.tls import MAX_HELLO_BYTES, ClientHello, NotClientHello, parse_client_hello
from tests.unit.client_hello import ECH, SERVER_NAME, SUPPORTED_VERSIONS, build_client_hello, sni_extension
from tests.unit.test_egress import FakeResolver

FUZZ = settings(database=None, deadline=timedelta(milliseconds=500), max_examples=300,
                suppress_health_check=[HealthCheck.too_slow])

# --- request heads ---------------------------------------------------------------------------------

METHODS = ["GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS", "G\x00T", "get", ""]
TARGETS = ["http://ok.example.com/", "http://ok.example.com:8080/a?b=c", "http://[::1]:80/", "http://1.2.3.4",
           "http://user@ok.example.com/", "https://ok.example.com/", "/relative", "ok.example.com:443",
           "[::1]:443", "http://ok.example.com:99999/", "http://ok.example.com\\@evil.example/", "*",
           "http://ok.example.com/%0d%0aX: y", "http://OK.EXAMPLE.COM./"]
NAMES = ["Host", "host", "HOST", "Content-Length", "Transfer-Encoding", "Connection", "Proxy-Connection",
         "Upgrade", "TE", "Expect", "X-Y", "Host ", " Host", "Ho\tst", ""]
VALUES = ["ok.example.com", "ok.example.com:8080", "evil.example", "5", "0", "-1", "5, 5", "chunked",
          "gzip, chunked", "chunked, identity", "close", "keep-alive, Host", "upgrade", "100-continue",
          "a\rb", "a\nb", "\x00", "é", " padded ", "[::1]:80", "1" * 30, ""]


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """Request heads built from the pieces that matter, each possibly mangled."""
    line = f"{draw(st.sampled_from(METHODS))} {draw(st.sampled_from(TARGETS))} HTTP/1.{draw(st.sampled_from('019'))}"
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=8))
    separator = draw(st.sampled_from([": ", ":", " : ", ":\t"]))
    text = "\r\n".join([line, *(f"{name}{separator}{value}" for name, value in fields)])
    data = text.encode("latin-1", "replace")
    if draw(st.booleans()):
        position = draw(st.integers(0, len(data)))
        data = data[:position] + draw(st.binary(max_size=8)) + data[position:]
    return data


def _check_accepted(request: ProxyRequest) -> None:
    """What parse_request accepted: h11 reads the same request, and the upstream gets one checked Host."""
    if request.method == "CONNECT":
        assert request.upstream_head == b""
        return
    server = h11.Connection(h11.SERVER)
    server.receive_data(request.client_head)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    ours = {name.lower(): value for name, value in request.fields}
    theirs = {name.decode(): value.decode("latin-1") for name, value in event.headers}
    assert ("content-length" in theirs, "transfer-encoding" in theirs) == (
        "content-length" in ours, "transfer-encoding" in ours)
    upstream = h11.Connection(h11.SERVER)
    upstream.receive_data(request.upstream_head)
    sent = upstream.next_event()
    assert isinstance(sent, h11.Request) and upstream.trailing_data[0] == b""
    hosts = [value.decode("latin-1") for name, value in sent.headers if name == b"host"]
    assert len(hosts) == 1
    host, port = split_host_port(hosts[0])
    assert normalise_host(host) == request.host and (port is None or int(port) == request.port)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_a_request_or_bad_request(data: bytes) -> None:
    try:
        request = parse_request(data)
    except BadRequest:
        return
    _check_accepted(request)


@FUZZ
@given(heads())
def test_mangled_heads_are_a_checked_request_or_bad_request(data: bytes) -> None:
    try:
        request = parse_request(data)
    except BadRequest:
        return
    _check_accepted(request)


@pytest.mark.parametrize("data", [
    b"GET http://a/ HTTP/1.1\r\n" + b"X: " + b"a\t" * (MAX_HEAD_BYTES // 2),
    b"GET http://a/ HTTP/1.1\r\n" + b"a:\r\n" * (MAX_HEAD_BYTES // 4),
    b"GET http://" + b"a." * (MAX_HEAD_BYTES // 2) + b" HTTP/1.1",
    b"\r\n" * MAX_HEAD_BYTES,
    bytes(range(256)) * (MAX_HEAD_BYTES // 256),
    b"x" * (MAX_HEAD_BYTES * 64),
])
def test_the_worst_heads_are_parsed_in_bounded_time_and_memory(data: bytes) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        parse_request(data)
    except BadRequest:
        pass
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 40 * MAX_HEAD_BYTES  # a few copies of at most one head, as str and as field tuples


# --- ClientHellos ------------------------------------------------------------------------------------------


def _parse(data: bytes) -> ClientHello | None:
    try:
        return parse_client_hello(data)
    except NotClientHello:
        return None


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_a_client_hello_none_or_not_client_hello(data: bytes) -> None:
    _parse(data)
    _parse(b"\x16\x03\x01" + data)  # past the first checks
    _parse(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + b"\x01" + len(data).to_bytes(3, "big") + data)


BUILT_IN = (SERVER_NAME, SUPPORTED_VERSIONS)  # the extensions build_client_hello adds itself


@st.composite
def hellos(draw: st.DrawFn) -> tuple[bytes, str | None]:
    name = draw(st.none() | st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True))
    extensions = draw(st.lists(st.tuples(st.integers(0, 0xFFFF).filter(lambda kind: kind not in BUILT_IN),
                                         st.binary(max_size=64)), max_size=5, unique_by=lambda item: item[0]))
    record_size = draw(st.integers(min_value=600, max_value=16384) | st.integers(min_value=1, max_value=50))
    return build_client_hello(name, extensions=extensions, record_size=record_size), name


@FUZZ
@given(hellos())
def test_built_hellos_are_read_with_their_name(built: tuple[bytes, str | None]) -> None:
    data, name = built
    try:
        hello = parse_client_hello(data)
    except NotClientHello:  # split over more records than a ClientHello may use
        assert data.count(b"\x16\x03\x01") > 32
        return
    assert hello is not None and hello.server_name == name


@FUZZ
@given(hellos(), st.data())
def test_cut_or_mangled_hellos_never_raise_anything_else(built: tuple[bytes, str | None], data: st.DataObject) -> None:
    hello, _ = built
    cut = data.draw(st.integers(0, len(hello)))
    assert _parse(hello[:cut]) is None or cut == len(hello)  # a prefix is incomplete (or refused), never a hello
    position = data.draw(st.integers(0, len(hello) - 1))
    flipped = hello[:position] + bytes([hello[position] ^ data.draw(st.integers(1, 255))]) + hello[position + 1:]
    _parse(flipped)
    _parse(hello[:position] + data.draw(st.binary(min_size=1, max_size=16)) + hello[position:])


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x00\x01\x01" * (MAX_HELLO_BYTES // 6),  # as many one-byte records as fit
    b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + bytes(MAX_HELLO_BYTES * 64),
    build_client_hello("a" * 60000),
    build_client_hello("ok.example.com", extensions=[(ECH, bytes(60000))]),
    build_client_hello(None, extensions=[sni_extension(*[b"a"] * 4000)]),
    bytes(MAX_HELLO_BYTES * 64),
])
def test_the_worst_hellos_are_parsed_in_bounded_time_and_memory(data: bytes) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    _parse(data)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 4 * MAX_HELLO_BYTES


# --- the proxy end to end ---------------------------------------------------------------------------------


class ClosingConnector:
    """Records each connect; the upstream it hands out has already closed (the proxy must cope)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, address: str, port: int) -> anyio.abc.ByteStream:
        self.calls.append((address, port))
        ours, theirs = socket.socketpair()
        theirs.close()
        return await anyio.abc.UNIXSocketStream.from_socket(ours)


async def _throw(data: bytes, chunks: int) -> tuple[list[RefusalReason], ClosingConnector]:
    connector = ClosingConnector()
    refusals: list[RefusalReason] = []
    proxy = EgressProxy(EgressPolicy(["ok.example.com"]), tcp_port=0, resolver=FakeResolver(["93.184.216.34"]),
                        connector=connector, on_refused=refusals.append, header_timeout_seconds=0.05,
                        idle_timeout_seconds=0.05, hello_timeout_seconds=0.05)
    ours, theirs = socket.socketpair()

    async def serve() -> None:  # as the listener does: handle, then close
        async with await anyio.abc.UNIXSocketStream.from_socket(theirs) as server:
            await proxy.handle(server)

    async with await anyio.abc.UNIXSocketStream.from_socket(ours) as client:
        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve)
                size = max(1, len(data) // chunks)
                try:
                    for start in range(0, len(data), size):
                        await client.send(data[start:start + size])
                    await client.send_eof()
                    while await client.receive():
                        pass
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
    return refusals, connector


PIECES = [b"GET http://ok.example.com/ HTTP/1.1\r\nHost: ok.example.com\r\n\r\n",
          b"HEAD http://ok.example.com/ HTTP/1.0\r\n\r\n", b"CONNECT ok.example.com:443 HTTP/1.1\r\n\r\n",
          b"POST http://ok.example.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n",
          b"Content-Length: 3\r\n", b"\r\n", build_client_hello("ok.example.com"), build_client_hello("x.example")]
client_bytes = (heads().map(lambda head: head + b"\r\n\r\n") | st.binary(max_size=512)
                | st.lists(st.sampled_from(PIECES) | st.binary(max_size=64), max_size=6).map(b"".join))


@settings(database=None, deadline=None, max_examples=300)
@given(client_bytes, st.integers(1, 6))
def test_random_client_bytes_end_the_connection_cleanly(data: bytes, chunks: int) -> None:
    refusals, connector = anyio.run(_throw, data, chunks)
    assert len(refusals) <= 1
    assert all(address == "93.184.216.34" for address, _ in connector.calls)
