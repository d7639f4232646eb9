"""A fake Docker engine API under the real DockerBackend: what it answers is scripted by each test.

`FakeAPI` stands in for docker-py's low-level `APIClient` (the calls DockerBackend makes): create
answers with `Warnings` and an effective HostConfig that can drop limits, the limits probe prints
scripted cgroup readings, and `wait` and `logs` follow per-call scripts (a result, a stream of
frames, or an exception: the engine going away). `ping` answers while `up`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import docker.errors
import docker.types
import requests

from sandboxd.containers import DockerBackend
from tests.unit.fakes import fake_spec

API_VERSION = "1.41"


def engine_gone(*_: object) -> Any:
    raise requests.exceptions.ChunkedEncodingError("Response ended prematurely")


@dataclass
class FakeAPI:
    warnings: list[str] = field(default_factory=list)  # the create response's Warnings
    drop: set[str] = field(default_factory=set)  # HostConfig keys the engine zeroes (Memory, PidsLimit, NanoCpus)
    refuse_nano_cpus: bool = False  # create fails as on an engine without the CFS scheduler
    probe_output: bytes = b""  # what the limits probe prints (its cgroup readings)
    up: bool = True  # ping answers
    pings: int = 0
    created: list[dict[str, Any]] = field(default_factory=list)  # every create call's config (also refused ones)
    removed: list[str] = field(default_factory=list)
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    wait_script: list[Callable[[], dict[str, Any]]] = field(default_factory=list)
    logs_script: list[Callable[[], Iterator[bytes]]] = field(default_factory=list)
    logs_calls: list[dict[str, Any]] = field(default_factory=list)
    running: bool = True  # State.Running of every container

    # --- what DockerBackend calls ---------------------------------------------------------------

    def create_host_config(self, **kwargs: Any) -> docker.types.HostConfig:
        return docker.types.HostConfig(version=API_VERSION, **kwargs)

    def create_container_config(self, image: str, command: Any = None, **kwargs: Any) -> docker.types.ContainerConfig:
        return docker.types.ContainerConfig(API_VERSION, image, command, **kwargs)

    def create_container_from_config(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        self.created.append({**config, "HostConfig": dict(config["HostConfig"]), "name": name})
        if self.refuse_nano_cpus and config["HostConfig"].get("NanoCpus"):
            raise docker.errors.APIError(
                "400 Client Error: Bad Request", explanation="NanoCPUs can not be set, as your kernel does not "
                "support CPU CFS scheduler or the cgroup is not mounted")
        container_id = f"c{len(self.created)}"
        host_config = {**config["HostConfig"], **{key: 0 for key in self.drop}}
        self.containers[container_id] = {"Id": container_id, "Name": name, "HostConfig": host_config}
        return {"Id": container_id, "Warnings": list(self.warnings)}

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        if not self.up:
            raise requests.ConnectionError("engine down")
        if container_id not in self.containers:
            raise docker.errors.NotFound(f"no such container {container_id}")
        return {**self.containers[container_id], "State": {"Running": self.running, "OOMKilled": False}}

    def start(self, container_id: str) -> None:
        pass

    def wait(self, container_id: str, timeout: float | None = None) -> dict[str, Any]:
        if self.wait_script:
            return self.wait_script.pop(0)()
        return {"StatusCode": 0}

    def logs(self, container_id: str, **kwargs: Any) -> Any:
        if not kwargs.get("stream"):
            return self.probe_output
        self.logs_calls.append(kwargs)
        return self.logs_script.pop(0)() if self.logs_script else iter(())

    def remove_container(self, container_id: str, **kwargs: Any) -> None:
        self.removed.append(container_id)
        self.containers.pop(container_id, None)

    # ping, as DockerBackend makes it (with its own timeout)
    def _url(self, path: str) -> str:
        return path

    def _get(self, url: str, **kwargs: Any) -> str:
        self.pings += 1
        if not self.up:
            raise requests.ConnectionError("engine down")
        return "OK"

    def _result(self, response: str, json: bool = False) -> str:
        return response


def backend(api: FakeAPI, **spec: Any) -> DockerBackend:
    """The real DockerBackend over `api`, with the fakes' sandbox spec (memory 1g, pids 256, 1 CPU)."""
    client = SimpleNamespace(api=api, images=SimpleNamespace(get=lambda image: SimpleNamespace(id="sha256:img")))
    return DockerBackend(client, replace(fake_spec(), **spec))
