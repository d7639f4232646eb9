"""`python -m sandboxd.controlplane`: serve a scenario until SIGTERM/SIGINT.

Prints one line, `controlplane url=http://HOST:PORT environment_id=ENV`, once
it accepts connections. Keys are never printed: pass `--secrets-dir DIR` to
get them as 0600 files (`DIR/environment_key`, `DIR/api_key`); `--six-tools N`
adds N six-tool demo sessions to the scenario.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from .scenario import Scenario, load_scenario, six_tool_session
from .server import ControlPlane


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sandboxd.controlplane", description=__doc__)
    parser.add_argument("--scenario", help="scenario JSON file (default: an empty scenario)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--secrets-dir", help="write environment_key and api_key files (0600) here")
    parser.add_argument("--six-tools", type=int, default=0, metavar="N", help="also enqueue N six-tool demo sessions")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    scenario = load_scenario(args.scenario) if args.scenario else Scenario()
    scenario.sessions.extend(six_tool_session(f"demo{n + 1}") for n in range(args.six_tools))
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with ControlPlane(scenario, host=args.host, port=args.port) as plane:
        if args.secrets_dir:
            plane.write_secret_files(args.secrets_dir)
        print(f"controlplane url={plane.url} environment_id={plane.environment_id}", flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
