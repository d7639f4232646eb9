"""The `sandboxd` command: run (the daemon), drain (one-shot for CI), and the local tools.

This is the only layer that reads the process environment and builds the Settings; everything
below receives narrow, already-validated values.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from . import __version__
from .containers import DockerBackend, SandboxSpec
from .daemon import Daemon, ExitStatus, Summary
from .errors import ConfigError, EngineError
from .exporter import collecting
from .health import HealthState, serving
from .logs import configure as configure_logging
from .metrics import Metrics
from .notify import Notifier
from .queue import WorkQueue
from .session import SessionLimits, SessionSupervisor
from .settings import Settings, load_settings
from .workspace import WorkspaceConfig, Workspaces

log = logging.getLogger("sandboxd")

COMMANDS = {
    "run": "poll the environment and run each session in its own sandbox, until stopped",
    "drain": "claim work until the queue is empty, wait for every session, print a summary",
    "exporter": "export queue stats only (run apart from the workers, with an API key)",
    "controlplane": "serve the local stand-in of the Managed Agents API (tests, demo)",
    "demo": "run sessions end to end against the local control plane with real containers",
    "version": "print the version",
}


def sandbox_spec(settings: Settings) -> SandboxSpec:
    instance = settings.worker_id or f"{socket.gethostname()}-{settings.environment_id}"
    return SandboxSpec(
        image=settings.image,
        user=settings.sandbox_user,
        network_mode=settings.network_mode,
        memory_limit=settings.memory_limit,
        cpus=settings.cpus,
        pids_limit=settings.pids_limit,
        tmp_size=settings.tmp_size,
        base_url=settings.effective_sandbox_base_url,
        max_idle_seconds=settings.max_idle_seconds,
        pull_policy=settings.pull_policy,
        runtime=settings.runtime,
        instance=instance,
    )


async def run_daemon(
    settings: Settings, *, drain: bool, metrics: Metrics | None = None, backend: DockerBackend | None = None
) -> Summary:
    """Wire the daemon's parts from the settings and run it (`backend`: tests pass a fake engine)."""
    assert settings.environment_id and settings.environment_key
    environment_key = settings.environment_key.get_secret_value()
    metrics = metrics or Metrics()
    backend = backend or DockerBackend.from_env(sandbox_spec(settings))
    if not await backend.ping():
        raise EngineError("the Docker engine does not answer (is dockerd running? DOCKER_HOST?)")
    queue = WorkQueue(
        base_url=settings.base_url,
        environment_id=settings.environment_id,
        environment_key=environment_key,
        worker_id=settings.worker_id,
        block_ms=settings.poll_block_ms,
        reclaim_older_than_ms=settings.reclaim_older_than_ms,
        metrics=metrics,
    )
    limits = SessionLimits(
        max_session_seconds=settings.max_session_seconds,
        stop_timeout_seconds=settings.stop_timeout_seconds,
        container_log_lines=settings.container_log_lines,
        allow_environment_key_in_sandbox=settings.allow_environment_key_in_sandbox,
    )
    workspaces = Workspaces(WorkspaceConfig.from_settings(settings))
    await workspaces.reap_abandoned()  # staging left by a crashed run
    supervisor = SessionSupervisor(queue, backend, workspaces, metrics, limits, environment_key)
    health = HealthState(poll_window_seconds=settings.ready_poll_window_seconds)
    notifier = Notifier.from_environ(os.environ)
    daemon = Daemon(
        queue, supervisor, backend, metrics, health, notifier,
        max_sessions=settings.max_sessions,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        drain_timeout_seconds=settings.drain_timeout_seconds if drain else None,
    )
    try:
        # /metrics, /healthz and /readyz answer before the first poll; queue stats only with an API key.
        async with serving(settings.metrics_address, metrics.registry, health), collecting(settings, metrics.queue):
            return await daemon.run(drain=drain)
    finally:
        await queue.aclose()
        notifier.close()


def _daemon_command(command: str, settings: Settings) -> int:
    settings.require("environment_id", "environment_key", command=command)
    drain = command == "drain"
    summary = anyio.run(lambda: run_daemon(settings, drain=drain))
    code = summary.exit_code(drain=drain)
    if drain:
        print(summary.render(), flush=True)
    log.info("daemon_exit code=%d sessions=%d failed=%d", code, len(summary.results), summary.failed)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandboxd",
        description="Self-hosted sandbox orchestrator for Claude Managed Agents.",
        epilog="Settings: every flag is also an environment variable SANDBOXD_<NAME> and a key of the "
        "TOML config file. `sandboxd run --help` lists them.",
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                        help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    parser.add_argument("--config", help="TOML config file (default /etc/sandboxd/sandboxd.toml if present)")
    parser.add_argument("--secrets-dir", action="append", type=Path, default=[],
                        help="directory of secret files (environment_key, api_key); repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args, rest = _parser().parse_known_args(argv)
    if args.command == "version":
        print(f"sandboxd {__version__}")
        return
    if args.command in ("controlplane", "demo"):
        from .local import main as local_main

        sys.exit(local_main(args.command, rest))
    try:
        settings = load_settings(rest, prog=f"sandboxd {args.command}", config_file=args.config,
                                 secrets_dir=args.secrets_dir)
        redactor = configure_logging(settings.log_format, settings.log_level)
        redactor.add(s.get_secret_value() for s in (settings.environment_key, settings.api_key) if s)
        if args.command == "exporter":
            from .exporter import main as exporter_main

            sys.exit(exporter_main(settings))
        sys.exit(_daemon_command(args.command, settings))
    except ConfigError as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        sys.exit(ExitStatus.CONFIG)
    except EngineError as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        sys.exit(ExitStatus.FATAL)
