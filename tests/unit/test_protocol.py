"""The daemon <-> sandbox contract: stdin messages, secret decoding, exit statuses."""

from __future__ import annotations

import pytest

from sandboxd.outcome import Outcome, outcome_for_exit
from sandboxd.protocol import ABORT, Assignment, ExitCode, abort_line, parse_line, sessions_token_from_secret
from tests.unit.fakes import secret_for


def test_assignment_round_trip_and_secret_stays_out_of_repr() -> None:
    a = Assignment("work_1", "env_1", "sesn_1", secret_for("tok-123456"))
    message = parse_line(a.to_line())
    assert Assignment.from_message(message) == a
    assert a.secret is not None and "tok" not in repr(a) and a.secret not in repr(a)
    assert "environment_key" not in message
    assert parse_line(a.to_line("sk-env"))["environment_key"] == "sk-env"


@pytest.mark.parametrize("bad", [b"[]", b'{"no": "type"}', b"not json"])
def test_malformed_control_lines_are_rejected(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_line(bad)


def test_assignment_requires_ids() -> None:
    with pytest.raises(ValueError, match="session_id"):
        Assignment.from_message({"type": "assignment", "work_id": "w", "environment_id": "e"})


def test_abort_line_carries_reason() -> None:
    assert parse_line(abort_line("ref not found")) == {"type": ABORT, "reason": "ref not found"}


@pytest.mark.parametrize(
    ("secret", "token"),
    [(secret_for("tok-1"), "tok-1"), (secret_for("tok-1") + "==", "tok-1"), (None, None), ("%%%", None),
     ("W10", None)],  # "[]" in base64: valid JSON, not an object
)
def test_sessions_token_from_secret(secret: str | None, token: str | None) -> None:
    assert sessions_token_from_secret(secret) == token


def test_exit_status_to_outcome() -> None:
    assert outcome_for_exit(ExitCode.SERVED) is Outcome.SUCCEEDED
    assert outcome_for_exit(ExitCode.ABORTED) is Outcome.WORKSPACE_FAILED
    assert outcome_for_exit(ExitCode.LEASE_LOST) is Outcome.LEASE_LOST
    assert outcome_for_exit(ExitCode.CANCELLED) is Outcome.CANCELLED
    assert outcome_for_exit(137) is Outcome.FAILED
