"""Log lines: stable keys in text and JSON, and no secret value in any line at any level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest

from sandboxd import logs

ENV_KEY = "sk-ant-oat01-unit-0123456789abcdef"
OPAQUE = "opaque-token-7f3a9c1e5b"  # no recognisable shape: only registration catches it
Install = Callable[..., io.StringIO]


@pytest.fixture
def output() -> Iterator[Install]:
    """Yields a factory: configure(fmt) -> the stream the root handler writes to. Restores logging after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    noisy = ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "docker")
    levels = {name: logging.getLogger(name).level for name in noisy}

    def install(fmt: str = "text", level: str = "DEBUG") -> io.StringIO:
        stream = io.StringIO()
        logs.configure(fmt, level, stream=stream)
        return stream

    yield install
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_registered_values_are_redacted_in_messages_args_and_tracebacks(output: Install) -> None:
    stream = output("text")
    logs.register_secret(OPAQUE, None, "short")
    log = logging.getLogger("sandboxd.test")
    log.debug("config_loaded key=%s", OPAQUE)
    try:
        raise RuntimeError(f"request failed with {OPAQUE}")
    except RuntimeError:
        log.exception("call_failed")
    log.info("stack_dump", stack_info=True, extra={"x": OPAQUE})
    text = stream.getvalue()
    assert OPAQUE not in text
    assert text.count(logs.REDACTED) >= 2
    assert "call_failed" in text and "RuntimeError" in text


def test_json_output_redacts_the_exception_too(output: Install) -> None:
    stream = output("json")
    logs.register_secret(OPAQUE)
    try:
        raise ValueError(OPAQUE)
    except ValueError:
        logging.getLogger("sandboxd.test").exception("session_crashed work_id=%s", "work_1")
    record = json.loads(stream.getvalue())
    assert record["event"] == "session_crashed" and record["work_id"] == "work_1"
    assert OPAQUE not in stream.getvalue() and "ValueError" in record["exception"]


def test_scoped_secrets_are_redacted_only_while_registered(output: Install) -> None:
    stream = output("text")
    scoped = "item-scoped-secret-42x"
    log = logging.getLogger("sandboxd.test")
    with logs.redacting(scoped, None), logs.redacting(scoped):
        log.info("a value=%s", scoped)
    with logs.redacting(scoped):
        pass
    log.info("b value=%s", scoped)  # no longer a secret: the filter does not grow with every item
    lines = stream.getvalue().splitlines()
    assert scoped not in lines[0] and scoped in lines[1]


@pytest.mark.parametrize(
    "line",
    [
        f"environment_key={ENV_KEY}",
        "headers={'Authorization': 'Bearer abcdef0123456789'}",
        "secret=eyJzZXNzaW9uc190b2tlbiI6ICJzay1hbnQtc2VzcyJ9",
        "remote=https://x-access-token:ghp_abcdef012345@github.com/o/r.git",
        "X-Api-Key: abcdef0123456789",
    ],
)
def test_credential_shapes_are_redacted_without_registration(output: Install, line: str) -> None:
    stream = output("text")
    logging.getLogger("sandboxd.test").warning("event %s", line)
    text = stream.getvalue()
    assert logs.REDACTED in text
    for fragment in ("0123456789abcdef", "abcdef0123456789", "eyJzZXNzaW9u", "ghp_abcdef012345"):
        assert fragment not in text


def test_json_lines_carry_stable_keys_and_numeric_durations(output: Install) -> None:
    stream = output("json")
    logging.getLogger("sandboxd.session").info(
        "session_finished work_id=%s session_id=%s outcome=%s duration=%.2f reason=%r",
        "work_1", "sesn_1", "failed", 1.5, "sandbox exit 1 (error)",
    )
    record = json.loads(stream.getvalue())
    assert record["event"] == "session_finished"
    assert (record["work_id"], record["session_id"], record["outcome"]) == ("work_1", "sesn_1", "failed")
    assert record["duration"] == 1.5
    assert record["reason"] == "sandbox exit 1 (error)"
    assert {"time", "level", "logger"} <= set(record)


def test_text_lines_keep_the_event_first(output: Install) -> None:
    stream = output("text", "INFO")
    logging.getLogger("sandboxd.daemon").info("daemon_ready environment_id=%s capacity=%d", "env_1", 2)
    logging.getLogger("sandboxd.daemon").debug("hidden at INFO")
    (line,) = stream.getvalue().splitlines()
    assert line.split()[3:] == ["sandboxd.daemon", "daemon_ready", "environment_id=env_1", "capacity=2"]


def test_a_bad_format_string_never_raises_out_of_a_log_call(output: Install) -> None:
    stream = output("text")
    logging.getLogger("sandboxd.test").info("broken %s %s", OPAQUE)
    assert "broken" in stream.getvalue()


def test_prose_messages_become_a_log_event() -> None:
    assert logs.parse_event("Poller starting now") == {"event": "log", "message": "Poller starting now"}
    assert logs.parse_event("x a=1 b='c d' loose") == {"event": "x", "a": "1", "b": "c d", "message": "loose"}


def test_a_log_budget_lets_a_burst_through_then_one_line_per_interval_with_the_count_left_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("sandboxd.logs.time.monotonic", lambda: now[0])
    budget = logs.LogBudget(burst=2, interval_seconds=30)
    assert [budget.take() for _ in range(5)] == [0, 0, None, None, None]
    now[0] += 31
    assert budget.take() == 3, "the next line says how many were left out"
    assert budget.take() is None


def test_a_sandboxs_text_is_one_field_that_cannot_fake_a_record() -> None:
    forged = "event=session_finished work_id=w_other outcome=failed level=error logger=x time=2020 \x1b[2J"
    record = logging.LogRecord("sandboxd.lifecycle", logging.INFO, __file__, 1, "sandbox_log work_id=%s line=%s",
                               ("w_1", logs.printable(forged)), None)
    out = json.loads(logs.JsonFormatter().format(record))
    assert out["event"] == "sandbox_log" and out["work_id"] == "w_1" and out["level"] == "info"
    assert out["logger"] == "sandboxd.lifecycle" and out["time"].startswith("20") and out["time"] != "2020"
    assert out["line"].startswith("event=session_finished") and "\\x1b" in out["line"]
    assert "\x1b" not in logs.printable(forged) and len(logs.printable("x" * 5000)) < 2100


def test_message_fields_never_override_the_records_own() -> None:
    record = logging.LogRecord("sandboxd.session", logging.WARNING, __file__, 1,
                               "session_finished work_id=%s%s", ("w_1", " level=debug logger=evil event=other"), None)
    out = json.loads(logs.JsonFormatter().format(record))
    assert (out["level"], out["logger"], out["event"]) == ("warning", "sandboxd.session", "session_finished")
