"""A sandbox's only ways out, one set per sandbox: the API broker and, when allowed, the egress proxy.

Sandboxes run with no network (`network_mode = "none"`, the default). For each sandbox the daemon
serves two unix sockets in a directory of its own, `socket_dir/<sandbox name>/`, bind-mounted
read-only into that sandbox alone at /run/sandboxd: `api.sock` is the broker (only its own work
item's calls, only with its worker's placeholder credential), and, when `egress_allowed_hosts` is
set, `egress.sock` is the allow-list HTTP(S) proxy, offered to tools on 127.0.0.1:3128 by the
entrypoint's relay. Each socket has its own connection cap, so a sandbox that exhausts its share
waits in its own backlog and slows only itself. With another network mode the operator opted into
raw networking: no broker, no proxy.

With credential rules (`egress_credentials`), each sandbox's directory also holds `ca-bundle.pem`
(the system roots and the proxy's CA, named by SSL_CERT_FILE and its kin) and each sandbox gets
its own placeholders in its environment (`sandbox_env_for`); the real values stay in the daemon.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import anyio.abc

from ..errors import ConfigError
from ..logs import LogBudget, sandbox_log_budget
from ..metrics import Metrics
from .allowlist import EgressPolicy
from .authority import AuthorityError, CertificateAuthority, bundle, system_roots, upstream_context
from .broker import ApiBroker, Door, Grant, Traffic
from .credentials import CredentialRule, Credentials, CredentialUnavailable
from .egress import Decision, EgressProxy, Injection
from .sockets import serve_connections, unix_listener

log = logging.getLogger(__name__)

SANDBOX_SOCKET_DIR = "/run/sandboxd"
BROKER_URL = "http://sandboxd-broker"  # what the sandbox's SDK addresses; the socket decides where it goes
PROXY_PORT = 3128
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL
_NAME_ROOM = 40  # "/sandboxd-<16 hex>/egress.sock" and some to spare
CA_BUNDLE = "ca-bundle.pem"
# What tools read their trusted CAs from: each names the bundle (system roots and the proxy's CA).
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO",
                "PIP_CERT")


@dataclass(frozen=True)
class ChannelLimits:
    api_connections: int = 8  # per sandbox: the worker needs about four (stream, events, heartbeat, skills)
    egress_connections: int = 64  # per sandbox


@dataclass(frozen=True)
class Channels:
    """How sandboxes reach out (derived once from the settings); `serve` runs them."""

    socket_dir: Path
    base_url: str  # the API as the daemon reaches it: the broker forwards there
    egress: EgressPolicy | None
    limits: ChannelLimits = ChannelLimits()
    # Where each assigned sandbox's real credential is kept (0600, never mounted anywhere), so a
    # daemon that adopts the sandbox after a restart forwards its calls on the item's own token.
    grants_dir: Path | None = None
    injection: Injection | None = None  # credential rules: the proxy terminates TLS to their hosts
    ca_bundle: bytes = b""  # what each sandbox trusts when there are credential rules

    @classmethod
    def build(cls, *, network_mode: str, socket_dir: Path, base_url: str, allowed_hosts: list[str],
              audit: bool, grants_dir: Path | None = None, credentials: Sequence[CredentialRule] = (),
              egress_dir: Path | None = None, ca_files: tuple[Path, Path] | None = None,
              upstream_ca_file: Path | None = None) -> Channels | None:
        """None when sandboxes have a network of their own (the operator's opt-out)."""
        if network_mode != "none":
            if allowed_hosts:
                log.warning("egress_allowed_hosts_ignored network_mode=%s (the proxy needs network_mode=none)",
                            network_mode)
            if credentials:
                log.warning("egress_credentials_ignored network_mode=%s (the proxy needs network_mode=none)",
                            network_mode)
            return None
        if len(str(socket_dir)) + _NAME_ROOM > _MAX_SOCKET_PATH:
            raise ConfigError(f"`socket_dir` {socket_dir} is too long for a unix socket path (max ~65 characters)")
        try:
            policy = EgressPolicy(allowed_hosts, audit=audit) if allowed_hosts else None
        except ValueError as exc:
            raise ConfigError(f"`egress_allowed_hosts`: {exc}") from None
        if not credentials or policy is None:
            if credentials:
                log.warning("egress_credentials_ignored (no egress_allowed_hosts: sandboxes have no egress)")
            return cls(socket_dir, base_url, policy, grants_dir=grants_dir)
        assert egress_dir is not None
        injection = _injection(credentials, egress_dir, ca_files, upstream_ca_file)
        for rule in credentials:
            if not any(r.matches(rule.host, rule.port) for r in policy.rules) and not rule.wildcard:
                log.warning("egress_credential_host_not_allowed rule=%s host=%s port=%d (add it to "
                            "egress_allowed_hosts)", rule.name, rule.host, rule.port)
        return cls(socket_dir, base_url, policy, grants_dir=grants_dir, injection=injection,
                   ca_bundle=bundle(injection.authority, system_roots()))

    def sandbox_env(self) -> dict[str, str]:
        env = {"SANDBOXD_API_SOCKET": f"{SANDBOX_SOCKET_DIR}/api.sock", "ANTHROPIC_BASE_URL": BROKER_URL}
        if self.egress is not None:
            proxy = f"http://127.0.0.1:{PROXY_PORT}"
            env |= {"SANDBOXD_EGRESS_SOCKET": f"{SANDBOX_SOCKET_DIR}/egress.sock",
                    "SANDBOXD_EGRESS_PORT": str(PROXY_PORT), "NO_PROXY": "localhost,127.0.0.1",
                    "no_proxy": "localhost,127.0.0.1"}
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[name] = proxy
        if self.injection is not None:
            env |= {name: f"{SANDBOX_SOCKET_DIR}/{CA_BUNDLE}" for name in CA_VARIABLES}
        return env

    def sandbox_env_for(self, name: str) -> dict[str, str]:
        """The variables of sandbox `name` alone: its credential placeholders."""
        return self.injection.credentials.sandbox_env(name) if self.injection is not None else {}

    def prepare(self) -> None:
        """Create the socket directory; ConfigError (exit 2) when it cannot be."""
        try:
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.socket_dir, 0o755)  # the sandbox user traverses it to connect
            if self.grants_dir is not None:
                self.grants_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self.grants_dir, 0o700)
        except OSError as exc:
            raise ConfigError(f"`socket_dir` {self.socket_dir} is not usable: {exc.strerror or exc}") from None

    async def serve(self, metrics: Metrics, *,
                    task_status: anyio.abc.TaskStatus[SandboxDoors] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the per-sandbox sockets until cancelled; reports the registry sandboxes are opened in."""
        def decided(decision: Decision) -> None:
            metrics.egress_requests.labels(decision.value).inc()

        broker = ApiBroker(self.base_url, on_refused=lambda reason: metrics.broker_refused.labels(reason.value).inc())
        proxy = None
        injection = self.injection
        if injection is not None:
            for rule in injection.credentials.rules:
                metrics.egress_credentials_injected.labels(rule.name)
            injection = Injection(injection.credentials, injection.authority, injection.upstream_tls,
                                  on_injected=lambda rule: metrics.egress_credentials_injected.labels(rule).inc())
        if self.egress is not None:
            proxy = EgressProxy(self.egress, self.socket_dir / "egress.sock", on_decision=decided,
                                on_refused=lambda reason: metrics.egress_refused.labels(reason.value).inc(),
                                injection=injection)
        try:
            async with anyio.create_task_group() as tg:
                doors = SandboxDoors(self, tg, broker, proxy)
                log.info("channels_ready socket_dir=%s egress=%s", self.socket_dir,
                         "audit" if self.egress and self.egress.audit else "on" if self.egress else "off")
                task_status.started(doors)
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await broker.aclose()


class SandboxDoors:
    """The running channels: one directory of sockets per sandbox, opened and closed with it."""

    def __init__(self, channels: Channels, tg: anyio.abc.TaskGroup, broker: ApiBroker,
                 proxy: EgressProxy | None) -> None:
        self._channels = channels
        self._tg = tg
        self._broker = broker
        self._proxy = proxy
        self._open: dict[str, tuple[Door, anyio.CancelScope]] = {}

    def directory(self, name: str) -> Path:
        return self._channels.socket_dir / name

    async def open(self, name: str, grant: Grant | None, observe: Callable[[Traffic], None]) -> Door:
        """Serve `name`'s sockets (its directory made first: the container bind-mounts it).

        `grant` is what it may call (None until it is assigned an item); `observe` hears about its
        worker's calls. Both are in place before the first connection is accepted.
        """
        if name in self._open:
            return self._open[name][0]
        directory = self.directory(name)
        directory.mkdir(mode=0o755, exist_ok=True)
        os.chmod(directory, 0o755)
        if self._channels.ca_bundle:
            (directory / CA_BUNDLE).write_bytes(self._channels.ca_bundle)
            os.chmod(directory / CA_BUNDLE, 0o644)
        door = Door(name, grant, observe)
        scope = await self._tg.start(self._serve, door, directory, name=f"channels {name}")
        self._open[name] = (door, scope)
        return door

    async def _serve(self, door: Door, directory: Path, *,
                     task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
        limits = self._channels.limits
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                await tg.start(self._listen, directory / "api.sock", partial(self._broker.handle, door=door),
                               limits.api_connections, f"broker {door.name}")
                if self._proxy is not None:
                    sandbox_log_budget.set(LogBudget())  # inherited by this sandbox's proxy connections
                    await tg.start(self._listen, directory / "egress.sock", partial(self._proxy.handle, door=door),
                                   limits.egress_connections, f"egress {door.name}")
                task_status.started(scope)

    @staticmethod
    async def _listen(path: Path, handler: Callable[[anyio.abc.ByteStream], object], cap: int, name: str, *,
                      task_status: anyio.abc.TaskStatus[None]) -> None:
        async with unix_listener(path) as listener:
            task_status.started()
            await serve_connections(listener, handler, max_connections=cap, name=name)  # type: ignore[arg-type]

    def grant(self, door: Door, grant: Grant) -> None:
        """Let `door`'s worker call the API for its item; its credential is kept for an adopting daemon."""
        door.grant = grant
        kept = self._kept(door.name)
        if kept is not None:
            fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(grant.credential)

    def kept_credential(self, name: str) -> str | None:
        """The credential kept for `name` by an earlier run, if any."""
        kept = self._kept(name)
        try:
            return kept.read_text().strip() or None if kept is not None else None
        except OSError:
            return None

    def _kept(self, name: str) -> Path | None:
        return self._channels.grants_dir / name if self._channels.grants_dir is not None else None

    def close(self, name: str) -> None:
        """Stop serving `name`, remove its directory and what it was granted (idempotent)."""
        opened = self._open.pop(name, None)
        if opened is not None:
            opened[1].cancel()
        shutil.rmtree(self.directory(name), ignore_errors=True)
        kept = self._kept(name)
        if kept is not None:
            kept.unlink(missing_ok=True)

    def leave(self, name: str) -> None:
        """Stop serving `name` but keep its directory: the sandbox runs on for the next daemon."""
        opened = self._open.pop(name, None)
        if opened is not None:
            opened[1].cancel()


def _injection(rules: Sequence[CredentialRule], egress_dir: Path, ca_files: tuple[Path, Path] | None,
               upstream_ca_file: Path | None) -> Injection:
    """The proxy's credential injection: the rules, their secrets checked readable, the CA and upstream trust."""
    try:
        for rule in rules:
            rule.secret()
        credentials = Credentials(rules, Credentials.load_key(egress_dir))
        if ca_files is not None:
            authority = CertificateAuthority.load(ca_files[0], ca_files[1], egress_dir)
        else:
            authority = CertificateAuthority.load_or_create(egress_dir)
        return Injection(credentials, authority, upstream_context(upstream_ca_file))
    except (ValueError, OSError, AuthorityError, CredentialUnavailable) as exc:
        raise ConfigError(f"`egress_credentials`: {exc}") from None
