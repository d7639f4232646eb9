"""The egress decision: allow-list rules, the refused-address matrix, rebinding, audit mode.

No packet leaves: names go through a fake resolver, connections through a recording connector,
and the proxy's client side is one end of a unix socketpair.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import anyio
import anyio.abc
import pytest

from sandboxd.network.addresses import refusal
from sandboxd.network.allowlist import EgressPolicy, Rule
from sandboxd.network.egress import BadRequest, Decision, EgressGate, EgressProxy, parse_request

pytestmark = pytest.mark.anyio

# (address, the reason it is refused)
REFUSED = [
    ("169.254.169.254", "metadata"),
    ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("fd00:ec2::254", "metadata"),
    ("fd00:ec2::1", "metadata"),
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.254", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("169.254.10.1", "link-local"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("224.0.0.251", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "reserved"),
    ("198.18.0.1", "reserved"),
    ("2001:db8::1", "reserved"),
    ("2001:0:4136:e378::1", "reserved"),  # Teredo
    ("::ffff:127.0.0.1", "loopback via ipv4-mapped"),
    ("::ffff:10.1.2.3", "private via ipv4-mapped"),
    ("::ffff:169.254.169.254", "metadata via ipv4-mapped"),
    ("::ffff:0:127.0.0.1", "loopback via ipv4-translated"),
    ("::127.0.0.1", "loopback via ipv4-compatible"),
    ("::10.0.0.1", "private via ipv4-compatible"),
    ("2002:7f00:1::", "loopback via 6to4"),
    ("2002:a9fe:a9fe::1", "metadata via 6to4"),
    ("2002:c0a8:101::", "private via 6to4"),
    ("64:ff9b::7f00:1", "loopback via nat64"),
    ("64:ff9b::169.254.169.254", "metadata via nat64"),
    ("64:ff9b::100.64.0.1", "cgnat via nat64"),
    ("64:ff9b:1::a00:1", "nat64-local"),
    ("64:ff9b:1:ffff::8.8.8.8", "nat64-local"),
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


class FakeResolver:
    """Answers from a script (one answer per call, the last one repeated) and records each call."""

    def __init__(self, *answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if not self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


class RecordingConnector:
    """Records every connect; hands out one end of a socketpair (or refuses, with `refuse`)."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, int]] = []
        self.peers: list[anyio.abc.SocketStream] = []
        self.connected = anyio.Event()

    async def __call__(self, address: str, port: int) -> anyio.abc.ByteStream:
        self.calls.append((address, port))
        if self.refuse:
            raise ConnectionRefusedError(111, "Connection refused")
        ours, theirs = socket.socketpair()
        self.peers.append(await anyio.abc.UNIXSocketStream.from_socket(theirs))
        self.connected.set()
        return await anyio.abc.UNIXSocketStream.from_socket(ours)


def gate(entries: list[str], resolver: FakeResolver | None = None, *, audit: bool = False,
         seen: list[Decision] | None = None) -> EgressGate:
    return EgressGate(EgressPolicy(entries, audit=audit), resolver=resolver or FakeResolver(),
                      on_decision=seen.append if seen is not None else None)


# --- the refusal matrix -------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "reason"), REFUSED)
def test_address_table(address: str, reason: str) -> None:
    assert refusal(address) == reason


@pytest.mark.parametrize(("address", "reason"), REFUSED)
async def test_a_listed_name_resolving_to_a_refused_address_is_refused(address: str, reason: str) -> None:
    verdict = await gate(["svc.example.com"], FakeResolver([address])).decide("svc.example.com", 443)
    assert verdict.decision is Decision.REFUSED
    assert verdict.reason == f"resolves to {address} ({reason})"
    assert verdict.status == 403 and verdict.addresses == ()


@pytest.mark.parametrize(("address", "reason"), REFUSED)
async def test_a_listed_ip_literal_is_checked_like_a_resolved_address(address: str, reason: str) -> None:
    resolver = FakeResolver()
    literal = address.split("%")[0]
    verdict = await gate([f"[{literal}]", f"*.{'svc.test'}"], resolver).decide(literal, 443)
    assert verdict.decision is Decision.REFUSED
    assert reason in verdict.reason
    assert resolver.calls == []  # a literal is never sent to the resolver


@pytest.mark.parametrize("address", PUBLIC)
async def test_a_public_address_is_allowed_and_is_the_connect_target(address: str) -> None:
    verdict = await gate(["svc.example.com"], FakeResolver([address])).decide("svc.example.com", 443)
    assert verdict.decision is Decision.ALLOWED
    assert verdict.addresses == (address,)


# --- rebinding ---------------------------------------------------------------------------------


async def _serve_one(proxy: EgressProxy, sock: socket.socket) -> None:
    """What the listener does with an accepted connection: handle it, then close it."""
    async with await anyio.abc.UNIXSocketStream.from_socket(sock) as server:
        await proxy.handle(server)


async def _request(proxy: EgressProxy, head: bytes) -> bytes:
    """Send one request through `proxy.handle` over a socketpair; return what the client receives."""
    ours, theirs = socket.socketpair()
    client = await anyio.abc.UNIXSocketStream.from_socket(ours)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(_serve_one, proxy, theirs)
        await client.send(head)
        received = b""
        with anyio.fail_after(5):
            while True:
                try:
                    received += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
                if b"200 Connection established" in received:
                    break
        tg.cancel_scope.cancel()
    return received


async def test_rebinding_connects_to_the_checked_address_without_a_second_lookup() -> None:
    resolver = FakeResolver(["93.184.216.34"], ["127.0.0.1"])
    connector = RecordingConnector(refuse=True)
    proxy = EgressProxy(EgressPolicy(["rebind.example.com"]), tcp_port=0, resolver=resolver, connector=connector)
    answer = await _request(proxy, b"CONNECT rebind.example.com:443 HTTP/1.1\r\nHost: rebind.example.com:443\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert resolver.calls == [("rebind.example.com", 443)]
    assert connector.calls == [("93.184.216.34", 443)]
    # The next lookup answers with loopback: refused before any connect.
    answer = await _request(proxy, b"CONNECT rebind.example.com:443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"127.0.0.1 (loopback)" in answer
    assert connector.calls == [("93.184.216.34", 443)]


@pytest.mark.parametrize("answer", [["93.184.216.34", "10.0.0.5"], ["10.0.0.5", "93.184.216.34"],
                                    ["2606:4700::1111", "::ffff:10.0.0.5"]])
async def test_a_name_with_any_refused_address_is_refused(answer: list[str]) -> None:
    verdict = await gate(["mixed.example.com"], FakeResolver(answer)).decide("mixed.example.com", 443)
    assert verdict.decision is Decision.REFUSED
    assert "10.0.0.5" in verdict.reason


async def test_a_resolver_answer_that_is_not_an_address_is_refused() -> None:
    verdict = await gate(["odd.example.com"], FakeResolver(["8.8.8.8", "not-an-ip"])).decide("odd.example.com", 443)
    assert verdict.decision is Decision.REFUSED and "not an IP address" in verdict.reason


async def test_allowed_addresses_are_tried_in_order_and_only_those() -> None:
    resolver = FakeResolver(["93.184.216.34", "93.184.216.35"])
    connector = RecordingConnector(refuse=True)
    proxy = EgressProxy(EgressPolicy(["two.example.com"]), tcp_port=0, resolver=resolver, connector=connector)
    await _request(proxy, b"CONNECT two.example.com:443 HTTP/1.1\r\n\r\n")
    assert connector.calls == [("93.184.216.34", 443), ("93.184.216.35", 443)]


# --- names, ports, wildcards, explicit entries ---------------------------------------------------


async def test_a_name_not_listed_is_refused_before_any_lookup() -> None:
    resolver = FakeResolver(["93.184.216.34"])
    verdict = await gate(["good.example.com"], resolver).decide("evil.example.com", 443)
    assert verdict.decision is Decision.REFUSED and verdict.reason == "not in the allow-list"
    assert resolver.calls == []


@pytest.mark.parametrize(("entry", "host", "port", "allowed"), [
    ("pypi.org", "pypi.org", 443, True),
    ("pypi.org", "pypi.org", 80, True),
    ("pypi.org", "PyPI.org.", 443, True),
    ("pypi.org", "pypi.org", 8080, False),
    ("pypi.org", "pypi.org", 22, False),
    ("pypi.org", "files.pypi.org", 443, False),
    ("git.example.com:8443", "git.example.com", 8443, True),
    ("git.example.com:8443", "git.example.com", 443, False),
    ("*.example.com", "a.example.com", 443, True),
    ("*.example.com", "a.b.example.com", 80, True),
    ("*.example.com", "example.com", 443, False),
    ("*.example.com", "badexample.com", 443, False),
    ("*.example.com", "a.example.com", 8080, False),
    ("*.example.com:8443", "a.example.com", 8443, True),
    ("*.example.com:8443", "a.example.com", 443, False),
])
async def test_port_and_wildcard_rules(entry: str, host: str, port: int, allowed: bool) -> None:
    verdict = await gate([entry], FakeResolver(["93.184.216.34"])).decide(host, port)
    assert (verdict.decision is Decision.ALLOWED) is allowed, verdict


@pytest.mark.parametrize(("entries", "host", "port", "answer", "allowed"), [
    (["127.0.0.1:8080"], "127.0.0.1", 8080, [], True),
    (["127.0.0.1:8080"], "127.0.0.1", 8081, [], False),
    (["127.0.0.1"], "127.0.0.1", 80, [], False),
    (["[::1]:8080"], "::1", 8080, [], True),
    (["metadata.internal:80"], "metadata.internal", 80, ["169.254.169.254"], True),
    (["metadata.internal"], "metadata.internal", 80, ["169.254.169.254"], False),
    (["*.internal"], "metadata.internal", 80, ["169.254.169.254"], False),
    (["*.internal:80"], "metadata.internal", 80, ["169.254.169.254"], False),
    (["metadata.internal", "metadata.internal:80"], "metadata.internal", 80, ["169.254.169.254"], True),
    (["metadata.internal", "metadata.internal:80"], "metadata.internal", 443, ["169.254.169.254"], False),
])
async def test_only_an_exact_host_port_entry_lets_a_refused_address_through(
    entries: list[str], host: str, port: int, answer: list[str], allowed: bool
) -> None:
    verdict = await gate(entries, FakeResolver(answer)).decide(host, port)
    assert (verdict.decision is Decision.ALLOWED) is allowed, verdict


@pytest.mark.parametrize("entry", ["*.10.0.0.1", "host:99999", "host:0", "bad host", "[::1", "*.", "a..b", ""])
def test_bad_allow_list_entries_are_configuration_errors(entry: str) -> None:
    with pytest.raises(ValueError):
        EgressPolicy([entry])


def test_entries_parse_to_rules() -> None:
    assert EgressPolicy(["[::1]:8080", "*.Example.COM", "pypi.org:443"]).rules == (
        Rule("::1", 8080), Rule("example.com", None, wildcard=True), Rule("pypi.org", 443))


# --- audit mode, decisions reported, logs ----------------------------------------------------------


async def test_audit_mode_allows_what_would_be_refused_and_says_so() -> None:
    seen: list[Decision] = []
    audit = gate(["good.example.com"], FakeResolver(["10.0.0.7"]), audit=True, seen=seen)
    not_listed = await audit.decide("other.example.com", 443)
    assert not_listed.decision is Decision.AUDIT and not_listed.addresses == ("10.0.0.7",)
    assert not_listed.reason == "not in the allow-list"
    private = await audit.decide("good.example.com", 443)
    assert private.decision is Decision.AUDIT and "10.0.0.7 (private)" in private.reason
    public = await gate(["good.example.com"], FakeResolver(["8.8.8.8"]), audit=True, seen=seen).decide(
        "good.example.com", 443)
    assert public.decision is Decision.ALLOWED
    assert seen == [Decision.AUDIT, Decision.AUDIT, Decision.ALLOWED]
    assert [d.value for d in Decision] == ["allowed", "refused", "audit"]


async def test_a_name_that_does_not_resolve_is_refused_with_502() -> None:
    verdict = await gate(["gone.example.com"], FakeResolver(), audit=True).decide("gone.example.com", 443)
    assert verdict.decision is Decision.REFUSED and verdict.status == 502


async def test_every_decision_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sandboxd.network.egress")
    await gate(["ok.example.com"], FakeResolver(["8.8.8.8"])).decide("ok.example.com", 443)
    await gate(["ok.example.com"], FakeResolver(["8.8.8.8"])).decide("no.example.com", 80)
    await gate([], FakeResolver(["10.0.0.1"]), audit=True).decide("au.example.com", 443)
    assert caplog.messages == [
        "egress_allowed host=ok.example.com port=443 address=8.8.8.8",
        "egress_refused host=no.example.com port=80 reason=not in the allow-list",
        "egress_audit host=au.example.com port=443 address=10.0.0.1 reason=not in the allow-list",
    ]


# --- the proxy protocol ---------------------------------------------------------------------------


def test_parse_connect_and_absolute_form() -> None:
    connect = parse_request(b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443")
    assert (connect.method, connect.host, connect.port, connect.upstream_head) == ("CONNECT", "::1", 8443, b"")
    get = parse_request(b"GET http://Files.Example.com:8080/a/b?x=1 HTTP/1.1\r\nHost: files.example.com:8080\r\n"
                        b"Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nAccept: */*")
    assert (get.host, get.port) == ("files.example.com", 8080)
    assert get.upstream_head == (b"GET /a/b?x=1 HTTP/1.1\r\nHost: files.example.com:8080\r\nAccept: */*\r\n"
                                 b"Connection: close\r\n\r\n")
    # The proxy speaks its own version upstream (RFC 9110 section 6.2): an HTTP/1.0 client's request goes as 1.1.
    assert parse_request(b"GET http://h.example.com HTTP/1.0").upstream_head == (
        b"GET / HTTP/1.1\r\nHost: h.example.com\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("head", [b"GET / HTTP/1.1\r\nHost: x", b"GET https://x.example.com/ HTTP/1.1",
                                  b"CONNECT x.example.com HTTP/1.1", b"CONNECT x.example.com:99999 HTTP/1.1",
                                  b"CONNECT bad_host!:443 HTTP/1.1", b"GET http://x.example.com/ SPDY/3",
                                  b"GET http://x.example.com/ HTTP/1.1\r\nno colon here"])
def test_bad_requests(head: bytes) -> None:
    with pytest.raises(ValueError):
        parse_request(head)
    assert issubclass(BadRequest, ValueError)


async def test_the_proxy_answers_refusals_403_and_bad_requests_400() -> None:
    connector = RecordingConnector()
    proxy = EgressProxy(EgressPolicy(["ok.example.com"]), tcp_port=0, resolver=FakeResolver(["8.8.8.8"]),
                        connector=connector)
    refused = await _request(proxy, b"GET http://no.example.com/ HTTP/1.1\r\nHost: no.example.com\r\n\r\n")
    status, _, body = refused.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert body == b"sandboxd egress: no.example.com:80 refused: not in the allow-list\n"
    assert (await _request(proxy, b"GET /relative HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert connector.calls == []


async def test_an_allowed_plain_request_goes_to_the_checked_address_rewritten() -> None:
    connector = RecordingConnector()
    proxy = EgressProxy(EgressPolicy(["ok.example.com"]), tcp_port=0, resolver=FakeResolver(["8.8.4.4"]),
                        connector=connector)
    ours, theirs = socket.socketpair()
    client = await anyio.abc.UNIXSocketStream.from_socket(ours)
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(_serve_one, proxy, theirs)
        await client.send(b"GET http://ok.example.com/x HTTP/1.1\r\nHost: ok.example.com\r\n\r\n")
        with anyio.fail_after(5):
            await connector.connected.wait()
            upstream = connector.peers[0]
            seen = await upstream.receive()
            await upstream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
            await upstream.aclose()
            answer = b""
            while not answer.endswith(b"hi"):  # the client's connection stays open for its next request
                answer += await client.receive()
        tg.cancel_scope.cancel()
    assert connector.calls == [("8.8.4.4", 80)]
    assert seen == b"GET /x HTTP/1.1\r\nHost: ok.example.com\r\nConnection: close\r\n\r\n"
    assert answer == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
