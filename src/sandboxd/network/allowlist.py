"""The operator's egress allow-list: which names and ports a sandbox may ask the proxy for.

Entries are `host` (ports 80 and 443), `host:port` (exactly that port) and `*.suffix` (any
subdomain of suffix, not suffix itself; `*.suffix:port` narrows it to one port). IPv6 literals are
written in brackets: `[2001:db8::1]:443`. Only an exact `host:port` entry is *explicit*: it alone
lets a name through whose addresses `addresses.refusal` would refuse (a service on the host, a
metadata endpoint), because the operator named precisely that endpoint. Parsed once, at start-up:
a bad entry is a configuration error, not a refusal at request time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import ip_address

DEFAULT_PORTS = frozenset({80, 443})
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def normalise_host(host: str) -> str | None:
    """The canonical form of a host name or IP literal (lower case, no trailing dot), or None if invalid."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if is_ip_literal(host):
        return str(ip_address(host))
    host = host.removesuffix(".")
    if len(host) > 253 or not _NAME.match(host):
        return None
    return host


def is_ip_literal(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def split_host_port(value: str) -> tuple[str, str | None]:
    """`host:port` or `[v6]:port` into its parts; a bare host or unbracketed IPv6 literal has no port."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad bracketed address {value!r}")
        return host, rest[1:] if rest else None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port
    return value, None


def parse_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port {text!r}")
    return int(text)


@dataclass(frozen=True)
class Rule:
    """One allow-list entry."""

    host: str  # a canonical name or IP literal; for a wildcard, the suffix without `*.`
    port: int | None  # None: the default ports 80 and 443
    wildcard: bool = False

    @property
    def explicit(self) -> bool:
        """An exact host:port entry: it may lead to an address that would otherwise be refused."""
        return self.port is not None and not self.wildcard

    def matches(self, host: str, port: int) -> bool:
        if port not in ((self.port,) if self.port is not None else DEFAULT_PORTS):
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host

    @classmethod
    def parse(cls, entry: str) -> Rule:
        text = entry.strip().lower()
        wildcard = text.startswith("*.")
        host_text, port_text = split_host_port(text[2:] if wildcard else text)
        host = normalise_host(host_text)
        if host is None:
            raise ValueError(f"allow-list entry {entry!r}: {host_text!r} is not a host name or IP address")
        if wildcard and is_ip_literal(host):
            raise ValueError(f"allow-list entry {entry!r}: a wildcard needs a domain suffix, not an address")
        port = parse_port(port_text) if port_text is not None else None
        return cls(host, port, wildcard)


@dataclass(frozen=True)
class EgressPolicy:
    """The allow-list, and whether refusals are only audited (logged and counted, then allowed)."""

    allowed_hosts: list[str] = field(default_factory=list)
    audit: bool = False
    rules: tuple[Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(Rule.parse(entry) for entry in self.allowed_hosts))

    def rule_for(self, host: str, port: int) -> Rule | None:
        """The entry that allows `host:port` (an explicit one first), or None. `host` must be canonical."""
        matching = [rule for rule in self.rules if rule.matches(host, port)]
        matching.sort(key=lambda rule: not rule.explicit)
        return matching[0] if matching else None
