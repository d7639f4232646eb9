"""Credentials of the local control plane.

Owns the key ring (environment key, API key, one sessions token per work item)
and the per-route rules: which Bearer credential a route accepts, and whether
a refusal is 401 (unknown or expired credential) or 403 (known, but not for
this). The API key (the application's credential) may list and send a session's
events, but not retrieve or stream it. A sessions token is scoped to its work item (the SDK: "a short-lived
payload scoped to this work item"): it authorizes that item's heartbeat and
stop, and the session's routes only while that item is the session's current one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal

from .errors import ApiError

CredentialKind = Literal["environment_key", "api_key", "sessions_token"]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the kind of credential, and for a sessions token its session and item."""

    kind: CredentialKind
    session_id: str | None = None
    work_id: str | None = None


def bearer_token(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The credential from `Authorization: Bearer ...` (or, failing that, `X-Api-Key`)."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return x_api_key or None


class KeyRing:
    """The credentials this control plane knows, looked up by value."""

    def __init__(self, environment_key: str, api_key: str) -> None:
        self._environment_key = environment_key
        self._api_key = api_key
        self._tokens: dict[str, tuple[str, str]] = {}

    def new_sessions_token(self, session_id: str, work_id: str) -> str:
        """Mint and register the sessions token of work item `work_id` of `session_id`."""
        token = f"sk-ant-sess-local-{secrets.token_hex(16)}"
        self._tokens[token] = (session_id, work_id)
        return token

    def identify(self, token: str | None) -> Caller:
        """The caller behind `token`, or 401."""
        if token is None:
            raise ApiError(401, "missing credential: send Authorization: Bearer <token>")
        if secrets.compare_digest(token, self._environment_key):
            return Caller("environment_key")
        if secrets.compare_digest(token, self._api_key):
            return Caller("api_key")
        grant = self._tokens.get(token)
        if grant is not None:
            return Caller("sessions_token", *grant)
        raise ApiError(401, "invalid credential")

    def require_environment_key(self, token: str | None) -> Caller:
        """Poll and ack: the environment key only; anything else is 401."""
        if token is None or not secrets.compare_digest(token, self._environment_key):
            raise ApiError(401, "this endpoint requires the environment key")
        return Caller("environment_key")

    def require_api_key(self, token: str | None) -> Caller:
        """Stats: the API key only; another known credential is 403."""
        caller = self.identify(token)
        if caller.kind != "api_key":
            raise ApiError(403, f"this endpoint requires an API key, not the {caller.kind.replace('_', ' ')}")
        return caller

    def require_session(
        self, token: str | None, session_id: str | None, current_work_id: str | None, *, application: bool = False
    ) -> Caller:
        """Session routes: the environment key, or the sessions token of the session's current item;
        with `application` (listing and sending events: how the application confirms tool calls and
        answers custom tools) the API key too.

        A token of an earlier item of the same session has expired (401); any other is 403."""
        caller = self.identify(token)
        if caller.kind == "environment_key" or (application and caller.kind == "api_key"):
            return caller
        if caller.kind == "sessions_token" and session_id is not None and caller.session_id == session_id:
            if caller.work_id == current_work_id:
                return caller
            raise ApiError(401, f"the sessions token has expired: its work item is not {session_id}'s current one")
        raise ApiError(403, f"the {caller.kind.replace('_', ' ')} does not grant access to this resource")

    def require_item(self, token: str | None, work_id: str) -> Caller:
        """Per-item routes (heartbeat, stop): the environment key or this item's own sessions token."""
        caller = self.identify(token)
        if caller.kind == "environment_key" or (caller.kind == "sessions_token" and caller.work_id == work_id):
            return caller
        raise ApiError(403, f"the {caller.kind.replace('_', ' ')} does not grant access to this resource")
