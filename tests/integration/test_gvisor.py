"""The sandbox network checks of test_broker and test_egress_proxy under gVisor (`--runtime runsc`).

`--host-uds=open` is what lets the sandbox connect to the bind-mounted broker and proxy sockets.

Needs the runtimes that scripts/setup-gvisor.sh registers; CI runs that script first. When they are
missing this test fails with what to run: a skip would hide a pipeline that lost gVisor.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import GitFixture
from tests.integration.test_broker import _Server, check_sandbox_reaches_only_the_socket, make_socket_dir, serve_api
from tests.integration.test_egress_proxy import check_sandbox_clones_only_through_the_relay

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def registered_runtimes() -> set[str]:
    done = subprocess.run(["docker", "info", "--format", "{{json .Runtimes}}"], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"docker info failed: {done.stderr.strip()}", pytrace=False)
    return set(json.loads(done.stdout or "{}"))


@pytest.fixture(scope="module")
def gvisor() -> str:
    missing = {"runsc", "runsc-host"} - registered_runtimes()
    if missing:
        pytest.fail(f"the Docker engine has no {', '.join(sorted(missing))} runtime: run scripts/setup-gvisor.sh "
                    "(as root) to install runsc and register it", pytrace=False)
    return "runsc"


async def test_a_gvisor_sandbox_reaches_the_api_only_through_the_socket(
    gvisor: str, sandbox_image: str, tmp_path: Path
) -> None:
    server: _Server
    with serve_api() as server:
        await check_sandbox_reaches_only_the_socket(sandbox_image, make_socket_dir(tmp_path), server,
                                                    "--runtime", gvisor)


async def test_a_gvisor_sandbox_clones_only_through_the_relay(
    gvisor: str, sandbox_image: str, git_fixture: GitFixture, tmp_path: Path
) -> None:
    server: _Server
    with serve_api() as server:
        await check_sandbox_clones_only_through_the_relay(sandbox_image, git_fixture, server, tmp_path,
                                                          "--runtime", gvisor)


def test_the_sandbox_really_runs_under_gvisor(gvisor: str, sandbox_image: str) -> None:
    done = subprocess.run(["docker", "run", "--rm", "--runtime", gvisor, "--network", "none", "--entrypoint",
                           "sh", sandbox_image, "-c", "dmesg | head -n 1"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gVisor" in done.stdout
