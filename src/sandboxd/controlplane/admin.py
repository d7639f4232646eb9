"""The `/_cp` admin routes of the local control plane (no auth; test and demo use only).

GET  /_cp/state                         the state snapshot (see `ControlPlaneState.snapshot`)
POST /_cp/sessions                      body: one scripted session → {"session_id", "work_id"}
POST /_cp/healthcheck                   → {"work_id"} of a new healthcheck work item
POST /_cp/outage                        body {"mode": "hang"|"error"|"off"} → {"mode"}
POST /_cp/lease_ttl                     body {"seconds": n} → {"lease_ttl_seconds"}
POST /_cp/work/{work_id}/request_stop   a held item becomes `stopping` → the work JSON
POST /_cp/work/{work_id}/revoke_lease   a held item goes back to the queue (holder's next heartbeat: 412) → work JSON
POST /_cp/sessions/{session_id}/terminate       the session ends now, tool calls pending or not → its snapshot
POST /_cp/sessions/{session_id}/drop_streams    end its open event streams mid-session → {"dropped": n}
GET  /_cp/faults                        → {"plan": FaultPlan, "injected": {name: count}}
POST /_cp/faults                        body: a FaultPlan ({"seed", "rules": [...]}; {} turns faults off) → same
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError
from .scenario import FaultPlan, ScriptedSession
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
            return error_response(ApiError(400, f"invalid body: {problems}"))
        except ApiError as error:
            return error_response(error)

    return run


class _Admin:
    """One method per `/_cp` route, all over the same state."""

    def __init__(self, state: ControlPlaneState) -> None:
        self.state = state

    async def snapshot(self, request: Request) -> Response:
        return JSONResponse(self.state.snapshot())

    async def add_session(self, request: Request) -> Response:
        spec = ScriptedSession.model_validate(await json_body(request))
        session_id, work_id = self.state.add_session(spec)
        return JSONResponse({"session_id": session_id, "work_id": work_id}, status_code=201)

    async def add_healthcheck(self, request: Request) -> Response:
        return JSONResponse({"work_id": self.state.add_healthcheck()}, status_code=201)

    async def outage(self, request: Request) -> Response:
        mode = (await json_body(request)).get("mode")
        if mode == "off":
            self.state.set_outage("off")
        elif mode == "hang":
            self.state.set_outage("hang")
        elif mode == "error":
            self.state.set_outage("error")
        else:
            raise ApiError(400, f"mode must be one of {', '.join(OUTAGE_MODES)}")
        return JSONResponse({"mode": mode})

    async def lease_ttl(self, request: Request) -> Response:
        seconds = (await json_body(request)).get("seconds")
        if seconds is not None:
            if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 1:
                raise ApiError(400, "seconds must be a positive integer")
            self.state.set_lease_ttl(seconds)
        return JSONResponse({"lease_ttl_seconds": self.state.snapshot()["lease_ttl_seconds"]})

    async def request_stop(self, request: Request) -> Response:
        return JSONResponse(self.state.request_stop(request.path_params["work_id"]))

    async def revoke_lease(self, request: Request) -> Response:
        return JSONResponse(self.state.revoke_lease(request.path_params["work_id"]))

    async def terminate(self, request: Request) -> Response:
        return JSONResponse(self.state.terminate_session(request.path_params["session_id"]))

    async def drop_streams(self, request: Request) -> Response:
        return JSONResponse({"dropped": self.state.drop_streams(request.path_params["session_id"])})

    async def faults(self, request: Request) -> Response:
        if request.method == "POST":
            return JSONResponse(self.state.set_faults(FaultPlan.model_validate(await json_body(request))))
        return JSONResponse(self.state.faults.snapshot())


def routes(state: ControlPlaneState) -> list[Route]:
    """The `/_cp` routes bound to `state`."""
    a = _Admin(state)
    table: list[tuple[str, AdminHandler, list[str]]] = [
        ("/_cp/state", a.snapshot, ["GET"]),
        ("/_cp/sessions", a.add_session, ["POST"]),
        ("/_cp/healthcheck", a.add_healthcheck, ["POST"]),
        ("/_cp/outage", a.outage, ["POST"]),
        ("/_cp/lease_ttl", a.lease_ttl, ["POST"]),
        ("/_cp/faults", a.faults, ["GET", "POST"]),
        ("/_cp/work/{work_id}/request_stop", a.request_stop, ["POST"]),
        ("/_cp/work/{work_id}/revoke_lease", a.revoke_lease, ["POST"]),
        ("/_cp/sessions/{session_id}/terminate", a.terminate, ["POST"]),
        ("/_cp/sessions/{session_id}/drop_streams", a.drop_streams, ["POST"]),
    ]
    return [Route(path, _admin(handler), methods=methods) for path, handler, methods in table]
