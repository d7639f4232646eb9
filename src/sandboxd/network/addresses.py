"""Which IP addresses a sandbox's traffic may never reach, whatever name led to them.

The egress proxy checks every address a name resolves to against this one table: the host and
the pod network (loopback, RFC 1918, CGNAT, link-local, unique-local), cloud metadata services,
and everything not globally routable. IPv6 forms that *embed* an IPv4 address (mapped, translated,
compatible, 6to4, NAT64) are unwrapped and judged by what they embed, which a naive check misses.
Kept apart from the proxy so the list reads, and is tested, as a table.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

IPAddress = IPv4Address | IPv6Address

# Instance metadata (AWS, GCP, Azure-on-link-local; Alibaba; Azure's wire server; AWS over IPv6).
# 168.63.129.16 is a *public* address, so it must be named; the others are here so the reason says so.
METADATA_ADDRESSES = frozenset(
    ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "168.63.129.16", "fd00:ec2::254")
)
METADATA_NETWORKS = (ip_network("fd00:ec2::/32"),)

_V4: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),
        ("192.0.2.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        # Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the operator's prefix
        # length, so it cannot be unwrapped reliably; refused whole.
        ("64:ff9b:1::/48", "nat64-local"),
        ("100::/64", "reserved"),
        ("2001::/32", "reserved"),  # Teredo tunnelling
        ("2001:db8::/32", "reserved"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "reserved"),  # site-local, deprecated
        ("ff00::/8", "multicast"),
    )
)
_NAT64 = IPv6Network("64:ff9b::/96")
_LOW32 = 0xFFFFFFFF


def refusal(address: str | IPAddress) -> str | None:
    """Why `address` must not be reached (`loopback`, `metadata`, `private via nat64`...), or None.

    Raises ValueError for a string that is not an IP address.
    """
    parsed = ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(parsed, IPv6Address) and parsed.scope_id is not None:
        parsed = IPv6Address(int(parsed))
    if parsed in METADATA_ADDRESSES or any(parsed in net for net in METADATA_NETWORKS):
        return "metadata"
    if isinstance(parsed, IPv6Address):
        return _refusal_v6(parsed)
    for net, reason in _V4:
        if parsed in net:
            return reason
    return None if parsed.is_global else "reserved"


def _refusal_v6(address: IPv6Address) -> str | None:
    for net, reason in _V6:
        if address in net:
            return reason
    embedded = _embedded(address)
    if embedded is not None:
        form, inner = embedded
        inner_reason = refusal(inner)
        return f"{inner_reason} via {form}" if inner_reason else None
    return None if address.is_global else "reserved"


def _embedded(address: IPv6Address) -> tuple[str, IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, with the name of the form, if it carries one."""
    value = int(address)
    low = IPv4Address(value & _LOW32)
    if address.ipv4_mapped is not None:
        return "ipv4-mapped", address.ipv4_mapped
    if value >> 32 == 0xFFFF0000:  # ::ffff:0:a.b.c.d (SIIT)
        return "ipv4-translated", low
    if value >> 32 == 0:  # ::a.b.c.d (deprecated); :: and ::1 were matched before
        return "ipv4-compatible", low
    if address in _NAT64:
        return "nat64", low
    if address.sixtofour is not None:
        return "6to4", address.sixtofour
    return None
