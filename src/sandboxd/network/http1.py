"""HTTP/1.x for the egress proxy: every request head checked, then its body and its response relayed.

A proxy that checks the first request of a connection and then splices bytes is a tunnel for
whatever follows: a second, pipelined request to another Host, or a body framed so that the
upstream reads a request the proxy never saw (request smuggling). So every request is handled on
its own. `parse_request` reads a head strictly (CRLF lines, token names, no control characters, a
bounded size and number of fields) and makes the checks the proxy relies on: an absolute `http://`
target; a Host header naming that same authority (filled in when missing, refused when it names
another host or port, or appears twice); one unambiguous body framing (Content-Length or chunked,
never both, nothing else). An `Exchange` then carries that one request: h11 reads the body as the
*checked* head frames it and writes the request afresh (HTTP/1.1, origin form, hop-by-hop fields
dropped, `Connection: close`) to a new upstream connection, then reads the response and writes it
back framed for the client (Content-Length, chunked or close-delimited; no body for HEAD, 1xx, 204
and 304). The upstream never sees the client's raw bytes, nor the client the upstream's.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11

from .allowlist import normalise_host, parse_port, split_host_port

__all__ = ["AmbiguousFraming", "BadRequest", "ClientGone", "Exchange", "HeadTooLarge", "HostMismatch",
           "MAX_HEAD_BYTES", "MAX_HEADERS", "ProxyRequest", "UpstreamFailed", "answer", "parse_request",
           "parse_tunnelled", "read_head", "receive_some"]

MAX_HEAD_BYTES = 16384
MAX_HEADERS = 100
MAX_RESPONSE_HEAD_BYTES = 65536
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/1\.([01])")
_FIELD_NAME = re.compile(_TOKEN)
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e\x80-\xff](?:[\t ]*[\x21-\x7e\x80-\xff])*)?")  # OWS stripped
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                         "proxy-authenticate", "te", "trailer", "upgrade"})
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)

Fields = tuple[tuple[str, str], ...]


class BadRequest(ValueError):
    """The client's request is not one this proxy serves (answered 400)."""

    def __init__(self, message: str, *, host: str | None = None, port: int | None = None) -> None:
        super().__init__(message)
        self.host = host  # the target, when it was parsed before the problem was found
        self.port = port


class HeadTooLarge(BadRequest):
    """A head over the size bound, or with more header fields than allowed (answered 431)."""


class HostMismatch(BadRequest):
    """The Host header names another host or port than the target, or appears more than once."""


class AmbiguousFraming(BadRequest):
    """The body framing is ambiguous or invalid, which is what request smuggling needs."""


class ClientGone(Exception):
    """The client closed or broke its connection in the middle of a request."""


class UpstreamFailed(Exception):
    """The upstream closed, broke, or answered with something that is not an HTTP/1.x response."""


@dataclass(frozen=True)
class ProxyRequest:
    """A checked proxy request: where to, and for plain HTTP what to ask there."""

    method: str
    host: str  # canonical (allowlist.normalise_host)
    port: int
    target: str = ""  # plain HTTP: the origin-form target (`/path?query`); CONNECT: the authority
    version: str = "1.1"
    fields: Fields = ()  # plain HTTP: the client's header fields, checked, Host first (filled in when missing)

    @property
    def client_head(self) -> bytes:
        """The checked head, written out again: what h11 takes the body framing and keep-alive from."""
        lines = [f"{self.method} {self.target} HTTP/{self.version}", *(f"{n}: {v}" for n, v in self.fields)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def upstream_request(self) -> h11.Request:
        """The request for the upstream: HTTP/1.1, hop-by-hop fields dropped, one request per connection."""
        listed = {token.strip().lower() for name, value in self.fields if name.lower() == "connection"
                  for token in value.split(",")}
        dropped = (_HOP_BY_HOP | listed) - _FRAMING - {"host"}
        fields = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.fields if n.lower() not in dropped]
        fields.append((b"Connection", b"close"))
        return h11.Request(method=self.method.encode(), target=self.target.encode(), headers=fields)

    @property
    def upstream_head(self) -> bytes:
        """The head the upstream receives (empty for CONNECT, whose bytes are the client's own)."""
        if self.method == "CONNECT":
            return b""
        return h11.Connection(h11.CLIENT).send(self.upstream_request()) or b""


def parse_request(head: bytes, *, max_head_bytes: int = MAX_HEAD_BYTES,
                  max_headers: int = MAX_HEADERS) -> ProxyRequest:
    """Parse and check a request head (without its blank line): a CONNECT authority or an absolute http:// URL.

    Total: raises BadRequest (or its HeadTooLarge, HostMismatch, AmbiguousFraming) and nothing else.
    """
    if len(head) > max_head_bytes:
        raise HeadTooLarge("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) - 1 > max_headers:
        raise HeadTooLarge("too many header fields")
    method, target, minor, fields = _request_parts(lines)
    if method == "CONNECT":
        return _connect(target)
    return _absolute(method, target, f"1.{minor}", fields)


def parse_tunnelled(head: bytes, host: str, port: int, *, max_head_bytes: int = MAX_HEAD_BYTES,
                    max_headers: int = MAX_HEADERS) -> ProxyRequest:
    """Parse and check a request head read inside a terminated TLS tunnel to `host:port` (canonical).

    The target must be origin-form (`/path`), the Host header must name `host` (and `port`, if it
    gives one; filled in when missing), the framing unambiguous. Total, like `parse_request`.
    """
    if len(head) > max_head_bytes:
        raise HeadTooLarge("request head too large", host=host, port=port)
    lines = head.decode("latin-1").split("\r\n")
    if len(lines) - 1 > max_headers:
        raise HeadTooLarge("too many header fields", host=host, port=port)
    method, target, minor, fields = _request_parts(lines)
    if method == "CONNECT" or not target.startswith("/"):
        raise BadRequest("only origin-form requests are served inside a tunnel", host=host, port=port)
    version = f"1.{minor}"
    sent = _host_field(fields, host, port)
    _check_framing(fields, version, host, port)
    rest = tuple((name, value) for name, value in fields if name.lower() != "host")
    authority = host if port == 443 else f"{host}:{port}"
    return ProxyRequest(method, host, port, target, version, (("Host", sent or authority), *rest))


def _request_parts(lines: list[str]) -> tuple[str, str, str, Fields]:
    request_line = _REQUEST_LINE.fullmatch(lines[0])
    if request_line is None:
        raise BadRequest("malformed request line")
    method, target, minor = request_line.groups()
    return method, target, minor, tuple(_field(line) for line in lines[1:])


def _field(line: str) -> tuple[str, str]:
    name, colon, value = line.partition(":")
    value = value.strip(" \t")
    if not colon or not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
        raise BadRequest("malformed header field")  # also obs-fold, and space before the colon
    return name, value


def _connect(authority: str) -> ProxyRequest:
    try:
        host, port_text = split_host_port(authority)
        port = parse_port(port_text) if port_text is not None else None
    except ValueError:
        raise BadRequest("bad CONNECT authority") from None
    if port is None:
        raise BadRequest("CONNECT needs host:port")
    return ProxyRequest("CONNECT", _valid_host(host), port, authority)


def _absolute(method: str, target: str, version: str, fields: Fields) -> ProxyRequest:
    try:
        url = urlsplit(target)  # raises ValueError for some bracketed netlocs
    except ValueError:
        raise BadRequest("malformed URL authority") from None
    if url.scheme != "http" or not url.netloc:
        raise BadRequest("only absolute http:// URLs are proxied; use CONNECT for https")
    try:  # the authority as this module reads it everywhere, not urlsplit's lenient hostname and port
        host_text, port_text = split_host_port(url.netloc)
        port = parse_port(port_text) if port_text is not None else 80
    except ValueError:
        raise BadRequest("malformed URL authority") from None
    if "@" in url.netloc or (":" in host_text and not url.netloc.startswith("[")):
        raise BadRequest("malformed URL authority")
    host = _valid_host(host_text)
    sent = _host_field(fields, host, port)
    _check_framing(fields, version, host, port)
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    rest = tuple((name, value) for name, value in fields if name.lower() != "host")
    return ProxyRequest(method, host, port, path, version, (("Host", sent or url.netloc), *rest))


def _valid_host(host: str) -> str:
    canonical = normalise_host(host)
    if canonical is None:
        raise BadRequest("the target is not a host name or IP address")
    return canonical


def _host_field(fields: Fields, host: str, port: int) -> str | None:
    """The client's Host value when it names `host` (and `port`, if it gives one); None when absent."""
    values = [value for name, value in fields if name.lower() == "host"]
    if len(values) > 1:
        raise HostMismatch("more than one Host header", host=host, port=port)
    if not values:
        return None
    try:
        name, port_text = split_host_port(values[0])
        same = normalise_host(name) == host and (port_text is None or parse_port(port_text) == port)
    except ValueError:
        same = False
    if not same:
        raise HostMismatch("the Host header does not name the requested host", host=host, port=port)
    return values[0]


def _check_framing(fields: Fields, version: str, host: str, port: int) -> None:
    lengths = [value for name, value in fields if name.lower() == "content-length"]
    codings = [value for name, value in fields if name.lower() == "transfer-encoding"]
    if lengths and codings:
        raise AmbiguousFraming("both Content-Length and Transfer-Encoding", host=host, port=port)
    if len(lengths) > 1 or len(codings) > 1:
        raise AmbiguousFraming("a repeated framing header", host=host, port=port)
    if lengths and not _CONTENT_LENGTH.fullmatch(lengths[0]):
        raise AmbiguousFraming("a malformed Content-Length", host=host, port=port)
    if codings and (codings[0].lower() != "chunked" or version == "1.0"):
        raise AmbiguousFraming("a Transfer-Encoding other than chunked (HTTP/1.1)", host=host, port=port)


async def receive_some(stream: anyio.abc.ByteStream) -> bytes:
    """The next bytes from `stream`; empty once it has ended or broken."""
    try:
        return await stream.receive()
    except (anyio.EndOfStream, *_STREAM_ERRORS):
        return b""


async def answer(stream: anyio.abc.ByteStream, status: int, message: str) -> None:
    """Answer with `status` and a one-line text body, announcing the connection's close; never raises."""
    phrase = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 431: "Request Header Fields Too Large",
              502: "Bad Gateway"}.get(status, "Error")
    body = f"sandboxd egress: {message}\n".encode("utf-8", "replace")
    head = (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        await stream.send(head + body)
    except _STREAM_ERRORS:
        pass


async def read_head(stream: anyio.abc.ByteStream, buffered: bytes = b"", *,
                    max_bytes: int = MAX_HEAD_BYTES) -> tuple[bytes, bytes] | None:
    """The next request head (without its blank line) and the bytes after it; None if the stream ends first.

    Empty lines before a request are skipped (RFC 9112 section 2.2); HeadTooLarge past `max_bytes`.
    """
    buffer, searched = buffered, 0
    while True:
        if buffer[:1] in (b"\r", b"\n"):
            buffer, searched = buffer.lstrip(b"\r\n"), 0
        end = buffer.find(b"\r\n\r\n", searched)
        if end > max_bytes or (end < 0 and len(buffer) > max_bytes):
            raise HeadTooLarge("request head too large")
        if end >= 0:
            return buffer[:end], buffer[end + 4:]
        searched = max(0, len(buffer) - 3)
        try:
            buffer += await stream.receive()
        except anyio.EndOfStream:
            return None


Step = Callable[[anyio.abc.ByteStream, h11.Connection], Awaitable[None]]


class Exchange:
    """One plain HTTP request of a client connection: its body out to a new upstream connection, the response back.

    Built from the checked request and the client's bytes that followed its head; h11 reads the
    body from those (BadRequest if h11 refuses the head). After `relay`, `leftover` holds what the
    client sent next when the connection may carry another request.
    """

    def __init__(self, client: anyio.abc.ByteStream, request: ProxyRequest, buffered: bytes, *,
                 max_head_bytes: int = MAX_HEAD_BYTES, outgoing: Fields | None = None,
                 redact: tuple[bytes, ...] = ()) -> None:
        self.client = client
        self.request = request
        # What the upstream gets instead of the client's fields (a credential injected), and the
        # values no response header may carry back to the client.
        self._outgoing = outgoing
        self._redact = redact
        self._error: Exception | None = None
        self._server = h11.Connection(h11.SERVER, max_incomplete_event_size=2 * max_head_bytes)
        self._server.receive_data(request.client_head + buffered)
        try:
            event = self._server.next_event()
        except h11.RemoteProtocolError:
            raise BadRequest("malformed request", host=request.host, port=request.port) from None
        if not isinstance(event, h11.Request):
            raise BadRequest("malformed request", host=request.host, port=request.port)

    @property
    def answered(self) -> bool:
        """Whether a final response has begun towards the client (an error can then only close)."""
        return self._server.our_state is not h11.SEND_RESPONSE

    @property
    def leftover(self) -> bytes | None:
        """The client's bytes after this request when its connection may carry another one, else None."""
        if self._server.our_state is h11.DONE and self._server.their_state is h11.DONE:
            return bytes(self._server.trailing_data[0])
        return None

    async def relay(self, upstream: anyio.abc.ByteStream) -> None:
        """Send the request to `upstream`, its response back; raises BadRequest, ClientGone or UpstreamFailed."""
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)
        request = self.request if self._outgoing is None else replace(self.request, fields=self._outgoing)
        await _send(upstream, conn, request.upstream_request(), UpstreamFailed)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._guarded, self._body_out, upstream, conn, tg.cancel_scope)
            await self._guarded(self._response_back, upstream, conn, tg.cancel_scope)
            tg.cancel_scope.cancel()  # a body still coming after the whole response: not kept alive
        if self._error is not None:
            raise self._error

    async def _guarded(self, step: Step, upstream: anyio.abc.ByteStream, conn: h11.Connection,
                       scope: anyio.CancelScope) -> None:
        try:
            await step(upstream, conn)
        except (BadRequest, ClientGone, UpstreamFailed) as exc:
            self._error = self._error or exc
            scope.cancel()

    async def _body_out(self, upstream: anyio.abc.ByteStream, conn: h11.Connection) -> None:
        request = self.request
        while True:
            event = await _next_event(self._server, self.client, ClientGone,
                                      lambda: AmbiguousFraming("invalid request body framing",
                                                               host=request.host, port=request.port))
            if isinstance(event, h11.Data):
                await _send(upstream, conn, h11.Data(data=event.data), UpstreamFailed)
            elif isinstance(event, h11.EndOfMessage):
                await _send(upstream, conn, h11.EndOfMessage(), UpstreamFailed)  # trailers are not passed on
                return
            else:
                raise ClientGone("the client closed before the request body ended")

    async def _response_back(self, upstream: anyio.abc.ByteStream, conn: h11.Connection) -> None:
        while True:
            event = await _next_event(conn, upstream, UpstreamFailed, lambda: UpstreamFailed("not HTTP/1.x"))
            out: h11.Response | h11.InformationalResponse | h11.Data | h11.EndOfMessage
            if isinstance(event, h11.Response):
                out = h11.Response(status_code=event.status_code, headers=_end_to_end(event, self._redact),
                                   reason=event.reason)
            elif isinstance(event, h11.InformationalResponse):
                out = h11.InformationalResponse(status_code=event.status_code,
                                                headers=_end_to_end(event, self._redact), reason=event.reason)
            elif isinstance(event, h11.Data):
                out = h11.Data(data=event.data)
            elif isinstance(event, h11.EndOfMessage):
                out = h11.EndOfMessage()
            else:
                raise UpstreamFailed("the upstream closed before its response ended")
            await _send(self.client, self._server, out, ClientGone)
            if isinstance(out, h11.EndOfMessage):
                return


def _end_to_end(event: h11.Response | h11.InformationalResponse,
                redact: tuple[bytes, ...] = ()) -> list[tuple[bytes, bytes]]:
    """A response's fields without hop-by-hop ones and without its framing, which h11 writes afresh.

    A field whose value holds one of `redact` (an injected credential echoed back) is dropped.
    """
    headers = event.headers
    listed = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    dropped = {name.encode() for name in _HOP_BY_HOP} | listed | {b"transfer-encoding"}
    if any(name == b"transfer-encoding" for name, _ in headers):
        dropped.add(b"content-length")  # chunked wins (RFC 9112 6.3); h11 has already read it so
    return [(raw, value) for raw, value in headers.raw_items()
            if raw.lower() not in dropped and not any(secret in value for secret in redact if secret)]


async def _next_event(conn: h11.Connection, stream: anyio.abc.ByteStream, gone: type[Exception],
                      malformed: Callable[[], Exception]) -> object:
    """The next event `conn` reads from `stream`: `gone` if the stream breaks, `malformed()` for bad framing."""
    closed = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise (gone("closed mid-message") if closed else malformed()) from exc
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive()
        except anyio.EndOfStream:
            data, closed = b"", True
        except _STREAM_ERRORS as exc:
            raise gone("connection broken") from exc
        conn.receive_data(data)


async def _send(stream: anyio.abc.ByteStream, conn: h11.Connection, event: h11.Event,
                gone: type[Exception]) -> None:
    try:
        data = conn.send(event)
    except h11.LocalProtocolError as exc:  # what the upstream sent cannot be passed on as HTTP/1.1
        raise UpstreamFailed("a response that cannot be relayed") from exc
    if data:
        try:
            await stream.send(data)
        except _STREAM_ERRORS as exc:
            raise gone("connection broken") from exc
