"""Logging set-up: `event key=value` lines as text (default) or JSON, with secrets redacted.

Messages are written once, shaped `event key=value ...`; the JSON formatter turns that into
`{"event": ..., "key": value, ...}` so both renderings carry the same stable keys. One process-wide
redacting filter, on the root handler, removes secrets from every record at every level as the
last line of defence: the values registered with it (keys at start-up, each work item's secret
and sessions token while it is served) and anything shaped like a credential.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import TextIO

_PAIR = re.compile(r"^([a-z_][a-z0-9_]*)=(.*)$")
REDACTED = "[REDACTED]"
_MIN_SECRET_LENGTH = 6
# Credential shapes redacted even when nobody registered the value: Anthropic keys and tokens,
# base64 JSON (a work item's `secret`, JWTs), Bearer headers and passwords inside URLs.
_SHAPES = (
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]{6,}"), REDACTED),
    (re.compile(r"eyJ[A-Za-z0-9_\-+/=.]{16,}"), REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9_\-.~+/=]{6,}"), r"\1" + REDACTED),
    (re.compile(r"(?i)\b(x-api-key['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]{6,}"), r"\1" + REDACTED),
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+@"), r"\1" + REDACTED + "@"),
)
_NUMERIC_KEYS = re.compile(r"^(duration|.*_seconds)$")


class RedactingFilter(logging.Filter):
    """Replaces secret values in a record's message, exception and stack text (and drops its args)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._permanent: set[str] = set()
        self._scoped: Counter[str] = Counter()
        self._values: tuple[str, ...] = ()  # swapped whole, so readers on any thread never see it change

    def add(self, values: Iterable[str | None]) -> None:
        """Register values for the life of the process (the environment key, the API key, tokens)."""
        with self._lock:
            self._permanent.update(v for v in values if v and len(v) >= _MIN_SECRET_LENGTH)
            self._rebuild()

    @contextmanager
    def scoped(self, values: Iterable[str | None]) -> Iterator[None]:
        """Register values for the duration of the block (one work item's secret and token)."""
        kept = [v for v in values if v and len(v) >= _MIN_SECRET_LENGTH]
        with self._lock:
            self._scoped.update(kept)
            self._rebuild()
        try:
            yield
        finally:
            with self._lock:
                self._scoped.subtract(kept)
                self._scoped = +self._scoped
                self._rebuild()

    def _rebuild(self) -> None:
        # Longest first, so a secret containing another is replaced whole.
        self._values = tuple(sorted(self._permanent | set(self._scoped), key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self._values:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, replacement in _SHAPES:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not raise out of a log call
            message = f"{record.msg} (log arguments did not match the format)"
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
            record.exc_info = None  # formatters would otherwise render the raw traceback again
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


_redactor = RedactingFilter()


def register_secret(*values: str | None) -> None:
    """Never log these values, for the rest of the process (None and short values are ignored)."""
    _redactor.add(values)


def redacting(*values: str | None) -> AbstractContextManager[None]:
    """Never log these values while the block runs: `with redacting(item.secret, token): ...`."""
    return _redactor.scoped(values)


_RESERVED = frozenset({"time", "level", "logger", "exception", "stack"})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event and the message's key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        # The message's fields never override the record's own (a value may carry untrusted text).
        out.update({k: v for k, v in parse_event(message).items() if k not in _RESERVED})
        if record.exc_text:
            out["exception"] = record.exc_text
        elif record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str)


def parse_event(message: str) -> dict[str, object]:
    """`event k=v k2='v 2'` -> {"event": "event", "k": "v", "k2": "v 2"}; other text -> message.

    `duration` and `*_seconds` values become numbers, so log pipelines can aggregate them.
    """
    try:
        tokens = shlex.split(message, posix=True)
    except ValueError:
        return {"event": "log", "message": message}
    if not tokens or "=" in tokens[0] or not re.fullmatch(r"[a-z][a-z0-9_]*", tokens[0]):
        return {"event": "log", "message": message}
    fields: dict[str, object] = {"event": tokens[0]}
    rest: list[str] = []
    for token in tokens[1:]:
        match = _PAIR.match(token)
        if match and match.group(1) != "event":
            fields[match.group(1)] = _value(match.group(1), match.group(2))
        else:
            rest.append(token)
    if rest:
        fields["message"] = " ".join(rest)
    return fields


def _value(key: str, raw: str) -> object:
    if _NUMERIC_KEYS.match(key):
        try:
            return float(raw.removesuffix("s"))
        except ValueError:
            return raw
    return raw


def configure(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> RedactingFilter:
    """Install the root handler (on stderr by default); returns the process-wide redaction filter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_redactor)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The HTTP stacks log every request URL at INFO (presigned download URLs included): only when debugging.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
    return _redactor


class LogBudget:
    """Lines a source may put in the daemon's log: the first `burst`, then one every `interval_seconds`
    carrying the count of those left out. A sandbox that makes refusals by the thousand cannot drown
    the daemon's log (or journald's rate limit) and its neighbours' lines; the metrics count them all.
    """

    def __init__(self, burst: int = 5, interval_seconds: float = 30.0) -> None:
        self._burst = burst
        self._interval = interval_seconds
        self._logged = 0
        self._next = 0.0
        self._skipped = 0

    def take(self) -> int | None:
        """None: leave this line out; else log it, noting the returned number of lines left out before it."""
        now = time.monotonic()
        if self._logged < self._burst or now >= self._next:
            self._logged += 1
            self._next = now + self._interval
            skipped, self._skipped = self._skipped, 0
            return skipped
        self._skipped += 1
        return None


def printable(text: str, limit: int = 2000) -> str:
    """Untrusted text (a sandbox's output) as one shell-quoted token: control characters escaped,
    cut at `limit`, so it can neither fake other log fields nor move the terminal."""
    cleaned = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:limit])
    return shlex.quote(cleaned + ("…" if len(text) > limit else ""))


# The budget of the sandbox whose connection is being served (set by its listener; tasks inherit it).
sandbox_log_budget: ContextVar[LogBudget | None] = ContextVar("sandbox_log_budget", default=None)


def log_within_budget(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """Log a line caused by a sandbox's request, within that sandbox's budget (all of it outside one)."""
    budget = sandbox_log_budget.get()
    skipped = budget.take() if budget is not None else 0
    if skipped is None or not logger.isEnabledFor(level):
        return
    logger.log(level, msg + (" (and %d more lines of this sandbox not logged)" if skipped else ""),
               *args, *((skipped,) if skipped else ()))
