"""Sandbox containers on a Docker engine: create hardened, hand off, wait, collect, remove.

`DockerBackend` is the only module that talks to Docker. The `docker` package is synchronous, so
every call goes through `anyio.to_thread` with a limiter; callers stay on the event loop. Each
sandbox gets its own labelled volume at /workspace (content is delivered through the engine with
`put_archive`, so the daemon needs no host path shared with the engine and no root to set
ownership), and labels that let a restarted daemon find its containers again.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, ParamSpec, TypeVar

import anyio
import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.types import Mount

from .errors import EngineError, LaunchError

log = logging.getLogger(__name__)

LABEL_MANAGED = "io.sandboxd.managed"
LABEL_INSTANCE = "io.sandboxd.instance"
LABEL_WORK_ID = "io.sandboxd.work-id"
LABEL_SESSION_ID = "io.sandboxd.session-id"
LABEL_ENVIRONMENT_ID = "io.sandboxd.environment-id"
WORKSPACE = "/workspace"

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class SandboxSpec:
    """How every sandbox container is built; derived once from the settings."""

    image: str
    user: str
    network_mode: str
    memory_limit: str
    cpus: float
    pids_limit: int
    tmp_size: str
    base_url: str
    max_idle_seconds: float
    pull_policy: str = "missing"
    runtime: str | None = None
    instance: str = "sandboxd"
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Sandbox:
    """A running sandbox: its container, its workspace volume and the open stdin stream."""

    container_id: str
    name: str
    volume: str
    work_id: str
    stdin: socket.socket | None = None


def _safe_name(value: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", value)[:100]


class DockerBackend:
    """Creates, supervises and removes sandbox containers through the Docker engine API."""

    def __init__(self, client: docker.DockerClient, spec: SandboxSpec, *, max_threads: int = 16) -> None:
        self._client = client
        self.spec = spec
        self._calls = anyio.CapacityLimiter(max_threads)
        self._waits = anyio.CapacityLimiter(1024)  # one long `wait` per running sandbox

    @classmethod
    def from_env(cls, spec: SandboxSpec) -> DockerBackend:
        """Connect with DOCKER_HOST / DOCKER_TLS_VERIFY / DOCKER_CERT_PATH, like the docker CLI."""
        try:
            return cls(docker.from_env(timeout=120), spec)
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot reach the Docker engine: {exc}") from exc

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._calls)

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self._client.ping))
        except (docker.errors.DockerException, requests.RequestException):
            return False

    def labels(self, work_id: str, session_id: str, environment_id: str) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_INSTANCE: self.spec.instance,
            LABEL_WORK_ID: work_id,
            LABEL_SESSION_ID: session_id,
            LABEL_ENVIRONMENT_ID: environment_id,
        }

    async def launch(self, work_id: str, session_id: str, environment_id: str) -> Sandbox:
        """Create the workspace volume and the hardened container, start it and open its stdin.

        Raises LaunchError with a bounded reason; whatever was created is removed first.
        """
        labels = self.labels(work_id, session_id, environment_id)
        name = _safe_name(f"sandboxd-{work_id}")
        sandbox = Sandbox(container_id="", name=name, volume=name + "-workspace", work_id=work_id)
        try:
            await self._ensure_image()
            await self._call(self._client.volumes.create, name=sandbox.volume, labels=labels)
            container = await self._call(self._create, sandbox, labels)
            sandbox.container_id = container.id or ""
            await self._call(container.start)
            sandbox.stdin = await self._call(self._attach_stdin, container)
        except BaseException as exc:
            # Also on cancellation: the container has a deterministic name, so it is found and removed
            # even when the create call was interrupted before returning its id.
            with anyio.CancelScope(shield=True):
                await self.remove(sandbox)
            if isinstance(exc, docker.errors.ImageNotFound):
                raise LaunchError("image_missing", f"sandbox image {self.spec.image!r} not found: {exc}") from exc
            if isinstance(exc, docker.errors.DockerException | requests.RequestException):
                raise LaunchError(_launch_reason(exc), f"could not start the sandbox container: {exc}") from exc
            raise
        return sandbox

    async def _ensure_image(self) -> None:
        policy, image = self.spec.pull_policy, self.spec.image
        if policy != "always":
            try:
                await self._call(self._client.images.get, image)
                return
            except docker.errors.ImageNotFound:
                if policy == "never":
                    raise LaunchError(
                        "image_missing", f"sandbox image {image!r} is not present and pull_policy is never"
                    ) from None
        try:
            await self._call(self._client.images.pull, image)
        except docker.errors.DockerException as exc:
            raise LaunchError("image_missing", f"sandbox image {image!r} could not be pulled: {exc}") from exc

    def _create(self, sandbox: Sandbox, labels: dict[str, str]) -> Container:
        spec, api = self.spec, self._client.api
        host_config = api.create_host_config(
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={spec.tmp_size},mode=1777"},
            mounts=[Mount(target=WORKSPACE, source=sandbox.volume, type="volume")],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            pids_limit=spec.pids_limit,
            mem_limit=spec.memory_limit,
            memswap_limit=spec.memory_limit,  # no swap beyond the memory limit
            nano_cpus=int(spec.cpus * 1e9),
            init=True,
            ipc_mode="private",
            network_mode=spec.network_mode,
            runtime=spec.runtime,
        )
        config = api.create_container_config(
            spec.image,
            command=["--workdir", WORKSPACE, "--max-idle", str(spec.max_idle_seconds)],
            labels=labels,
            user=spec.user,
            working_dir=WORKSPACE,
            # Only what the entrypoint needs; nothing of the daemon's environment is passed through.
            environment={"ANTHROPIC_BASE_URL": spec.base_url, **spec.extra_env},
            stdin_open=True,
            tty=False,
            host_config=host_config,
        )
        # The daemon closing its attach stream is the sandbox's end of stdin (docker-py has no flag).
        config["StdinOnce"] = True
        created = api.create_container_from_config(config, name=sandbox.name)
        return self._client.containers.get(created["Id"])

    def _attach_stdin(self, container: Container) -> socket.socket:
        stream: Any = container.attach_socket(params={"stdin": 1, "stream": 1})
        raw: socket.socket = getattr(stream, "_sock", stream)
        return raw

    async def send(self, sandbox: Sandbox, data: bytes) -> None:
        """Write control bytes to the sandbox's stdin."""
        if sandbox.stdin is None:
            raise EngineError("the sandbox's stdin is closed")
        stdin = sandbox.stdin
        await self._call(stdin.sendall, data)

    async def close_stdin(self, sandbox: Sandbox) -> None:
        if sandbox.stdin is not None:
            stdin, sandbox.stdin = sandbox.stdin, None
            await self._call(_close_socket, stdin)

    async def put_workspace(self, sandbox: Sandbox, archive: IO[bytes]) -> None:
        """Extract a tar stream into the sandbox's /workspace (ownership as in the tar headers)."""
        try:
            ok = await self._call(self._client.api.put_archive, sandbox.container_id, WORKSPACE, archive)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise EngineError(f"put_archive failed: {exc}") from exc
        if not ok:
            raise EngineError("the engine refused the workspace archive")

    async def wait(self, sandbox: Sandbox) -> int:
        """Wait for the container to exit and return its exit status (cancellable)."""
        container_id = sandbox.container_id

        def wait_exit() -> int:
            result = self._client.api.wait(container_id, timeout=None)
            return int(result.get("StatusCode", -1))

        return await anyio.to_thread.run_sync(wait_exit, limiter=self._waits, abandon_on_cancel=True)

    async def stop(self, sandbox: Sandbox, timeout_seconds: float) -> None:
        """SIGTERM the container, SIGKILL after `timeout_seconds`; already gone is fine."""
        await self._quietly(self._client.api.stop, sandbox.container_id, timeout=int(timeout_seconds))

    async def logs_tail(self, sandbox: Sandbox, lines: int) -> list[str]:
        if lines <= 0 or not sandbox.container_id:
            return []
        try:
            raw = await self._call(self._client.api.logs, sandbox.container_id, tail=lines)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            return [f"(logs unavailable: {exc})"]
        return bytes(raw).decode("utf-8", "replace").splitlines()

    async def remove(self, sandbox: Sandbox) -> None:
        """Remove the container and its workspace volume; idempotent, never raises for 'already gone'."""
        await self.close_stdin(sandbox)
        if sandbox.container_id:
            await self._quietly(self._client.api.remove_container, sandbox.container_id, force=True, v=True)
        else:
            # The create call may have been interrupted before it returned an id: find the container
            # by its labels, never by name alone (a foreign container may hold the name).
            for container_id in await self._labelled("containers", sandbox.work_id):
                await self._quietly(self._client.api.remove_container, container_id, force=True, v=True)
        for volume in await self._labelled("volumes", sandbox.work_id):
            await self._quietly(self._client.api.remove_volume, volume, force=True)

    async def _labelled(self, kind: str, work_id: str) -> list[str]:
        """Ids of this instance's containers, or names of its volumes, for one work item."""
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.spec.instance}", f"{LABEL_WORK_ID}={work_id}"]
        try:
            if kind == "containers":
                found = await self._call(self._client.api.containers, all=True, filters={"label": labels})
                return [str(c["Id"]) for c in found]
            listing = await self._call(self._client.api.volumes, filters={"label": labels})
            return [str(v["Name"]) for v in (listing or {}).get("Volumes") or []]
        except (docker.errors.DockerException, requests.RequestException) as exc:
            log.warning("docker_list_failed kind=%s error=%s", kind, exc)
            return []

    async def _quietly(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        try:
            await self._call(fn, *args, **kwargs)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                log.warning("docker_call_failed call=%s error=%s", getattr(fn, "__name__", fn), exc)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            log.warning("docker_call_failed call=%s error=%s", getattr(fn, "__name__", fn), exc)

    async def owned(self) -> list[tuple[Sandbox, str]]:
        """This instance's sandboxes left by an earlier run, with their state (running, exited...)."""
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.spec.instance}"]}
        found = await self._call(self._client.api.containers, all=True, filters=filters)
        result = []
        for info in found:
            name = info["Names"][0].lstrip("/") if info.get("Names") else info["Id"]
            labels = info.get("Labels") or {}
            sandbox = Sandbox(info["Id"], name, name + "-workspace", labels.get(LABEL_WORK_ID, ""))
            result.append((sandbox, str(info.get("State", ""))))
        return result


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def _launch_reason(exc: BaseException) -> str:
    if isinstance(exc, requests.ConnectionError) or (
        isinstance(exc, docker.errors.DockerException) and not isinstance(exc, docker.errors.APIError)
    ):
        return "engine_unavailable"
    if isinstance(exc, docker.errors.APIError) and exc.is_server_error():
        return "engine_error"
    return "create_failed"
