"""The sandbox-limits checks (sandboxd.limits) against this machine's real Docker engine.

This engine (dockerd 20.10, runc, the cgroup version `docker info` reports; cgroup v1 on the
development machine) enforces memory, pids and CPU limits: the probe reads them back from a
sandbox-like container's own cgroup, and a real sandbox is created with every check passing. A
probe that expects stricter limits than the container got finds each of them out (the numbers
are really read), and under gVisor, whose sandboxes see no cgroup files, the probe is
inconclusive and refuses nothing.
"""

from __future__ import annotations

import gc
import logging
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import docker
import pytest

from sandboxd.containers import DockerBackend, SandboxSpec
from sandboxd.limits import LIMITS, Wanted
from tests.conftest import managed_leftovers
from tests.integration.test_gvisor import gvisor  # noqa: F401 - the fixture

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


@pytest.fixture
def spec(sandbox_image: str, docker_client: Any) -> Iterator[SandboxSpec]:
    instance = f"limits-{uuid.uuid4().hex[:10]}"
    yield SandboxSpec(image=sandbox_image, user="10001:10001", network_mode="none", memory_limit="192m", cpus=1.5,
                      pids_limit=64, tmp_size="16m", base_url="http://api.invalid", max_idle_seconds=5,
                      pull_policy="never", instance=instance)
    assert managed_leftovers(docker_client, instance) == {"containers": [], "volumes": []}, "the probe is removed"


@pytest.fixture
def clients() -> Iterator[list[docker.DockerClient]]:
    made: list[docker.DockerClient] = []
    yield made
    for client in made:
        client.close()


def _backend(spec: SandboxSpec, clients: list[docker.DockerClient]) -> DockerBackend:
    clients.append(docker.from_env(timeout=60))
    return DockerBackend(clients[-1], spec)


# The stdin attach stream's socket is released when it is collected, not when the sandbox is removed
# (docker-py's response keeps a reference to it): collected here, where it belongs.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_this_engine_enforces_the_limits(spec: SandboxSpec, docker_client: Any,
                                               clients: list[docker.DockerClient],
                                               caplog: pytest.LogCaptureFixture) -> None:
    cgroup = docker_client.info().get("CgroupVersion")
    engine = _backend(spec, clients)
    with caplog.at_level(logging.INFO):
        await engine.limits.check()
    assert engine.limits.probed, caplog.text
    assert engine.limits.unenforced == {}, (cgroup, engine.limits.unenforced)
    assert "limits_enforced memory=201326592 pids=64 cpus=1.5" in caplog.text
    assert "inconclusive" not in caplog.text, "runc: the probe reads its cgroup"
    assert engine.limits.readiness() == (True, "")

    sandbox = await engine.create()  # every per-sandbox check on the hot path passes
    try:
        host_config = docker_client.api.inspect_container(sandbox.container_id)["HostConfig"]
        assert (host_config["Memory"], host_config["PidsLimit"], host_config["NanoCpus"]) == (
            192 * 2**20, 64, 1_500_000_000)
        assert engine.limits.unenforced == {}
    finally:
        assert await engine.remove(sandbox)
        gc.collect()


async def test_the_probe_reads_the_numbers_the_kernel_enforces(spec: SandboxSpec,
                                                              clients: list[docker.DockerClient]) -> None:
    engine = _backend(spec, clients)
    # Expect stricter limits than the containers get: what the cgroup holds is then looser than wanted.
    engine.limits.wanted = Wanted(memory_bytes=96 * 2**20, pids=32, nano_cpus=500_000_000)
    await engine.limits.check()
    assert set(engine.limits.unenforced) == set(LIMITS) and engine.limits.refused
    evidence = engine.limits.refusal()  # the cgroup's own numbers (v1 or v2 files)
    assert "limit is 201326592," in evidence and "limit is 64," in evidence and "150000 100000" in evidence, evidence


async def test_under_gvisor_the_probe_is_inconclusive_and_refuses_nothing(
    spec: SandboxSpec, gvisor: str, clients: list[docker.DockerClient],  # noqa: F811 - the fixture
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = _backend(replace(spec, runtime=gvisor), clients)
    with caplog.at_level(logging.WARNING):
        await engine.limits.check()
    assert "limits_probe_inconclusive" in caplog.text
    assert engine.limits.probed and not engine.limits.refused
