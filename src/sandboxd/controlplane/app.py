"""The Starlette application of the local control plane.

Owns assembling the `/v1` API routes and the `/_cp` admin routes over one
`ControlPlaneState`, and answering unknown paths and methods with the
Anthropic JSON error body instead of Starlette's plain text.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from . import admin, api
from .errors import ApiError
from .state import ControlPlaneState
from .web import error_response


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return error_response(ApiError(status, f"{request.method} {request.url.path}: {exc}"))


def build_app(state: ControlPlaneState) -> Starlette:
    """The ASGI app serving `state`."""
    return Starlette(
        routes=[*api.routes(state), *admin.routes(state)],
        exception_handlers={HTTPException: _http_error},
    )
