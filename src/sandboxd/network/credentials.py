"""Credentials that never enter a sandbox: rules, placeholders and the header rewrite at the egress proxy.

The operator names, per rule, a host (`name` or `*.suffix`) and port, a header and how its value is
shaped (`bearer`: `Bearer <token>`; `basic`: `Basic base64(user:password)` with the placeholder as
the password, what git and pip send; `replace`: the placeholder anywhere in the value), a secret
file (read at each use, so a rotated file is picked up at once) and the environment variable a
sandbox sees. That variable holds a placeholder, `sandboxd-credential-<rule>-<hmac>`, derived per
sandbox from a key kept in `state_dir/egress/` (an adopting daemon derives the same one).

The proxy terminates TLS to a host with rules (`authority.py`) and calls `rewrite` on each request:
a rule's header carrying this sandbox's placeholder gets the real value; that header without it is
dropped; a placeholder anywhere else (another header, the target, another sandbox's) refuses the
request. Plain HTTP is never injected, and a request that visibly carries a placeholder is refused
(`carries_placeholder`). The real value is redacted from response headers (`Rewritten.redact`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .allowlist import is_ip_literal, normalise_host

PLACEHOLDER_PREFIX = "sandboxd-credential-"
OPT_IN_METADATA_KEY = "egress_credentials"  # a session's metadata: the opt-in rules it asks for, comma-separated
_MAX_OPT_IN = 32
MAX_SECRET_BYTES = 8192
RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_SECRET = re.compile(r"[\x21-\x7e]+")
_BEARER = re.compile(r"bearer +(\S+)", re.IGNORECASE)
_BASIC = re.compile(r"basic +([A-Za-z0-9+/]+={0,2})", re.IGNORECASE)
# Headers the proxy frames or reads itself: a rule may not set them.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                               "proxy-authorization", "proxy-connection", "te", "trailer", "upgrade"})
_RESERVED_ENV = re.compile(r"(SANDBOXD_.*|ANTHROPIC_.*|(HTTPS?|NO|ALL)_PROXY|(https?|no|all)_proxy|SSL_CERT_FILE|"
                           r"REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|NODE_EXTRA_CA_CERTS|GIT_SSL_CAINFO|PIP_CERT|PATH|HOME)")


class CredentialFormat(StrEnum):
    BEARER = "bearer"
    BASIC = "basic"
    REPLACE = "replace"


class CredentialUnavailable(Exception):
    """A rule's secret file is missing, unreadable, too large or not one line of visible ASCII."""


class PlaceholderMisuse(Exception):
    """A request carries a placeholder where it is not injected: refused."""


@dataclass(frozen=True)
class CredentialRule:
    """One rule, checked at start-up (`parse`): where its secret goes, and how."""

    name: str
    host: str  # canonical; for a wildcard, the suffix without `*.`
    wildcard: bool
    port: int
    header: str
    format: CredentialFormat
    secret_file: Path
    placeholder_env: str
    session_opt_in: bool = False  # applies only to sessions whose metadata names it (`opted_in`)

    @classmethod
    def parse(cls, *, name: str, host: str, port: int, header: str, format: str, secret_file: Path,
              placeholder_env: str, session_opt_in: bool = False) -> CredentialRule:
        """A rule from its settings; ValueError naming what is wrong."""
        if not RULE_NAME.fullmatch(name):
            raise ValueError(f"rule name {name!r}: 1-32 of a-z 0-9 _ - (it is a metric label)")
        wildcard = host.startswith("*.")
        canonical = normalise_host(host[2:] if wildcard else host)
        if canonical is None or is_ip_literal(canonical):
            raise ValueError(f"rule {name}: host {host!r} must be a host name or *.suffix (a TLS name, not an address)")
        if not 0 < port < 65536:
            raise ValueError(f"rule {name}: bad port {port}")
        if not _HEADER_NAME.fullmatch(header) or header.lower() in _RESERVED_HEADERS:
            raise ValueError(f"rule {name}: header {header!r} cannot carry a credential")
        if not ENV_NAME.fullmatch(placeholder_env) or _RESERVED_ENV.fullmatch(placeholder_env):
            raise ValueError(f"rule {name}: placeholder_env {placeholder_env!r} is not a free variable name")
        return cls(name, canonical, wildcard, port, header, CredentialFormat(format), secret_file, placeholder_env,
                   session_opt_in)

    def matches(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host

    def secret(self) -> str:
        """The real value, read now from its file (one line of visible ASCII, at most MAX_SECRET_BYTES)."""
        try:
            with open(self.secret_file, "rb") as file:
                raw = file.read(MAX_SECRET_BYTES + 2)
        except OSError as exc:
            raise CredentialUnavailable(f"rule {self.name}: {self.secret_file}: {exc.strerror or exc}") from None
        text = raw.decode("ascii", "replace").removesuffix("\n").removesuffix("\r")
        if len(text) > MAX_SECRET_BYTES or not _SECRET.fullmatch(text):
            raise CredentialUnavailable(f"rule {self.name}: {self.secret_file} is not one line of visible ASCII "
                                        f"of at most {MAX_SECRET_BYTES} bytes")
        return text

    def substitute(self, value: str, placeholder: str) -> tuple[str, str] | None:
        """(the header value with the real secret, the secret) when `value` carries `placeholder`, else None."""
        if self.format is CredentialFormat.BEARER:
            match = _BEARER.fullmatch(value)
            if match is None or not hmac.compare_digest(match[1], placeholder):
                return None
            secret = self.secret()
            return f"Bearer {secret}", secret
        if self.format is CredentialFormat.BASIC:
            user = _basic_user(value, placeholder)
            if user is None:
                return None
            secret = self.secret()
            return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode("ascii"), secret
        if placeholder not in value:
            return None
        secret = self.secret()
        return value.replace(placeholder, secret), secret


def _basic_decoded(value: str) -> str | None:
    match = _BASIC.fullmatch(value)
    if match is None:
        return None
    try:
        return base64.b64decode(match[1], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _basic_user(value: str, placeholder: str) -> str | None:
    """The user of a Basic value whose password is `placeholder`, else None."""
    decoded = _basic_decoded(value)
    if decoded is None:
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not hmac.compare_digest(password, placeholder) or not _SECRET.fullmatch(user or "x"):
        return None
    return user


def opted_in(metadata: Mapping[str, str]) -> frozenset[str]:
    """The rule names a session's metadata asks for (`egress_credentials = "github,index"`); bounded, never raises."""
    raw = metadata.get(OPT_IN_METADATA_KEY) or ""
    names = [name.strip() for name in raw[:1024].split(",")]
    return frozenset(name for name in names[:_MAX_OPT_IN] if RULE_NAME.fullmatch(name))


def carries_placeholder(text: str) -> bool:
    """Whether a header value or target shows a placeholder (plainly, or inside Basic credentials)."""
    if PLACEHOLDER_PREFIX in text.lower():
        return True
    decoded = _basic_decoded(text)
    return decoded is not None and PLACEHOLDER_PREFIX in decoded.lower()


@dataclass(frozen=True)
class Rewritten:
    """A request's header fields after the rewrite: what goes out, which rules injected, what to redact."""

    fields: tuple[tuple[str, str], ...]
    injected: tuple[str, ...]  # rule names
    stripped: int  # header fields of a rule that did not carry the placeholder, dropped
    redact: tuple[bytes, ...]  # the real values as sent: never passed back in a response header

    def __repr__(self) -> str:  # never the values
        return f"Rewritten(injected={self.injected}, stripped={self.stripped})"


class Credentials:
    """The rules, and the key that derives each sandbox's placeholders."""

    def __init__(self, rules: Sequence[CredentialRule], key: bytes) -> None:
        names = [rule.name for rule in rules]
        envs = [rule.placeholder_env for rule in rules]
        if len(set(names)) != len(names) or len(set(envs)) != len(envs):
            raise ValueError("rule names and placeholder_env names must be unique")
        self.rules = tuple(rules)
        self._key = key

    @staticmethod
    def load_key(directory: Path) -> bytes:
        """The placeholder key kept in `directory/placeholder.key` (0600), made first if missing."""
        path = directory / "placeholder.key"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) >= 32:
                return key
            raise ValueError(f"{path} is too short: delete it to make a new one") from None
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        return key

    def placeholder(self, sandbox: str, rule: str) -> str:
        """The placeholder of `rule` in `sandbox`: recognisable, useless, different in every sandbox."""
        digest = hmac.new(self._key, f"{sandbox}\0{rule}".encode(), hashlib.sha256).hexdigest()
        return f"{PLACEHOLDER_PREFIX}{rule}-{digest[:32]}"

    def sandbox_env(self, sandbox: str) -> dict[str, str]:
        return {rule.placeholder_env: self.placeholder(sandbox, rule.name) for rule in self.rules}

    def rules_for(self, host: str, port: int, opt_in: frozenset[str] = frozenset()) -> tuple[CredentialRule, ...]:
        """The rules for `host:port`: those of every session, and the opt-in ones the session asked for."""
        return tuple(rule for rule in self.rules
                     if rule.matches(host, port) and (not rule.session_opt_in or rule.name in opt_in))

    def rewrite(self, fields: Sequence[tuple[str, str]], target: str, rules: Sequence[CredentialRule],
                sandbox: str) -> Rewritten:
        """The request's fields with this sandbox's placeholders replaced for `rules` (they match its host).

        Raises PlaceholderMisuse when a placeholder shows anywhere it is not injected, and
        CredentialUnavailable when a secret that is needed cannot be read.
        """
        if carries_placeholder(target):
            raise PlaceholderMisuse("a placeholder in the request target")
        handled = {rule.header.lower() for rule in rules}
        out: list[tuple[str, str]] = []
        injected: list[str] = []
        redact: list[bytes] = []
        stripped = 0
        for name, value in fields:
            if name.lower() not in handled:
                if carries_placeholder(value):
                    raise PlaceholderMisuse("a placeholder in a header that does not carry it")
                out.append((name, value))
                continue
            for rule in rules:
                if rule.header.lower() != name.lower():
                    continue
                done = rule.substitute(value, self.placeholder(sandbox, rule.name))
                if done is not None:
                    out.append((name, done[0]))
                    injected.append(rule.name)
                    redact += [done[0].encode("latin-1"), done[1].encode("latin-1")]
                    break
            else:
                stripped += 1  # the header of a rule without this sandbox's placeholder: never sent on
        return Rewritten(tuple(out), tuple(injected), stripped, tuple(redact))
