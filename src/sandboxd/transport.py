"""An HTTP transport for the SDK's client that lets sandboxd see and pace its requests.

The SDK's poller and worker own the protocol; sandboxd only needs to *observe* it (did the last
poll succeed, was a heartbeat refused with 412, did the force-stop land) and, inside a sandbox,
to *hold* one request — the session fetch that precedes every tool call — until the workspace is
ready. Both happen here, at the public `http_client=` seam, so the SDK runs unmodified.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import httpx2
from anthropic import DefaultAsyncHttpxClient

# (request, response or None, error or None, seconds taken) — called after every request.
Observer = Callable[[httpx2.Request, httpx2.Response | None, BaseException | None, float], None]
# Awaited before a request is sent; may block it (but is never subject to the client's timeouts).
Gate = Callable[[httpx2.Request], Awaitable[None]]


class HookedTransport(httpx2.AsyncBaseTransport):
    """Wraps the default transport with an optional gate before, and observers after, each request."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, *, gate: Gate | None = None) -> None:
        self._inner = inner
        self._gate = gate
        self._observers: list[Observer] = []

    def observe(self, observer: Observer) -> None:
        self._observers.append(observer)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._gate is not None:
            await self._gate(request)
        started = time.monotonic()
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException as exc:
            self._notify(request, None, exc, time.monotonic() - started)
            raise
        self._notify(request, response, None, time.monotonic() - started)
        return response

    def _notify(
        self, request: httpx2.Request, response: httpx2.Response | None, exc: BaseException | None, took: float
    ) -> None:
        for observer in self._observers:
            observer(request, response, exc, took)

    async def aclose(self) -> None:
        await self._inner.aclose()


def hooked_http_client(
    gate: Gate | None = None, *, uds: str | None = None
) -> tuple[httpx2.AsyncClient, HookedTransport]:
    """An SDK-default async HTTP client whose transport is a HookedTransport.

    With `uds`, every connection goes through that unix socket (the daemon's API broker); the URL,
    and so TLS and its certificate check, stay those of the API host.
    """
    transport = HookedTransport(httpx2.AsyncHTTPTransport(uds=uds), gate=gate)
    return DefaultAsyncHttpxClient(transport=transport), transport


def route(request: httpx2.Request) -> str:
    """A bounded name for a work-queue request: poll, ack, heartbeat, stop, stats, or other."""
    path = request.url.path.rstrip("/")
    if "/work/" in path:
        last = path.rsplit("/", 1)[-1]
        if last in ("poll", "ack", "heartbeat", "stop", "stats"):
            return last
    return "other"
