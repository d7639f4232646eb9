"""Fixtures shared by every suite: the Docker engine, the sandbox image, leftovers checks.

The integration and e2e suites use real parts (a Docker engine, the local control plane over
HTTP, git servers on loopback). When one is missing the test *fails* with what to do: CI starts
the engine and builds the images (`.ci/run`), so a silent skip would hide a broken pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SANDBOX_IMAGE = os.environ.get("SANDBOXD_TEST_IMAGE", "sandboxd-sandbox:latest")
DAEMON_IMAGE = os.environ.get("SANDBOXD_TEST_DAEMON_IMAGE", "sandboxd:latest")
MANAGED_LABEL = "io.sandboxd.managed=true"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    import docker

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"these tests need a running Docker engine ({exc}); `.ci/run` starts one", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def sandbox_image(docker_client: object) -> str:
    import docker.errors

    try:
        docker_client.images.get(SANDBOX_IMAGE)  # type: ignore[attr-defined]
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {SANDBOX_IMAGE} is missing; build it with images/build.sh", pytrace=False)
    return SANDBOX_IMAGE


def managed_leftovers(docker_client: object, instance: str | None = None) -> dict[str, list[str]]:
    """Containers and volumes carrying sandboxd's labels (optionally of one instance)."""
    labels = [MANAGED_LABEL] + ([f"io.sandboxd.instance={instance}"] if instance else [])
    containers = docker_client.containers.list(all=True, filters={"label": labels})  # type: ignore[attr-defined]
    volumes = docker_client.volumes.list(filters={"label": labels})  # type: ignore[attr-defined]
    return {"containers": [c.name for c in containers], "volumes": [v.name for v in volumes]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
