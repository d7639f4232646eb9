"""HTTP plumbing shared by the control plane's routes.

Owns the per-route wrapper (request counting, simulated outages, injected
faults, the `anthropic-beta` check, `ApiError` → JSON error response), request parsing
helpers (Bearer credential, bounded int query params, JSON bodies) and the
SSE frame format.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .auth import bearer_token
from .clock import monotonic
from .errors import ApiError
from .state import ControlPlaneState

MANAGED_AGENTS_BETA = "managed-agents-2026-04-01"
Handler = Callable[[Request], Awaitable[Response]]


def error_response(error: ApiError) -> JSONResponse:
    """The JSON error answer for `error`, with its extra headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def credential(request: Request) -> str | None:
    """The caller's Bearer credential (or `X-Api-Key`)."""
    return bearer_token(request.headers.get("authorization"), request.headers.get("x-api-key"))


def int_param(request: Request, name: str, low: int, high: int | None = None) -> int | None:
    """An optional integer query parameter within [low, high]; otherwise 400."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"{name} must be {bound}")
    return value


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body; an empty body is `{}`, anything else invalid is 400."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def sse_frame(event_type: str, data: dict[str, Any]) -> bytes:
    """One server-sent event; the SDK drops events that lack the `event:` line."""
    return f"event: {event_type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _outage_gate(state: ControlPlaneState) -> None:
    """Hold the request while the outage mode is `hang`; answer 503 while it is `error`."""
    while state.outage == "hang" and not state.closing:
        generation = state.signal.generation
        if state.outage == "hang" and not state.closing:
            await state.signal.wait(generation, 0.5)
    if state.outage == "error":
        raise ApiError(503, "simulated outage")


async def _fault_gate(state: ControlPlaneState, route: str, request: Request) -> None:
    """Apply an injected `error` or `delay` to this request, before it touches the state."""
    rule = state.faults.pick(route, ("error", "delay"))
    if rule is None:
        return
    if rule.kind == "error":
        raise ApiError(rule.status, f"injected fault: {route} answered {rule.status}")
    await request.body()  # read first: checking for a disconnect would otherwise consume it
    deadline = monotonic() + rule.delay_seconds
    while not state.closing and monotonic() < deadline:
        generation = state.signal.generation
        await state.signal.wait(generation, min(0.25, max(0.0, deadline - monotonic())))
    if await request.is_disconnected():  # the caller gave up: as if the request never arrived
        raise ApiError(503, f"injected fault: {route} delayed past the caller's timeout")


def endpoint(state: ControlPlaneState, route: str, *, beta: bool = True) -> Callable[[Handler], Handler]:
    """Wrap a `/v1` handler: count it, apply the outage mode and faults, check the beta header, render errors."""

    def wrap(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            state.count_request(route)
            try:
                await _outage_gate(state)
                await _fault_gate(state, route, request)
                betas = {b.strip() for b in request.headers.get("anthropic-beta", "").split(",")}
                if beta and MANAGED_AGENTS_BETA not in betas:
                    raise ApiError(400, f"this endpoint requires the anthropic-beta header {MANAGED_AGENTS_BETA}")
                response = await handler(request)
            except ApiError as error:
                response = error_response(error)
            response.headers.setdefault("request-id", f"req_local_{secrets.token_hex(8)}")
            return response

        return run

    return wrap
