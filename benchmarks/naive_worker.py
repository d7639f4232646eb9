"""The naive contender: what an SDK worker with an `--on-work` script does, as a process of its own.

It claims with the SDK's poller (a slot taken before each claim, like sandboxd) and runs each item
in a plain `docker run -i --rm --network host` of the sandbox image, the item on stdin: no
hardening, no broker, no metrics. `sandbox_bench.py` times it from process start to exit, as it
times `sandboxd drain`. The environment key comes from the environment (`ANTHROPIC_ENVIRONMENT_KEY`),
never from argv.

    python benchmarks/naive_worker.py --base-url URL --environment-id ID [--width 4] [--label K=V]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import anyio
from anthropic import AsyncAnthropic

from sandboxd.protocol import Assignment, workspace_ready_line

IMAGE = os.environ.get("SANDBOXD_IMAGE", "sandboxd-sandbox:latest")


def naive_command(base_url: str, label: str, max_idle: float) -> list[str]:
    return ["docker", "run", "-i", "--rm", "--network", "host", "--label", label,
            "-e", f"ANTHROPIC_BASE_URL={base_url}", IMAGE, "--workdir", "/workspace", "--max-idle", str(max_idle)]


async def naive_item(base_url: str, item: Any, label: str, max_idle: float) -> None:
    """`docker run -i` the image and hand it the claimed item on stdin."""
    assignment = Assignment(item.id, item.environment_id, item.data.id, item.secret)
    result = await anyio.run_process(naive_command(base_url, label, max_idle),
                                     input=assignment.to_line() + workspace_ready_line(), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"docker run exited {result.returncode}: {result.stderr.decode()[-2000:]}")


async def naive_burst(base_url: str, environment_id: str, environment_key: str, width: int, label: str,
                      max_idle: float) -> None:
    """Claim within capacity until the queue is empty and `docker run` each item."""
    slots = anyio.Semaphore(width)
    async with AsyncAnthropic(base_url=base_url, auth_token=environment_key) as claimer, \
            anyio.create_task_group() as tg:
        claims = claimer.beta.environments.work.poller(environment_id=environment_id,
                                                       environment_key=environment_key, drain=True,
                                                       auto_stop=False)

        async def serve(item: Any) -> None:
            try:
                await naive_item(base_url, item, label, max_idle)
            finally:
                slots.release()

        while True:
            await slots.acquire()
            try:
                item = await anext(claims)
            except StopAsyncIteration:
                break
            tg.start_soon(serve, item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--environment-id", required=True)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--label", default="io.sandboxd.bench=naive")
    parser.add_argument("--max-idle", type=float, default=2.0)
    args = parser.parse_args()
    key = os.environ.get("ANTHROPIC_ENVIRONMENT_KEY")
    if not key:
        sys.exit("naive_worker: set ANTHROPIC_ENVIRONMENT_KEY")
    anyio.run(naive_burst, args.base_url, args.environment_id, key, args.width, args.label, args.max_idle)


if __name__ == "__main__":
    main()
