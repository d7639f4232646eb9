"""The `/v1` routes of the local control plane, as the anthropic SDK calls them.

Owns the request/response mapping of the work queue (poll with long-poll,
ack, heartbeat, stop, stats), sessions (retrieve, SSE event stream, event
list with cursor pages, event send) and skills (version, zip content). The
rules themselves live in `state`; wire details are in the wire reference.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .clock import monotonic
from .errors import ApiError
from .state import ControlPlaneState
from .web import Handler, credential, endpoint, int_param, json_body, sse_frame

PING_SECONDS = 5.0
POLL_SLICE_SECONDS = 0.1
STREAM_SLICE_SECONDS = 0.5
TERMINAL_EVENTS = ("session.status_terminated", "session.deleted")
ENV = "/v1/environments/{environment_id}/work"


async def _sse(
    state: ControlPlaneState, session_id: str, token: str | None, stream: tuple[int, int], drop_after: int | None
) -> AsyncIterator[bytes]:
    """Live events from the stream's start index, with ping keep-alives; ends after a terminal event.

    Also ends (without a terminal event, so the runner reconnects) when the session's streams are
    dropped, after `drop_after` events (an injected fault), or once the caller's sessions token
    no longer authorizes the session (its item is no longer the current one)."""
    (index, epoch), sent, dropped = stream, 0, False
    last_ping = monotonic()
    try:
        while not state.closing:
            generation = state.signal.generation
            batch, dropped = state.stream_batch(token, session_id, epoch, index)
            if batch is None:
                return
            for event in batch:
                if drop_after is not None and sent >= drop_after:
                    dropped = True
                    return
                index, sent = index + 1, sent + 1
                yield sse_frame(event["type"], event)
                if event["type"] in TERMINAL_EVENTS:
                    return
            if monotonic() - last_ping >= PING_SECONDS:
                last_ping = monotonic()
                yield sse_frame("ping", {"type": "ping"})
            await state.signal.wait(generation, STREAM_SLICE_SECONDS)
    finally:
        state.stream_closed(session_id, dropped)


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"evcursor:{offset}".encode()).decode()


def _decode_cursor(page: str | None) -> int:
    if not page:
        return 0
    try:
        prefix, _, offset = base64.urlsafe_b64decode(page.encode()).decode().partition(":")
        if prefix == "evcursor" and int(offset) >= 0:
            return int(offset)
    except ValueError:
        pass
    raise ApiError(400, "page: invalid cursor")


def _page(request: Request, events: list[dict[str, Any]]) -> dict[str, Any]:
    """One page of events, ascending unless `order=desc`."""
    if request.query_params.get("order", "asc") == "desc":
        events = events[::-1]
    limit = int_param(request, "limit", 1, 1000)
    start = _decode_cursor(request.query_params.get("page"))
    end = len(events) if limit is None else start + limit
    next_page = _encode_cursor(end) if end < len(events) else None
    return {"data": events[start:end], "next_page": next_page}


class _Handlers:
    """One method per `/v1` route, all over the same state."""

    def __init__(self, state: ControlPlaneState) -> None:
        self.state = state

    async def poll(self, request: Request) -> Response:
        token, environment_id = credential(request), request.path_params["environment_id"]
        block_ms = int_param(request, "block_ms", 1, 999)
        reclaim_ms = int_param(request, "reclaim_older_than_ms", 1)
        worker_id = request.headers.get("anthropic-worker-id")
        deadline = monotonic() + (block_ms or 0) / 1000
        while True:
            generation = self.state.signal.generation
            work = self.state.poll(token, environment_id, worker_id, reclaim_ms)
            remaining = deadline - monotonic()
            if work is not None or remaining <= 0 or self.state.closing:
                return JSONResponse(work)
            await self.state.signal.wait(generation, min(remaining, POLL_SLICE_SECONDS))

    async def ack(self, request: Request) -> Response:
        params = request.path_params
        return JSONResponse(self.state.ack(credential(request), params["environment_id"], params["work_id"]))

    async def heartbeat(self, request: Request) -> Response:
        params, expected = request.path_params, request.query_params.get("expected_last_heartbeat")
        body = self.state.heartbeat(credential(request), params["environment_id"], params["work_id"], expected)
        return JSONResponse(body)

    async def stop(self, request: Request) -> Response:
        params, force = request.path_params, (await json_body(request)).get("force") is True
        helper = request.headers.get("x-stainless-helper")
        body = self.state.stop(credential(request), params["environment_id"], params["work_id"], force, helper)
        return JSONResponse(body)

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self.state.stats(credential(request), request.path_params["environment_id"]))

    async def session(self, request: Request) -> Response:
        return JSONResponse(self.state.get_session(credential(request), request.path_params["session_id"]))

    async def stream(self, request: Request) -> Response:
        session_id, token = request.path_params["session_id"], credential(request)
        stream = self.state.open_stream(token, session_id)
        rule = self.state.faults.pick("stream", ("drop",))
        drop_after = rule.after_events if rule is not None and rule.kind == "drop" else None
        return StreamingResponse(
            _sse(self.state, session_id, token, stream, drop_after),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    async def list_events(self, request: Request) -> Response:
        events = self.state.list_events(credential(request), request.path_params["session_id"])
        return JSONResponse(_page(request, events))

    async def send_events(self, request: Request) -> Response:
        body = await json_body(request)
        stored = self.state.post_events(credential(request), request.path_params["session_id"], body.get("events"))
        return JSONResponse({"data": stored})

    async def skill_version(self, request: Request) -> Response:
        params = request.path_params
        return JSONResponse(self.state.skill_version(credential(request), params["skill_id"], params["version"]))

    async def skill_content(self, request: Request) -> Response:
        params = request.path_params
        content = self.state.skill_content(credential(request), params["skill_id"], params["version"])
        return Response(content, media_type="application/octet-stream")


def routes(state: ControlPlaneState) -> list[Route]:
    """The `/v1` routes bound to `state`."""
    h = _Handlers(state)

    def route(path: str, name: str, handler: Handler, method: str = "GET", beta: bool = True) -> Route:
        return Route(path, endpoint(state, name, beta=beta)(handler), methods=[method])

    return [
        route(f"{ENV}/poll", "poll", h.poll),
        route(f"{ENV}/stats", "stats", h.stats),
        route(f"{ENV}/{{work_id}}/ack", "ack", h.ack, "POST"),
        route(f"{ENV}/{{work_id}}/heartbeat", "heartbeat", h.heartbeat, "POST"),
        route(f"{ENV}/{{work_id}}/stop", "stop", h.stop, "POST"),
        route("/v1/sessions/{session_id}", "session", h.session),
        route("/v1/sessions/{session_id}/events/stream", "stream", h.stream),
        route("/v1/sessions/{session_id}/events", "events_list", h.list_events),
        route("/v1/sessions/{session_id}/events", "events_send", h.send_events, "POST"),
        route("/v1/skills/{skill_id}/versions/{version}", "skill_version", h.skill_version, beta=False),
        route("/v1/skills/{skill_id}/versions/{version}/content", "skill_content", h.skill_content, beta=False),
    ]
