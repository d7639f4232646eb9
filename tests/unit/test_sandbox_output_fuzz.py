"""Property tests of what a sandbox can send the daemon: its stdout events and its API requests.

A tool writes what it likes to PID 1's stdout and to /run/sandboxd/api.sock. Whatever it is:

- `parse_event` returns a `SandboxEvent` (every field typed, finite and bounded) or a `Dropped`,
  and never raises; the lines the entrypoint writes come back as they were sent;
- `LineSplitter` holds at most MAX_EVENT_LINE bytes (one chunk more while it splits it), and cuts
  the stream exactly as a plain split on newlines would, an over-long line coming out as one
  OVERSIZED however long it runs;
- `allowed_route` never raises and lets through only the grant's own item, session and the
  SDK worker's shapes of path;
- `ApiBroker.handle`, fed any bytes through an in-memory stream pair, returns (answering with
  HTTP/1.1 or closing), never raises, and forwards only allowed routes, carrying the real
  credential and never the placeholder.

No example database is written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Self

import anyio
import anyio.abc
import anyio.lowlevel
import httpx2
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typing_extensions import Buffer

from sandboxd.network.broker import ApiBroker, BrokerLimits, Door, Grant, Refusal, Traffic, allowed_route
from sandboxd.protocol import (
    _LATEST_TIME,
    _MAX_NAME,
    MAX_EVENT_LINE,
    Dropped,
    Event,
    LineSplitter,
    SandboxEvent,
    event_line,
    parse_event,
)

FUZZ = settings(database=None, deadline=timedelta(seconds=2), max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- parse_event -----------------------------------------------------------------------------------

def _check_event(result: SandboxEvent | Dropped) -> None:
    assert isinstance(result, SandboxEvent | Dropped), result
    if isinstance(result, Dropped):
        return
    assert isinstance(result.kind, Event)
    assert isinstance(result.at, float) and math.isfinite(result.at) and 0 <= result.at < _LATEST_TIME
    assert isinstance(result.tool, str) and len(result.tool) <= _MAX_NAME
    assert isinstance(result.ok, bool)
    assert result.seconds is None or (isinstance(result.seconds, float) and math.isfinite(result.seconds)
                                      and 0 <= result.seconds < _LATEST_TIME)


@FUZZ
@given(st.binary(max_size=2 * MAX_EVENT_LINE))
def test_any_bytes_are_an_event_or_dropped(raw: bytes) -> None:
    _check_event(parse_event(raw))


HUGE = [10**400, -(10**400), 1e308, 99999999999999999999999999999999999999, -0.0, 1e11, 1e11 - 1]
NUMBERS = st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.booleans() | st.sampled_from(HUGE)
JSON = st.recursive(st.none() | st.booleans() | NUMBERS | st.text(max_size=80),
                    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children,
                                                                                      max_size=5),
                    max_leaves=12)
KINDS = st.sampled_from([e.value for e in Event] + ["stopped", "", "READY", "tool_start\x00"]) | JSON


@st.composite
def event_objects(draw: st.DrawFn) -> Any:
    """Mostly objects shaped like events (the interesting path), sometimes any JSON at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(JSON)
    message = {"event": draw(KINDS), "t": draw(NUMBERS | JSON)}
    for key, values in (("tool", st.text(max_size=2 * _MAX_NAME) | JSON), ("outcome", st.just("ok") | JSON),
                        ("seconds", NUMBERS | JSON), ("first", JSON)):
        if draw(st.booleans()):
            message[key] = draw(values)
    return message


@FUZZ
@given(event_objects())
def test_any_json_is_an_event_or_dropped(message: Any) -> None:
    _check_event(parse_event(json.dumps(message).encode()))


@FUZZ
@given(st.sampled_from([b"[", b"{\"a\":", b"[{\"event\":"]), st.integers(1, MAX_EVENT_LINE), st.booleans())
def test_deep_nesting_is_dropped(opening: bytes, depth: int, closed: bool) -> None:
    raw = (opening * depth)[:MAX_EVENT_LINE]
    if closed:
        raw = raw[: len(raw) // 2] + b"]" * (len(raw) // 2)
    result = parse_event(raw)
    assert isinstance(result, Dropped), result


@FUZZ
@given(st.sampled_from(list(Event)), st.floats(0, 1e10), st.text(max_size=_MAX_NAME),  # wall clocks to year 2286
       st.booleans(), st.floats(0, 1e6))
def test_the_entrypoints_lines_come_back_as_sent(kind: Event, at: float, tool: str, ok: bool, seconds: float) -> None:
    line = event_line(kind, at, tool=tool, outcome="ok" if ok else "error", seconds=seconds)
    result = parse_event(line.rstrip(b"\n"))
    assert isinstance(result, SandboxEvent), (line, result)
    assert (result.kind, result.tool, result.ok) == (kind, tool, ok)
    assert result.at == round(at, 3)
    assert result.seconds == seconds


# --- LineSplitter ----------------------------------------------------------------------------------

class _Tracked(bytearray):
    """A buffer that remembers the most it ever held."""

    peak = 0

    def __iadd__(self, other: Buffer, /) -> Self:  # type: ignore[override]  # as typeshed's bytearray
        super().__iadd__(other)
        self.peak = max(self.peak, len(self))
        return self


def _reference(stream: bytes) -> list[bytes | Dropped]:
    """What splitting the whole stream on newlines gives (an unfinished over-long line is already out)."""
    *lines, tail = stream.split(b"\n")
    out: list[bytes | Dropped] = []
    for line in lines:
        if len(line) > MAX_EVENT_LINE:
            out.append(Dropped.OVERSIZED)
        elif line.strip():
            out.append(line)
    if len(tail) > MAX_EVENT_LINE:
        out.append(Dropped.OVERSIZED)
    return out


PIECES = (st.binary(max_size=300) | st.just(b"\n") | st.just(b"\n\n  \n")
          | st.builds(lambda n, c: c * n, st.integers(1, 3 * MAX_EVENT_LINE), st.sampled_from([b"a", b"[", b" "]))
          | st.builds(lambda e: json.dumps(e).encode() + b"\n", event_objects()))


@FUZZ
@given(st.lists(PIECES, max_size=30), st.data())
def test_the_splitter_is_bounded_and_cuts_as_a_plain_split(pieces: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    splitter = LineSplitter()
    buffer = splitter._buffer = _Tracked()
    out: list[bytes | Dropped] = []
    for chunk in chunks:
        buffer.peak = 0
        lines = splitter.feed(chunk)
        assert buffer.peak <= MAX_EVENT_LINE + len(chunk)
        assert len(splitter._buffer) <= MAX_EVENT_LINE
        for line in lines:
            assert line is Dropped.OVERSIZED or (isinstance(line, bytes) and b"\n" not in line
                                                 and 0 < len(line) <= MAX_EVENT_LINE), line
            _check_event(line if isinstance(line, Dropped) else parse_event(line))
        out += lines
    assert out == _reference(stream)


def test_an_endless_line_is_one_oversized_and_holds_no_more_than_the_bound() -> None:
    splitter = LineSplitter()
    out: list[bytes | Dropped] = []
    for _ in range(20 * 1024):  # 20 MiB of 'a' with no newline, in 1 KiB writes
        out += splitter.feed(b"a" * 1024)
        assert len(splitter._buffer) <= MAX_EVENT_LINE
    assert out == [Dropped.OVERSIZED]
    assert splitter.feed(b'\n{"event":"ready","t":1}\n') == [b'{"event":"ready","t":1}']


# --- allowed_route ---------------------------------------------------------------------------------

IDS = st.text(min_size=1, max_size=40)
SAFE = re.compile(r"[A-Za-z0-9_\-]+")


@FUZZ
@given(IDS, IDS, IDS, st.text(max_size=12), st.text(max_size=200))
def test_allowed_route_never_raises_and_allows_nothing_unshaped(env: str, work: str, session: str, method: str,
                                                                path: str) -> None:
    grant = Grant(work, env, session, "placeholder", "credential")
    kind = allowed_route(grant, method, path)
    assert kind is None or isinstance(kind, Traffic)
    if kind is None:
        return
    assert method in ("GET", "POST", "PATCH", "DELETE")
    own = {"env": env, "work": work, "session": session}
    # Whatever is not the grant's own id in the path is a plain [A-Za-z0-9_-] id.
    rest = path
    for value in sorted(own.values(), key=len, reverse=True):
        rest = rest.replace(value, "ID")
    assert re.fullmatch(r"(/[A-Za-z0-9_\-]+)+", rest), path
    if kind in (Traffic.HEARTBEAT_OK, Traffic.STOPPED):
        assert path == f"/v1/environments/{env}/work/{work}/{'heartbeat' if kind is Traffic.HEARTBEAT_OK else 'stop'}"


OTHER_PATHS = st.sampled_from([
    "/v1/environments/env_1/work/poll", "/v1/environments/env_1/work/work_2/stop",
    "/v1/environments/env_2/work/work_1/heartbeat", "/v1/sessions/sesn_2", "/v1/sessions/sesn_12",
    "/v1/sessions/sesn_1/../../v1/agents", "/v1/sessions/sesn_1/", "//v1/sessions/sesn_1", "/v1/agents",
    "/v1/sessions/sesn_1/events/stream/x", "/V1/sessions/sesn_1", "/v1/sessions/sesn_1\n",
    "/v1/skills/../versions/1", "/v1/memory_stores/m/memories/a/b", "/v1/environments/env_1/work/work_1",
])


@FUZZ
@given(st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "HEAD"]), OTHER_PATHS)
def test_other_items_and_sessions_are_never_allowed(method: str, path: str) -> None:
    assert allowed_route(Grant("work_1", "env_1", "sesn_1", "p", "c"), method, path) is None


# --- ApiBroker.handle ------------------------------------------------------------------------------

PLACEHOLDER = "sandboxd-placeholder-" + "ab" * 24
REAL = "sk-ant-real-credential-0123456789"
GRANT = Grant("work_1", "env_1", "sesn_1", PLACEHOLDER, REAL)
ALLOWED = [("POST", "/v1/environments/env_1/work/work_1/heartbeat"),
           ("POST", "/v1/environments/env_1/work/work_1/stop"),
           ("GET", "/v1/sessions/sesn_1"), ("GET", "/v1/sessions/sesn_1/events"),
           ("GET", "/v1/sessions/sesn_1/events/stream"), ("POST", "/v1/sessions/sesn_1/events"),
           ("GET", "/v1/skills/skill_1/versions/3/content"), ("DELETE", "/v1/memory_stores/ms_1/memories/m_1")]
TARGETS = st.sampled_from([path for _, path in ALLOWED]) | OTHER_PATHS | st.sampled_from([
    "/v1/sessions/sesn_1?beta=true", "/v1/sessions/sesn_1%2F..%2Fagents", "/v1/sessions/sesn_1#x", "*",
    "http://api.example/v1/sessions/sesn_1", "api.example:443", "/v1/sessions/sesn_1/events?after=@evil.example",
]) | st.text(max_size=40)
CREDENTIALS = st.sampled_from([
    [], [f"Authorization: Bearer {PLACEHOLDER}"], [f"Authorization: Bearer {PLACEHOLDER}"],
    ["Authorization: Bearer sk-ant-api03-made-up"], [f"x-api-key: {PLACEHOLDER}"],
    [f"authorization: bearer {PLACEHOLDER}"], [f"Authorization: Bearer {PLACEHOLDER}x"],
    [f"Authorization: Bearer {PLACEHOLDER}", f"Authorization: Bearer {PLACEHOLDER}"],
    [f"Authorization: Bearer {PLACEHOLDER}", "x-api-key: sk-ant-api03-made-up"],
])
FRAMING = st.sampled_from(["", "Content-Length: {n}", "Transfer-Encoding: chunked", "Content-Length: 99999999999",
                           "Content-Length: -1", "Content-Length: {n}\r\nTransfer-Encoding: chunked",
                           "Content-Length: {n}\r\nContent-Length: 1", "Expect: 100-continue\r\nContent-Length: {n}"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request a hostile tool (or the worker) might write: shaped like the worker's, then varied,
    mangled or cut; about one in four is the worker's own call, untouched."""
    hostility = draw(st.integers(0, 7))
    if hostility == 0:
        return draw(st.binary(max_size=2000))
    method, target = draw(st.sampled_from(ALLOWED))
    credentials = [f"Authorization: Bearer {PLACEHOLDER}"]
    body = draw(st.binary(max_size=200))
    framing = f"Content-Length: {len(body)}"
    extra: list[str] = []
    if hostility >= 3:
        method = draw(st.sampled_from([method, "GET", "POST", "PATCH", "DELETE", "PUT", "CONNECT", "get", "G T"]))
        target = draw(st.just(target) | TARGETS)
        credentials = draw(st.just(credentials) | CREDENTIALS)
        framing = draw(st.just(framing) | FRAMING).replace("{n}", str(len(body)))
        extra = draw(st.lists(st.sampled_from(["Connection: close", "Connection: keep-alive", "Upgrade: h2c",
                                               "X-Pad: " + "p" * 40000, "Bad Header: x", "Host: evil.example"]),
                              max_size=2))
    if "chunked" in framing:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    headers = ["Host: sandboxd-broker", *credentials, *([framing] if framing else []), *extra]
    raw = (f"{method} {target} HTTP/1.1\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode("utf-8", "replace") + body
    if hostility >= 5:  # mangle: cut it short, or splice in bytes
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] if draw(st.booleans()) else raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    return raw


class MemoryByteStream(anyio.abc.ByteStream):
    """One end of an in-memory byte stream pair (anyio memory object streams underneath)."""

    def __init__(self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]) -> None:
        self._send, self._receive = send, receive

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    async def send(self, item: bytes) -> None:
        await self._send.send(item)

    async def send_eof(self) -> None:
        await self._send.aclose()

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def stream_pair() -> tuple[MemoryByteStream, MemoryByteStream]:
    a_send, b_receive = anyio.create_memory_object_stream[bytes](1024)
    b_send, a_receive = anyio.create_memory_object_stream[bytes](1024)
    return MemoryByteStream(a_send, a_receive), MemoryByteStream(b_send, b_receive)


class _Streamed(httpx2.AsyncByteStream):
    """A response body as the network gives it (a body given whole would be read at once by httpx)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body


@dataclass
class Upstream:
    """The API, as a mock transport: it records what the broker forwards and answers 200."""

    forwarded: list[httpx2.Request] = field(default_factory=list)

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        self.forwarded.append(request)
        body = b'{"ok":true}'
        return httpx2.Response(200, headers={"content-type": "application/json", "content-length": str(len(body))},
                               stream=_Streamed(body))


async def _throw(chunks: list[bytes]) -> tuple[bytes, list[Refusal], list[Traffic], Upstream]:
    upstream, refusals, seen = Upstream(), list[Refusal](), list[Traffic]()
    broker = ApiBroker("https://api.example", client=httpx2.AsyncClient(transport=httpx2.MockTransport(upstream)),
                       limits=BrokerLimits(header_timeout_seconds=0.2, idle_timeout_seconds=0.2,
                                           body_timeout_seconds=0.2, max_body_bytes=1000),
                       on_refused=refusals.append)
    client, server = stream_pair()
    answer = bytearray()
    with anyio.fail_after(10):  # every path through `handle` ends: answered, refused, closed or timed out
        async with client, anyio.create_task_group() as tg:

            async def serve() -> None:  # as the listener does: handle, then close
                async with server:
                    await broker.handle(server, Door("fuzz", GRANT, seen.append))

            tg.start_soon(serve)
            for chunk in chunks:
                try:
                    await client.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break  # refused and closed before all of it was sent
            await client.send_eof()
            while True:
                try:
                    answer += await client.receive()
                except anyio.EndOfStream:
                    break
    await broker.aclose()
    return bytes(answer), refusals, seen, upstream


def _check_forwarded(request: httpx2.Request) -> None:
    assert request.url.host == "api.example" and request.url.scheme == "https"
    assert request.headers.get_list("authorization") == [f"Bearer {REAL}"]
    assert "x-api-key" not in request.headers
    assert PLACEHOLDER not in str(request.headers.raw) and PLACEHOLDER.encode() not in request.content
    path = request.url.raw_path.decode().partition("?")[0]
    assert "%" not in path and allowed_route(GRANT, request.method, path) is not None, request.url


@settings(FUZZ, max_examples=200)
@given(st.lists(requests(), min_size=1, max_size=3), st.data())
def test_the_broker_answers_or_closes_and_forwards_only_the_grant(reqs: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(reqs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [c for c in (stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)) if c]
    answer, refusals, seen, upstream = anyio.run(_throw, chunks)
    event(f"forwarded {min(len(upstream.forwarded), 2)}")  # --hypothesis-show-statistics
    for refusal in refusals:
        event(f"refused {refusal.value}")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
    for request in upstream.forwarded:
        _check_forwarded(request)
    if PLACEHOLDER.encode() not in stream:
        assert upstream.forwarded == []
    assert len(seen) == len(upstream.forwarded)  # each forwarded call's answer was observed, nothing else
    statuses = re.findall(rb"^HTTP/1\.1 (\d{3}) ", answer, re.MULTILINE)
    assert len(refusals) <= len(reqs) and all(isinstance(r, Refusal) for r in refusals)
    assert len(statuses) <= len(upstream.forwarded) + len(refusals), (answer[:300], refusals)


@FUZZ
@given(st.sampled_from(ALLOWED), st.binary(max_size=500))
def test_the_workers_own_calls_are_forwarded_with_the_real_credential(call: tuple[str, str], body: bytes) -> None:
    method, path = call
    if method == "POST" and path.endswith("/events"):  # the worker posts its tool results, and nothing else
        body = json.dumps({"events": [{"type": "user.tool_result", "tool_use_id": "toolu_1",
                                       "content": [{"type": "text", "text": body.hex()}]}]}).encode()
    raw = (f"{method} {path} HTTP/1.1\r\nHost: sandboxd-broker\r\nAuthorization: Bearer {PLACEHOLDER}\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    answer, refusals, seen, upstream = anyio.run(_throw, [raw])
    assert refusals == [] and answer.startswith(b"HTTP/1.1 200 "), (answer[:200], refusals)
    assert len(upstream.forwarded) == 1
    _check_forwarded(upstream.forwarded[0])
    assert upstream.forwarded[0].content == body


@FUZZ
@given(st.binary(max_size=4000), st.integers(1, 8))
def test_random_bytes_are_refused_or_closed_and_never_forwarded(data: bytes, pieces: int) -> None:
    size = max(1, len(data) // pieces)
    answer, refusals, _, upstream = anyio.run(_throw, [data[i:i + size] for i in range(0, len(data), size)])
    assert upstream.forwarded == []
    assert len(refusals) <= 1
    assert answer == b"" or re.match(rb"HTTP/1\.1 (400|403|408) ", answer), answer[:200]
