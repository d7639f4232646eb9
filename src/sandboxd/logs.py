"""Logging set-up: `event key=value` lines as text (default) or JSON, with secrets redacted.

Messages are written once, shaped `event key=value ...`; the JSON formatter turns that into
`{"event": ..., "key": value, ...}` so both renderings carry the same stable keys. A redacting
filter replaces every registered secret value with `[REDACTED]` in every record, at every level,
as a last line of defence.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from collections.abc import Iterable

_PAIR = re.compile(r"^([a-z_][a-z0-9_]*)=(.*)$")
REDACTED = "[REDACTED]"


class RedactingFilter(logging.Filter):
    """Replaces known secret values in a record's rendered message (and drops its args)."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()

    def add(self, values: Iterable[str | None]) -> None:
        self._secrets.update(v for v in values if v and len(v) >= 6)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = self.redact(record.getMessage())
            record.msg, record.args = message, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event and the message's key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        out.update(parse_event(message))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


def parse_event(message: str) -> dict[str, object]:
    """`event k=v k2='v 2'` -> {"event": "event", "k": "v", "k2": "v 2"}; other text -> message."""
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
        if match:
            fields[match.group(1)] = match.group(2)
        else:
            rest.append(token)
    if rest:
        fields["message"] = " ".join(rest)
    return fields


def configure(fmt: str = "text", level: str = "INFO") -> RedactingFilter:
    """Install the root handler on stderr; returns the redaction filter to register secrets with."""
    handler = logging.StreamHandler(sys.stderr)
    redactor = RedactingFilter()
    handler.addFilter(redactor)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The HTTP stacks log every request at INFO; show them only when debugging.
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
    return redactor
