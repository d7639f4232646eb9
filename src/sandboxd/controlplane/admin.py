"""The `/_cp` admin routes of the local control plane (no auth; test and demo use only).

GET  /_cp/state                         the state snapshot (see `ControlPlaneState.snapshot`)
POST /_cp/sessions                      body: one scripted session → {"session_id", "work_id"}
POST /_cp/healthcheck                   → {"work_id"} of a new healthcheck work item
POST /_cp/outage                        body {"mode": "hang"|"error"|"off"} → {"mode"}
POST /_cp/lease_ttl                     body {"seconds": n} → {"lease_ttl_seconds"}
POST /_cp/work/{work_id}/request_stop   a held item becomes `stopping` → the work JSON
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError
from .scenario import ScriptedSession
from .state import ControlPlaneState
from .web import error_response, json_body

AdminHandler = Callable[[Request], Awaitable[Response]]
OUTAGE_MODES = ("off", "hang", "error")


def _admin(handler: AdminHandler) -> AdminHandler:
    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:3])
            return error_response(ApiError(400, f"invalid session: {problems}"))
        except ApiError as error:
            return error_response(error)

    return run


def routes(state: ControlPlaneState) -> list[Route]:
    """The `/_cp` routes bound to `state`."""

    @_admin
    async def snapshot(request: Request) -> Response:
        return JSONResponse(state.snapshot())

    @_admin
    async def add_session(request: Request) -> Response:
        spec = ScriptedSession.model_validate(await json_body(request))
        session_id, work_id = state.add_session(spec)
        return JSONResponse({"session_id": session_id, "work_id": work_id}, status_code=201)

    @_admin
    async def add_healthcheck(request: Request) -> Response:
        return JSONResponse({"work_id": state.add_healthcheck()}, status_code=201)

    @_admin
    async def outage(request: Request) -> Response:
        mode = (await json_body(request)).get("mode")
        if mode == "off":
            state.set_outage("off")
        elif mode == "hang":
            state.set_outage("hang")
        elif mode == "error":
            state.set_outage("error")
        else:
            raise ApiError(400, f"mode must be one of {', '.join(OUTAGE_MODES)}")
        return JSONResponse({"mode": mode})

    @_admin
    async def lease_ttl(request: Request) -> Response:
        seconds = (await json_body(request)).get("seconds")
        if seconds is not None:
            if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 1:
                raise ApiError(400, "seconds must be a positive integer")
            state.set_lease_ttl(seconds)
        return JSONResponse({"lease_ttl_seconds": state.snapshot()["lease_ttl_seconds"]})

    @_admin
    async def request_stop(request: Request) -> Response:
        return JSONResponse(state.request_stop(request.path_params["work_id"]))

    return [
        Route("/_cp/state", snapshot, methods=["GET"]),
        Route("/_cp/sessions", add_session, methods=["POST"]),
        Route("/_cp/healthcheck", add_healthcheck, methods=["POST"]),
        Route("/_cp/outage", outage, methods=["POST"]),
        Route("/_cp/lease_ttl", lease_ttl, methods=["POST"]),
        Route("/_cp/work/{work_id}/request_stop", request_stop, methods=["POST"]),
    ]
