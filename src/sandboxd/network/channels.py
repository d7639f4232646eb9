"""A sandbox's only ways out: the API broker and, when allowed, the egress proxy.

Sandboxes run with no network (`network_mode = "none"`, the default). The daemon serves two unix
sockets in `socket_dir`, bind-mounted read-only into every sandbox at /run/sandboxd: `api.sock`
forwards to the API host only (TLS end to end; the broker holds no credential), and, when
`egress_allowed_hosts` is set, `egress.sock` is the allow-list HTTP(S) proxy that the sandbox's
entrypoint offers to tools on 127.0.0.1:3128 through the standard proxy variables. With another
network mode the operator opted into raw networking: no broker, no proxy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

from ..errors import ConfigError
from ..metrics import Metrics
from .allowlist import EgressPolicy
from .broker import ApiBroker
from .egress import Decision, EgressProxy

log = logging.getLogger(__name__)

SANDBOX_SOCKET_DIR = "/run/sandboxd"
PROXY_PORT = 3128
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL


@dataclass(frozen=True)
class Channels:
    socket_dir: Path
    base_url: str  # the API as the sandbox would address it
    egress: EgressPolicy | None

    @classmethod
    def build(cls, *, network_mode: str, socket_dir: Path, base_url: str, allowed_hosts: list[str],
              audit: bool) -> Channels | None:
        """None when sandboxes have a network of their own (the operator's opt-out)."""
        if network_mode != "none":
            if allowed_hosts:
                log.warning("egress_allowed_hosts_ignored network_mode=%s (the proxy needs network_mode=none)",
                            network_mode)
            return None
        path = socket_dir / "egress.sock"
        if len(str(path)) > _MAX_SOCKET_PATH:
            raise ConfigError(f"`socket_dir` {socket_dir} is too long for a unix socket path (max ~95 characters)")
        try:
            policy = EgressPolicy(allowed_hosts, audit=audit) if allowed_hosts else None
        except ValueError as exc:
            raise ConfigError(f"`egress_allowed_hosts`: {exc}") from None
        return cls(socket_dir, base_url, policy)

    def sandbox_env(self) -> dict[str, str]:
        env = {"SANDBOXD_API_SOCKET": f"{SANDBOX_SOCKET_DIR}/api.sock"}
        if self.egress is not None:
            proxy = f"http://127.0.0.1:{PROXY_PORT}"
            env |= {"SANDBOXD_EGRESS_SOCKET": f"{SANDBOX_SOCKET_DIR}/egress.sock",
                    "SANDBOXD_EGRESS_PORT": str(PROXY_PORT), "NO_PROXY": "localhost,127.0.0.1",
                    "no_proxy": "localhost,127.0.0.1"}
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
                env[name] = proxy
        return env

    def bind_mounts(self) -> dict[str, str]:
        return {str(self.socket_dir): SANDBOX_SOCKET_DIR}

    def prepare(self) -> None:
        """Create the socket directory; ConfigError (exit 2) when it cannot be."""
        try:
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.socket_dir, 0o755)  # the sandbox user traverses it to connect
        except OSError as exc:
            raise ConfigError(f"`socket_dir` {self.socket_dir} is not usable: {exc.strerror or exc}") from None

    async def serve(self, metrics: Metrics, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Serve the broker (and the proxy) until cancelled; ready once the sockets accept."""
        def count(decision: Decision) -> None:
            metrics.egress_requests.labels(decision.value).inc()

        async with anyio.create_task_group() as tg:
            broker = ApiBroker.for_base_url(self.base_url, self.socket_dir / "api.sock",
                                            on_error=lambda exc: log.warning("broker_connect_failed error=%s", exc))
            await tg.start(broker.serve, name="api broker")
            if self.egress is not None:
                proxy = EgressProxy(self.egress, self.socket_dir / "egress.sock", on_decision=count)
                await tg.start(proxy.serve, name="egress proxy")
            log.info("channels_ready socket_dir=%s egress=%s", self.socket_dir,
                     "audit" if self.egress and self.egress.audit else "on" if self.egress else "off")
            task_status.started()
