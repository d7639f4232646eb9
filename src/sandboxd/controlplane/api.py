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
from .web import credential, endpoint, int_param, json_body, sse_frame

PING_SECONDS = 5.0
POLL_SLICE_SECONDS = 0.1
STREAM_SLICE_SECONDS = 0.5
TERMINAL_EVENTS = ("session.status_terminated", "session.deleted")
ENV = "/v1/environments/{environment_id}/work"


async def _sse(state: ControlPlaneState, session_id: str, index: int) -> AsyncIterator[bytes]:
    """Live events from `index` on, with ping keep-alives; ends after a terminal event."""
    last_ping = monotonic()
    while not state.closing:
        generation = state.signal.generation
        for event in state.events_since(session_id, index):
            index += 1
            yield sse_frame(event["type"], event)
            if event["type"] in TERMINAL_EVENTS:
                return
        if monotonic() - last_ping >= PING_SECONDS:
            last_ping = monotonic()
            yield sse_frame("ping", {"type": "ping"})
        await state.signal.wait(generation, STREAM_SLICE_SECONDS)


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


def routes(state: ControlPlaneState) -> list[Route]:  # noqa: C901 - one small closure per route
    """The `/v1` routes bound to `state`."""

    @endpoint(state, "poll")
    async def poll(request: Request) -> Response:
        token, environment_id = credential(request), request.path_params["environment_id"]
        block_ms = int_param(request, "block_ms", 1, 999)
        reclaim_ms = int_param(request, "reclaim_older_than_ms", 1)
        worker_id = request.headers.get("anthropic-worker-id")
        deadline = monotonic() + (block_ms or 0) / 1000
        while True:
            generation = state.signal.generation
            work = state.poll(token, environment_id, worker_id, reclaim_ms)
            remaining = deadline - monotonic()
            if work is not None or remaining <= 0 or state.closing:
                return JSONResponse(work)
            await state.signal.wait(generation, min(remaining, POLL_SLICE_SECONDS))

    @endpoint(state, "ack")
    async def ack(request: Request) -> Response:
        params = request.path_params
        return JSONResponse(state.ack(credential(request), params["environment_id"], params["work_id"]))

    @endpoint(state, "heartbeat")
    async def heartbeat(request: Request) -> Response:
        params, expected = request.path_params, request.query_params.get("expected_last_heartbeat")
        body = state.heartbeat(credential(request), params["environment_id"], params["work_id"], expected)
        return JSONResponse(body)

    @endpoint(state, "stop")
    async def stop(request: Request) -> Response:
        params, force = request.path_params, (await json_body(request)).get("force") is True
        return JSONResponse(state.stop(credential(request), params["environment_id"], params["work_id"], force))

    @endpoint(state, "stats")
    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats(credential(request), request.path_params["environment_id"]))

    @endpoint(state, "session")
    async def session(request: Request) -> Response:
        return JSONResponse(state.get_session(credential(request), request.path_params["session_id"]))

    @endpoint(state, "stream")
    async def stream(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        start = state.open_stream(credential(request), session_id)
        return StreamingResponse(
            _sse(state, session_id, start),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    @endpoint(state, "events_list")
    async def list_events(request: Request) -> Response:
        events = state.list_events(credential(request), request.path_params["session_id"])
        return JSONResponse(_page(request, events))

    @endpoint(state, "events_send")
    async def send_events(request: Request) -> Response:
        body = await json_body(request)
        stored = state.post_events(credential(request), request.path_params["session_id"], body.get("events"))
        return JSONResponse({"data": stored})

    @endpoint(state, "skill_version", beta=False)
    async def skill_version(request: Request) -> Response:
        params = request.path_params
        return JSONResponse(state.skill_version(credential(request), params["skill_id"], params["version"]))

    @endpoint(state, "skill_content", beta=False)
    async def skill_content(request: Request) -> Response:
        params = request.path_params
        content = state.skill_content(credential(request), params["skill_id"], params["version"])
        return Response(content, media_type="application/octet-stream")

    return [
        Route(f"{ENV}/poll", poll, methods=["GET"]),
        Route(f"{ENV}/stats", stats, methods=["GET"]),
        Route(f"{ENV}/{{work_id}}/ack", ack, methods=["POST"]),
        Route(f"{ENV}/{{work_id}}/heartbeat", heartbeat, methods=["POST"]),
        Route(f"{ENV}/{{work_id}}/stop", stop, methods=["POST"]),
        Route("/v1/sessions/{session_id}", session, methods=["GET"]),
        Route("/v1/sessions/{session_id}/events/stream", stream, methods=["GET"]),
        Route("/v1/sessions/{session_id}/events", list_events, methods=["GET"]),
        Route("/v1/sessions/{session_id}/events", send_events, methods=["POST"]),
        Route("/v1/skills/{skill_id}/versions/{version}", skill_version, methods=["GET"]),
        Route("/v1/skills/{skill_id}/versions/{version}/content", skill_content, methods=["GET"]),
    ]
