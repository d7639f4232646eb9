"""Local tools that need the optional `controlplane` extra: `sandboxd controlplane` and `sandboxd demo`.

The demo is the product end to end on one machine: the local control plane with scripted
sessions (every one calls all six tools), the real daemon in drain mode, real sandbox containers
on the local Docker engine, and a progress line per tool result as the sessions run.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from pydantic import SecretStr

from .daemon import ExitStatus
from .errors import EngineError
from .logs import configure as configure_logging


def main(command: str, argv: Sequence[str]) -> int:
    try:
        from .controlplane.__main__ import main as controlplane_main
        from .controlplane.scenario import Scenario, six_tool_session
        from .controlplane.server import ControlPlane
    except ImportError as exc:
        print(f"sandboxd {command} needs the controlplane extra: pip install 'sandboxd[controlplane]' ({exc})")
        return ExitStatus.CONFIG
    if command == "controlplane":
        return controlplane_main(argv)
    args = _demo_parser().parse_args(argv)
    scenario = Scenario(sessions=[six_tool_session(f"demo-{n + 1}") for n in range(args.sessions)])
    with ControlPlane(scenario) as plane, tempfile.TemporaryDirectory(prefix="sandboxd-demo-") as tmp:
        print(f"local control plane at {plane.url} with {args.sessions} sessions x 6 tools; "
              f"daemon capacity {args.max_sessions}", flush=True)
        return _run_demo(plane, args, Path(tmp))


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandboxd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=6, help="scripted sessions to run (default 6)")
    parser.add_argument("--max-sessions", type=int, default=3, help="sandboxes at once (default 3)")
    parser.add_argument("--image", default="sandboxd-sandbox:latest", help="sandbox image")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    return parser


def _run_demo(plane: Any, args: argparse.Namespace, tmp: Path) -> int:
    from .assembly import run_daemon
    from .settings import Settings

    configure_logging("text", args.log_level)
    settings = Settings(
        environment_id=plane.environment_id,
        environment_key=SecretStr(plane.environment_key),
        base_url=plane.url,
        image=args.image,
        pull_policy="never",
        max_sessions=args.max_sessions,
        max_idle_seconds=5,
        state_dir=tmp / "state",
        metrics_address=None,
        worker_id=f"sandboxd-demo-{secrets.token_hex(4)}",  # two demos on one engine never adopt each other
    )
    stop = threading.Event()
    progress = _Progress(plane)
    follower = threading.Thread(target=progress.follow, args=(stop,), daemon=True)
    follower.start()
    try:
        summary = anyio.run(lambda: run_daemon(settings, drain=True))
    except EngineError as exc:
        print(f"sandboxd demo: {exc}")
        return ExitStatus.FATAL
    finally:
        stop.set()
        follower.join(2)
    progress.print_new()
    state = plane.state_snapshot()
    checked = sum(len(s["results"]) for s in state["sessions"].values())
    matched = sum(r["passed"] for s in state["sessions"].values() for r in s["results"])
    print(summary.render())
    print(f"tool results checked by the control plane: {matched}/{checked} as expected")
    code = summary.exit_code(drain=True)
    return code if matched == checked else ExitStatus.SESSIONS_FAILED


class _Progress:
    """Prints each tool result once, as the control plane records it."""

    def __init__(self, plane: Any) -> None:
        self._plane = plane
        self._printed: set[str] = set()

    def print_new(self) -> None:
        for session in self._plane.state_snapshot()["sessions"].values():
            for result in session["results"]:
                if result["tool_use_id"] in self._printed:
                    continue
                self._printed.add(result["tool_use_id"])
                mark = "ok " if result["passed"] else "BAD"
                lines = (result["text"] or "").strip().splitlines()
                first = lines[0][:60] if lines else ""
                print(f"  [{mark}] {session['session_id']} {result['name']:<5} {first}", flush=True)

    def follow(self, stop: threading.Event) -> None:
        while not stop.wait(0.2):
            self.print_new()
