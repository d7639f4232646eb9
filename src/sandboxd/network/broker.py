"""The API broker: a sandbox's only path to the Managed Agents API, and only for its own work item.

Every sandbox has a socket of its own (`channels.py`), so the broker always knows which sandbox is
speaking. The SDK inside speaks plain HTTP/1.1 to it, carrying a placeholder credential that only
its worker was given (`Grant`). The broker parses each request once, with h11 and within bounds,
lets through only the calls the SDK's worker makes for its own item (`allowed_route`), swaps the
placeholder for the real credential and sends the request to the API itself, TLS and certificate
check included. Anything else is refused with 403 and counted (`Refusal`).

What goes by is also what the daemon believes about the item: an accepted heartbeat, a 412 (the
lease belongs to someone else), an accepted stop. Those observations (`Door.observe`) decide the
settlement; nothing a tool can print or send changes them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlsplit

import anyio
import anyio.abc
import h11
import httpx2

from ..logs import LogBudget

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 32 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024  # a tool result; the SDK caps file reads far below this
PLACEHOLDER_PREFIX = "sandboxd-placeholder-"
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization", b"x-api-key",
})
_RESPONSE_DROPPED = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"upgrade"})
_ID = r"[A-Za-z0-9_\-]{1,128}"


class Refusal(StrEnum):
    """The `reason` label of sandboxd_broker_refused_total."""

    NOT_ASSIGNED = "not_assigned"  # nothing is assigned to this sandbox (yet, or any more)
    CREDENTIAL = "credential"  # not the worker's placeholder: a tool, or a key of its own
    ROUTE = "route"  # not a call the worker makes for its own item
    BAD_REQUEST = "bad_request"  # not parseable HTTP/1.1, or over a bound
    BODY_TOO_LARGE = "body_too_large"
    TIMEOUT = "timeout"  # the request head or body did not arrive in time
    UPSTREAM = "upstream"  # the API could not be reached (answered 502)


class Traffic(StrEnum):
    """What the daemon learns from the worker's calls (`Door.observe`)."""

    HEARTBEAT_OK = "heartbeat_ok"
    LEASE_LOST = "lease_lost"  # a heartbeat met 412: another worker holds the item; never stop it
    LEASE_REFUSED = "lease_refused"  # another 4xx on a heartbeat: the item is not ours to keep
    STOPPED = "stopped"  # the worker's stop was accepted, or the item was already stopped (409)
    OTHER = "other"


@dataclass(frozen=True)
class Grant:
    """What one sandbox may do: its item's calls, with `placeholder` swapped for `credential`."""

    work_id: str
    environment_id: str
    session_id: str
    placeholder: str
    credential: str = field(repr=False)


@dataclass
class Door:
    """One sandbox's side of the broker: what it was granted, and who hears about its traffic."""

    name: str
    grant: Grant | None = None
    observe: Callable[[Traffic], None] = lambda traffic: None
    log_budget: LogBudget = field(default_factory=LogBudget)  # its refusals in the daemon's log
    # The opt-in credential rules its session asked for (its metadata), set before its tools run.
    credential_opt_in: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BrokerLimits:
    header_timeout_seconds: float = 10.0
    idle_timeout_seconds: float = 120.0
    body_timeout_seconds: float = 60.0
    max_body_bytes: int = MAX_BODY_BYTES


def placeholder_for(key: str, sandbox: str, work_id: str) -> str:
    """The credential a sandbox's worker is given: useless anywhere but on that sandbox's own socket.

    Derived, not stored: a daemon that adopts the sandbox after a restart computes the same one.
    """
    digest = hmac.new(key.encode(), f"{sandbox}\0{work_id}".encode(), hashlib.sha256).hexdigest()
    return PLACEHOLDER_PREFIX + digest[:48]


def placeholder_secret(placeholder: str) -> str:
    """A work-item `secret` (url-safe base64 JSON) whose sessions token is the placeholder."""
    raw = json.dumps({"sessions_token": placeholder}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def allowed_route(grant: Grant, method: str, path: str) -> Traffic | None:
    """The kind of a call the worker makes for its own item, or None when it is not one."""
    env, work, session = (re.escape(v) for v in (grant.environment_id, grant.work_id, grant.session_id))
    if method == "POST" and re.fullmatch(rf"/v1/environments/{env}/work/{work}/heartbeat", path):
        return Traffic.HEARTBEAT_OK
    if method == "POST" and re.fullmatch(rf"/v1/environments/{env}/work/{work}/stop", path):
        return Traffic.STOPPED
    if method == "GET" and re.fullmatch(rf"/v1/sessions/{session}(/events(/stream)?)?", path):
        return Traffic.OTHER
    if method == "POST" and re.fullmatch(rf"/v1/sessions/{session}/events", path):
        return Traffic.OTHER
    if method == "GET" and re.fullmatch(rf"/v1/skills/{_ID}/versions/{_ID}(/content)?", path):
        return Traffic.OTHER
    if method in ("GET", "POST", "PATCH", "DELETE") and re.fullmatch(
            rf"/v1/memory_stores/{_ID}/memories(/{_ID})?", path):
        return Traffic.OTHER
    return None


def worker_events(body: bytes) -> bool:
    """Whether a POST of session events holds only what the worker sends: results of its own tool calls.

    Never a user's message, interrupt or tool confirmation (a sandbox must not approve its own
    `always_ask` call), nor a custom tool's result (the application answers those).
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False
    events = payload.get("events") if isinstance(payload, dict) else None
    return isinstance(events, list) and bool(events) and all(
        isinstance(e, dict) and e.get("type") == "user.tool_result" for e in events)


def outcome_of(kind: Traffic, status: int) -> Traffic:
    """What a response to a call of `kind` tells the daemon."""
    if kind is Traffic.HEARTBEAT_OK:
        if 200 <= status < 300:
            return Traffic.HEARTBEAT_OK
        if status == 412:
            return Traffic.LEASE_LOST
        if 400 <= status < 500 and status not in (408, 409, 429):
            return Traffic.LEASE_REFUSED
    if kind is Traffic.STOPPED and (200 <= status < 300 or status == 409):
        return Traffic.STOPPED
    return Traffic.OTHER


class _Refused(Exception):
    def __init__(self, reason: Refusal, status: int, message: str) -> None:
        super().__init__(message)
        self.reason, self.status = reason, status


class ApiBroker:
    """Serves the sandboxes' API calls (one `handle` per connection), forwarding to `base_url`."""

    def __init__(self, base_url: str, *, client: httpx2.AsyncClient | None = None,
                 limits: BrokerLimits | None = None, on_refused: Callable[[Refusal], None] | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) base URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.limits = limits or BrokerLimits()
        # No read timeout: the session's event stream stays open; a call ends when its sandbox hangs
        # up (`_watch_client`). No pool cap: each sandbox's own socket caps its share.
        self._client = client or httpx2.AsyncClient(
            timeout=httpx2.Timeout(connect=10.0, read=None, write=60.0, pool=30.0), follow_redirects=False,
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64))
        self._on_refused = on_refused or (lambda reason: None)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> ApiBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def handle(self, stream: anyio.abc.ByteStream, door: Door) -> None:
        """Serve one connection of one sandbox: request after request, each checked, until it closes."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        first = True
        while True:
            timeout = self.limits.header_timeout_seconds if first else self.limits.idle_timeout_seconds
            try:
                request = await self._next_request(conn, stream, timeout, first)
                if request is None:
                    return
                await self._serve(conn, stream, door, request)
            except _Refused as refused:
                await self._refuse(conn, stream, door, refused)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            first = False

    async def _next_request(self, conn: h11.Connection, stream: anyio.abc.ByteStream, idle: float,
                            first: bool) -> h11.Request | None:
        """The next request head; None when the client closed (or idled out) between requests."""
        deadline = anyio.current_time() + idle
        while True:
            event = self._event(conn)
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            waited = not first and conn.their_state is h11.IDLE and not conn.trailing_data[0]
            if not await self._feed(conn, stream, deadline):
                if waited:
                    return None  # an idle keep-alive connection: closing it is no refusal
                raise _Refused(Refusal.TIMEOUT, 408, "the request head did not arrive in time")
            if deadline - anyio.current_time() > self.limits.header_timeout_seconds and conn.trailing_data[0]:
                deadline = anyio.current_time() + self.limits.header_timeout_seconds  # a head has begun

    @staticmethod
    def _event(conn: h11.Connection) -> object:
        try:
            return conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _Refused(Refusal.BAD_REQUEST, 400, f"malformed request: {exc}") from None

    @staticmethod
    async def _feed(conn: h11.Connection, stream: anyio.abc.ByteStream, deadline: float) -> bool:
        """Read more bytes into `conn` before `deadline` (b'' at end of stream); False on timeout."""
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            try:
                data = await stream.receive(65536)
            except anyio.EndOfStream:
                data = b""
            conn.receive_data(data)
            return True
        return False

    async def _read_body(self, conn: h11.Connection, stream: anyio.abc.ByteStream) -> bytes:
        body = bytearray()
        deadline = anyio.current_time() + self.limits.body_timeout_seconds
        while True:
            event = self._event(conn)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_body_bytes:
                    raise _Refused(Refusal.BODY_TOO_LARGE, 413, "the request body is too large")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise _Refused(Refusal.BAD_REQUEST, 400, "the connection closed inside a request body")
            elif event is h11.NEED_DATA and not await self._feed(conn, stream, deadline):
                raise _Refused(Refusal.TIMEOUT, 408, "the request body did not arrive in time")

    def _check(self, door: Door, request: h11.Request) -> tuple[Grant, Traffic, str]:
        # h11 bounds a head only while it is incomplete; one that arrived whole in a read is measured here.
        if len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers) > MAX_HEAD_BYTES:
            raise _Refused(Refusal.BAD_REQUEST, 431, "the request head is too large")
        names = [k for k, _ in request.headers]
        if b"transfer-encoding" in names and b"content-length" in names:  # ambiguous framing: smuggling
            raise _Refused(Refusal.BAD_REQUEST, 400, "both Content-Length and Transfer-Encoding")
        grant = door.grant
        if grant is None:
            raise _Refused(Refusal.NOT_ASSIGNED, 403, "this sandbox has no work item")
        presented = [v for k, v in request.headers if k in (b"authorization", b"x-api-key")]
        expected = f"Bearer {grant.placeholder}".encode()
        if len(presented) != 1 or not hmac.compare_digest(presented[0], expected):
            raise _Refused(Refusal.CREDENTIAL, 403, "only the sandbox's worker may call the API")
        target = request.target.decode("ascii", "replace")
        path, _, query = target.partition("?")
        kind = allowed_route(grant, request.method.decode("ascii", "replace"), path)
        if kind is None or not path.startswith("/") or "%" in path:
            raise _Refused(Refusal.ROUTE, 403, "not a call for this sandbox's work item")
        return grant, kind, target

    async def _serve(self, conn: h11.Connection, stream: anyio.abc.ByteStream, door: Door,
                     request: h11.Request) -> None:
        grant, kind, target = self._check(door, request)
        body = await self._read_body(conn, stream)
        if request.method == b"POST" and target.partition("?")[0].endswith("/events") and not worker_events(body):
            raise _Refused(Refusal.ROUTE, 403, "a sandbox's worker posts tool results only")
        headers = [(k, v) for k, v in request.headers if k not in _HOP_BY_HOP]
        headers.append((b"authorization", f"Bearer {grant.credential}".encode()))
        upstream = self._client.build_request(request.method.decode(), self.base_url + target,
                                              headers=headers, content=body)
        failed: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_client, conn, stream, tg.cancel_scope, name="broker-hangup")
            try:
                await self._exchange(conn, stream, door, kind, upstream)
            except httpx2.HTTPError as exc:
                failed.append(exc)
            finally:
                tg.cancel_scope.cancel()
        if failed:
            log.warning("broker_upstream_failed sandbox=%s error=%s", door.name, type(failed[0]).__name__)
            raise _Refused(Refusal.UPSTREAM, 502, "the API could not be reached")

    async def _exchange(self, conn: h11.Connection, stream: anyio.abc.ByteStream, door: Door, kind: Traffic,
                        upstream: httpx2.Request) -> None:
        """Send one checked request and relay its answer; a sandbox that hung up ends it quietly."""
        response = await self._client.send(upstream, stream=True)
        try:
            door.observe(outcome_of(kind, response.status_code))
            await self._relay(conn, stream, response)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.debug("broker_client_gone sandbox=%s error=%s", door.name, type(exc).__name__)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    @staticmethod
    async def _watch_client(conn: h11.Connection, stream: anyio.abc.ByteStream, relaying: anyio.CancelScope) -> None:
        """While a call is under way, notice the sandbox hanging up (its client timed out) and end the call.

        Bytes it sends meanwhile (a pipelined request) are kept for the next cycle, up to a head's size.
        """
        while len(conn.trailing_data[0]) <= MAX_HEAD_BYTES:
            try:
                data = await stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                relaying.cancel()
                return
            conn.receive_data(data)
        await anyio.sleep_forever()

    @staticmethod
    async def _relay(conn: h11.Connection, stream: anyio.abc.ByteStream, response: httpx2.Response) -> None:
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _RESPONSE_DROPPED]
        await stream.send(conn.send(h11.Response(status_code=response.status_code, headers=headers,
                                                 reason=response.reason_phrase.encode() or b"")) or b"")
        chunks: AsyncIterator[bytes] = response.aiter_raw()
        async for chunk in chunks:
            if chunk:
                await stream.send(conn.send(h11.Data(data=chunk)) or b"")
        await stream.send(conn.send(h11.EndOfMessage()) or b"")

    async def _refuse(self, conn: h11.Connection, stream: anyio.abc.ByteStream, door: Door,
                      refused: _Refused) -> None:
        self._on_refused(refused.reason)
        skipped = door.log_budget.take()
        if skipped is not None:
            log.warning("broker_refused sandbox=%s reason=%s%s", door.name, refused.reason.value,
                        f" (and {skipped} more refusals not logged)" if skipped else "")
        if conn.our_state is not h11.SEND_RESPONSE and conn.our_state is not h11.IDLE:
            return  # a response is already under way: all that is left is to close
        body = json.dumps({"type": "error", "error": {"type": "permission_error" if refused.status == 403
                                                      else "invalid_request_error",
                                                      "message": f"sandboxd broker: {refused}"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            data = conn.send(h11.Response(status_code=refused.status, headers=headers))
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            return
        await stream.send(data)
