"""The `sandboxd` command: run (the daemon), drain (one-shot for CI), and the local tools.

This is the only layer that reads the process environment and builds the Settings; everything
below receives narrow, already-validated values.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import anyio

from . import __version__
from .assembly import run_daemon
from .daemon import ExitStatus
from .errors import ConfigError, EngineError
from .logs import configure as configure_logging
from .settings import Settings, load_settings

log = logging.getLogger("sandboxd")

COMMANDS = {
    "run": "poll the environment and run each session in its own sandbox, until stopped",
    "drain": "claim work until the queue is empty, wait for every session, print a summary",
    "exporter": "export queue stats only (run apart from the workers, with an API key)",
    "controlplane": "serve the local stand-in of the Managed Agents API (tests, demo)",
    "demo": "run sessions end to end against the local control plane with real containers",
    "version": "print the version",
}


def _daemon_command(command: str, settings: Settings) -> NoReturn:
    settings.require("environment_id", "environment_key", command=command)
    drain = command == "drain"
    # Everything imported so far (the SDK's types are most of 170k objects) lives as long as the
    # process: out of the collector's sight, a full collection takes microseconds instead of ~50 ms.
    gc.freeze()
    summary = anyio.run(lambda: run_daemon(settings, drain=drain))
    code = summary.exit_code(drain=drain)
    if drain:
        print(summary.render(), flush=True)
    log.info("daemon_exit code=%d sessions=%d failed=%d handed_off=%s", code, len(summary.results), summary.failed,
             summary.handed_off)
    if summary.reexec:
        _reexec()
    # Everything of ours is closed by now. After a hand-off threads still wait on the engine for
    # sandboxes left to the next daemon (a container wait, a log follower) and must not hold the
    # process; otherwise this skips the interpreter's teardown (about 0.25 s at the end of a drain).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _reexec() -> None:
    """SIGHUP's hand-off: the same PID runs the (possibly upgraded) code again and adopts the sandboxes."""
    log.warning("daemon_reexec argv=%s", " ".join(sys.argv[1:2]))
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", "sandboxd", *sys.argv[1:]])


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
    faulthandler.enable()  # a watchdog's SIGABRT (a stuck loop) leaves every thread's stack in the log
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
        _daemon_command(args.command, settings)
    except ConfigError as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        sys.exit(ExitStatus.CONFIG)
    except EngineError as exc:
        print(f"sandboxd: {exc}", file=sys.stderr)
        sys.exit(ExitStatus.FATAL)
