"""Sandbox containers on a Docker engine: create hardened, assign, follow, wait, collect, remove.

`DockerBackend` is the only module that talks to Docker. The `docker` package is synchronous, so
every call goes through `anyio.to_thread` with a limiter; callers stay on the event loop. Each
sandbox gets its own labelled volume at /workspace (content is delivered through the engine with
`put_archive`, so the daemon needs no host path shared with the engine and no root to set
ownership), and labels that let a restarted daemon find its containers again. A sandbox is
created without work (so it can wait in the warm pool); its assignment is recorded on the engine
(`AssignmentRecord`) when it is handed one, so a restarted daemon knows whose it is.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import IO, Any, ParamSpec, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import docker
import docker.errors
import requests
from anyio.streams.memory import MemoryObjectSendStream
from docker.types import LogConfig, Mount

from .disks import DiskError, LoopDisks
from .errors import EngineError, LaunchError
from .limits import (
    PROBE_SCRIPT,
    SandboxLimits,
    Wanted,
    cpu_refused,
    dropped_by_warnings,
    missing_from_host_config,
    parse_probe,
    unenforced_in_cgroup,
)
from .sandbox import (
    LABEL_CREATED,
    LABEL_IMAGE_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_ROLE,
    LABEL_SANDBOX,
    WORKSPACE,
    AssignmentRecord,
    Found,
    Sandbox,
    parse_float,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
_ENGINE_ERRORS = (docker.errors.DockerException, requests.RequestException)
SANDBOX_SOCKET_DIR = "/run/sandboxd"
LOG_LIMITS = {"max-size": "8m", "max-file": "2"}  # 16 MB of a sandbox's output at most, per sandbox
PING_TIMEOUT_SECONDS = 10.0
# While the engine is away (a dockerd restart), a broken wait or log follow asks it again after
# this much, doubling up to the most, until the session's deadline.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 60.0
# The worker runtime (images/sandbox/make-runtime.sh): the entrypoint with its own interpreter, standard
# library, packages, shared libraries and dynamic loader, so that it needs nothing of the image but
# /bin/bash for the bash tool. Run through its own loader, it does not depend on the image's libc (or on
# the image having one); children (bash, rg, git) are the image's own, with the image's libraries.
IMAGE_PROBLEM_SECONDS = 600.0
RUNTIME_DIR = "/opt/sandboxd-runtime"
RUNTIME_ENTRYPOINT = [f"{RUNTIME_DIR}/ld.so", "--library-path", f"{RUNTIME_DIR}/lib", f"{RUNTIME_DIR}/bin/python3",
                      "-I", "-S", f"{RUNTIME_DIR}/run.py"]
LABEL_RUNTIME = "io.sandboxd.runtime"  # on the runtime volume (shared by daemons, never a leftover)


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
    max_file_bytes: int | None = None
    pull_policy: str = "missing"
    runtime: str | None = None
    instance: str = "sandboxd"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    # Variables of one sandbox alone (its credential placeholders), by its name.
    env_for: Callable[[str], Mapping[str, str]] | None = None
    # Host directory -> container path, read-only.
    bind_mounts: Mapping[str, str] = field(default_factory=dict)
    # The channels' socket directory: `<channel_dir>/<sandbox name>` is mounted read-only at /run/sandboxd.
    channel_dir: str | None = None
    # Sandboxes may run while the engine does not enforce memory_limit, pids_limit or cpus (see limits).
    allow_unenforced_limits: bool = False
    # Where the worker runtime comes from (ours); other images get it mounted read-only at RUNTIME_DIR.
    runtime_image: str = "sandboxd-sandbox:latest"
    # Pull policy per image (None: pull_policy for every image).
    pull_policy_of: Callable[[str], str] | None = None


@dataclass(frozen=True)
class Runtime:
    """The worker runtime: the image it comes from, and the volume other images get it from (made on first use)."""

    image_id: str
    volume: str


class DockerBackend:
    """Creates, supervises and removes sandbox containers through the Docker engine API."""

    def __init__(self, client: docker.DockerClient, spec: SandboxSpec, *, max_threads: int = 16,
                 disks: LoopDisks | None = None) -> None:
        self._client = client
        self.spec = spec
        self.disks = disks  # a filesystem per workspace (None: the disk watch polls sizes instead)
        self._calls = anyio.CapacityLimiter(max_threads)
        self._waits = anyio.CapacityLimiter(2048)  # a long `wait` and a log follower per sandbox
        self.limits = SandboxLimits(Wanted.of(spec.memory_limit, spec.pids_limit, spec.cpus),
                                    spec.allow_unenforced_limits)
        self._omit_nano_cpus = False  # the engine refuses NanoCpus and that is allowed: create without
        self._runtime: Runtime | None = None
        self._runtime_volume_ready = False
        self._runtime_lock = anyio.Lock()
        # Images that could not be resolved lately (reference -> (reason, monotonic time)): the log and
        # /readyz name them; a session image's entry is forgotten after IMAGE_PROBLEM_SECONDS.
        self.image_problems: dict[str, tuple[str, float]] = {}
        self.limits.check = self._probe_limits

    @classmethod
    def from_env(cls, spec: SandboxSpec, disks: LoopDisks | None = None) -> DockerBackend:
        """Connect with DOCKER_HOST / DOCKER_TLS_VERIFY / DOCKER_CERT_PATH, like the docker CLI."""
        try:
            return cls(docker.from_env(timeout=120), spec, disks=disks)
        except docker.errors.DockerException as exc:
            raise EngineError(f"cannot reach the Docker engine: {exc}") from exc

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._calls)

    async def ping(self) -> bool:
        """Whether the engine answers now (within PING_TIMEOUT_SECONDS, not the client's long timeout)."""
        api = self._client.api
        try:
            return await self._call(lambda: api._result(api._get(api._url("/_ping"), timeout=PING_TIMEOUT_SECONDS))
                                    == "OK")
        except _ENGINE_ERRORS:
            return False

    def _labels(self, sandbox: str, **extra: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.spec.instance, LABEL_SANDBOX: sandbox, **extra}

    async def image_id(self, image: str | None = None) -> str:
        """What an image (default: the `image` setting) resolves to now, pulled per its pull policy;
        LaunchError image_missing if it is absent or cannot be pulled (remembered in image_problems)."""
        image = image or self.spec.image
        policy = self.spec.pull_policy_of(image) if self.spec.pull_policy_of else self.spec.pull_policy
        try:
            found = await self._resolve(image, policy)
        except LaunchError as exc:
            if exc.reason == "image_missing":
                if image not in self.image_problems:
                    log.warning("image_unavailable image=%r error=%s", image, exc)
                self.image_problems[image] = (str(exc), time.monotonic())
            raise
        self.image_problems.pop(image, None)
        return found

    def image_readiness(self) -> tuple[bool, str]:
        """(/readyz may answer 200, what it says about images): the default or the runtime image missing
        means no session can start; another image missing fails only the sessions that name it."""
        now = time.monotonic()
        for essential in (self.spec.image, self.spec.runtime_image):
            if essential in self.image_problems:
                return False, self.image_problems[essential][0]
        problems = [name for name, (_, at) in self.image_problems.items() if now - at < IMAGE_PROBLEM_SECONDS]
        if problems:
            return True, "; ".join(f"image {name!r} unavailable" for name in sorted(problems)[:3])
        return True, ""

    async def _resolve(self, image: str, policy: str) -> str:
        if policy != "always":
            try:
                return str((await self._call(self._client.images.get, image)).id)
            except docker.errors.ImageNotFound:
                if policy == "never":
                    raise LaunchError(
                        "image_missing", f"sandbox image {image!r} is not present and its pull policy is never"
                    ) from None
            except _ENGINE_ERRORS as exc:
                raise LaunchError(_launch_reason(exc), f"could not inspect the sandbox image {image!r}: {exc}") from exc
        try:
            return str((await self._call(self._client.images.pull, image)).id)
        except docker.errors.DockerException as exc:
            raise LaunchError("image_missing", f"sandbox image {image!r} could not be pulled: {exc}") from exc

    async def runtime(self, *, volume: bool = False) -> Runtime:
        """The worker runtime, resolved once per daemon (and its volume made and checked, when asked for).

        The volume `sandboxd-runtime-<image id>` is filled by the engine itself: a container of the
        runtime image is created with the empty volume at RUNTIME_DIR, which copies the image's
        directory in; its loader and entry script are then checked through that container. Daemons on
        one engine share it; a version's volume never changes.
        """
        async with self._runtime_lock:
            if self._runtime is None:
                try:
                    image_id = await self.image_id(self.spec.runtime_image)
                except LaunchError as exc:
                    raise LaunchError("runtime_unavailable", f"the worker runtime image: {exc}") from exc
                self._runtime = Runtime(image_id, f"sandboxd-runtime-{image_id.rpartition(':')[2][:16]}")
            if volume and not self._runtime_volume_ready:
                try:
                    await self._call(self._fill_runtime_volume, self._runtime)
                except (*_ENGINE_ERRORS, RuntimeError) as exc:
                    raise LaunchError("runtime_unavailable", f"the worker runtime volume: {exc}") from exc
                self._runtime_volume_ready = True
            return self._runtime

    def _fill_runtime_volume(self, runtime: Runtime) -> None:
        api = self._client.api
        for attempt in (1, 2):
            try:
                self._client.volumes.get(runtime.volume)
            except docker.errors.NotFound:
                self._client.volumes.create(name=runtime.volume, labels={LABEL_RUNTIME: runtime.image_id})
                log.info("runtime_volume_created volume=%s image=%s", runtime.volume, self.spec.runtime_image)
            seed = api.create_container(runtime.image_id, command=["true"], network_disabled=True,
                                        host_config=api.create_host_config(network_mode="none", mounts=[
                                            Mount(target=RUNTIME_DIR, source=runtime.volume, type="volume")]),
                                        labels={LABEL_RUNTIME: runtime.image_id})
            try:
                missing = [path for path in ("ld.so", "run.py", ".complete") if not self._exists(seed["Id"], path)]
            finally:
                api.remove_container(seed["Id"], force=True)
            if not missing:
                return
            log.warning("runtime_volume_incomplete volume=%s missing=%s attempt=%d", runtime.volume, missing, attempt)
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                self._client.volumes.get(runtime.volume).remove(force=True)
        raise RuntimeError(f"{self.spec.runtime_image!r} holds no worker runtime at {RUNTIME_DIR} "
                           "(an image of this sandboxd version, images/sandbox/Dockerfile, has it)")

    def _exists(self, container_id: str, path: str) -> bool:
        try:
            stream, _ = self._client.api.get_archive(container_id, f"{RUNTIME_DIR}/{path}")
        except docker.errors.NotFound:
            return False
        for _ in stream:  # small files: read to the end, so the engine is done with the container
            pass
        return True

    @staticmethod
    def new_sandbox() -> Sandbox:
        """A name for a sandbox about to be created (its channels are opened under that name first)."""
        return Sandbox(container_id="", name=f"sandboxd-{uuid.uuid4().hex[:16]}", created_at=time.time())

    async def create(self, sandbox: Sandbox | None = None, *, image_id: str | None = None,
                     image: str | None = None) -> Sandbox:
        """Create the workspace volume and the hardened container, start it and open its stdin.

        What the image (default: the `image` setting) resolves to is looked up while the volume is
        created (neither needs the other). The sandbox holds no work and no secret until `assign`.
        Raises LaunchError with a bounded reason; whatever was created is removed first (also on
        cancellation).
        """
        sandbox = sandbox or self.new_sandbox()
        try:
            async with anyio.create_task_group() as tg:
                if image_id is None:
                    tg.start_soon(self._resolve_image, sandbox, image)
                else:
                    sandbox.image_id = image_id
                await self._create_volume(sandbox)
            runtime = await self.runtime()
            foreign = sandbox.image_id != runtime.image_id
            if foreign:
                await self.runtime(volume=True)
                if self.disks is None:  # /workspace owned by the sandbox user, whatever the image has there
                    await self._call(self._seed_workspace, sandbox, runtime)
            sandbox.container_id = await self._call(self._create, sandbox, foreign)
            await self._call(self._client.api.start, sandbox.container_id)
            sandbox.stdin = await self._call(self._attach_stdin, sandbox.container_id)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.remove(sandbox)
            error = self._launch_error(exc)
            if error is None or error is exc:
                raise
            raise error from exc
        return sandbox

    async def _create_volume(self, sandbox: Sandbox) -> None:
        """The workspace: a filesystem of its own when the host allows it (see disks), else a volume.

        The filesystem is bind-mounted, not wrapped in a volume with driver options: Docker 20.10
        cannot remove such a volume after a live-restore restart (moby#44422).
        """
        if self.disks is not None:
            try:
                await self._call(self.disks.make, sandbox.name)
            except DiskError as exc:
                raise LaunchError("workspace_disk", str(exc)) from exc
            return
        await self._call(self._client.volumes.create, name=sandbox.volume,
                         labels=self._labels(sandbox.name, **{LABEL_ROLE: "workspace"}))

    async def _resolve_image(self, sandbox: Sandbox, image: str | None) -> None:
        sandbox.image_id = await self.image_id(image)

    def _seed_workspace(self, sandbox: Sandbox, runtime: Runtime) -> None:
        """Give the new workspace volume the runtime image's /workspace (empty, the sandbox user's, 0750):
        the engine copies it in when a container of that image is created with the empty volume there."""
        api = self._client.api
        seed = api.create_container(runtime.image_id, command=["true"], network_disabled=True,
                                    labels=self._labels(sandbox.name, **{LABEL_ROLE: "workspace-seed"}),
                                    host_config=api.create_host_config(network_mode="none", mounts=[
                                        Mount(target=WORKSPACE, source=sandbox.volume, type="volume")]))
        api.remove_container(seed["Id"], force=True)

    def _launch_error(self, exc: BaseException) -> LaunchError | None:
        """The bounded error a failed creation reports; None: not the engine's doing (re-raised)."""
        cause = _first_cause(exc)
        if isinstance(cause, LaunchError):
            return cause
        if isinstance(cause, docker.errors.ImageNotFound):
            return LaunchError("image_missing", f"sandbox image {self.spec.image!r} not found: {cause}")
        if isinstance(cause, _ENGINE_ERRORS):
            return LaunchError(_launch_reason(cause), f"could not start the sandbox container: {cause}")
        return None

    def _host_config(self, mounts: list[Mount]) -> dict[str, Any]:
        """The walls and limits of every sandbox (and of the limits probe, which has no mounts)."""
        spec = self.spec
        host_config: dict[str, Any] = self._client.api.create_host_config(
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={spec.tmp_size},mode=1777"},
            mounts=mounts,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            pids_limit=spec.pids_limit,
            mem_limit=spec.memory_limit,
            memswap_limit=spec.memory_limit,  # no swap beyond the memory limit
            nano_cpus=None if self._omit_nano_cpus else int(spec.cpus * 1e9),
            init=True,
            ipc_mode="private",
            network_mode=spec.network_mode,
            runtime=spec.runtime,
            # Whatever a tool writes to PID 1's stdout or stderr lands here: bounded on the engine's disk.
            log_config=LogConfig(type="json-file", config=LOG_LIMITS),
        )
        return host_config

    def _create(self, sandbox: Sandbox, foreign: bool = False) -> str:
        """Create the container; `foreign`: its image is not the runtime's, which is mounted in read-only."""
        spec, api = self.spec, self._client.api
        if self.limits.refused:  # the claim gate holds new work; this stops the pool and a late cold start
            raise LaunchError("limits_not_enforced", self.limits.refusal())
        mounts = [Mount(target=WORKSPACE, source=str(self.disks.mountpoint(sandbox.name)), type="bind")
                  if self.disks is not None else
                  Mount(target=WORKSPACE, source=sandbox.volume, type="volume", no_copy=foreign)]
        if foreign:
            assert self._runtime is not None
            mounts.append(Mount(target=RUNTIME_DIR, source=self._runtime.volume, type="volume", read_only=True,
                                no_copy=True))
        mounts += [Mount(target=target, source=source, type="bind", read_only=True)
                   for source, target in spec.bind_mounts.items()]
        if spec.channel_dir is not None:
            mounts.append(Mount(target=SANDBOX_SOCKET_DIR, source=f"{spec.channel_dir}/{sandbox.name}",
                                type="bind", read_only=True))
        labels = self._labels(sandbox.name, **{LABEL_IMAGE_ID: sandbox.image_id,
                                               LABEL_CREATED: f"{sandbox.created_at:.3f}"})
        config = api.create_container_config(
            sandbox.image_id or spec.image,
            # The image's own ENTRYPOINT and CMD never run: the runtime is the entrypoint in every image.
            entrypoint=RUNTIME_ENTRYPOINT,
            command=["--workdir", WORKSPACE, "--max-idle", str(spec.max_idle_seconds),
                     *(["--max-file-bytes", str(spec.max_file_bytes)] if spec.max_file_bytes else [])],
            labels=labels,
            user=spec.user,
            working_dir=WORKSPACE,
            # Only what the entrypoint needs; nothing of the daemon's environment is passed through. The
            # image's own ENV stays (its PATH finds its tools); HOME is the writable /tmp in every image.
            environment={"ANTHROPIC_BASE_URL": spec.base_url, "HOME": "/tmp", **spec.extra_env,
                         **(spec.env_for(sandbox.name) if spec.env_for is not None else {})},
            stdin_open=True,
            tty=False,
            # An image's own HEALTHCHECK and STOPSIGNAL are its business, not a sandbox's: the runtime
            # stops on SIGTERM (forwarded by the engine's init), and nothing else runs in it.
            healthcheck={"test": ["NONE"]},
            stop_signal="SIGTERM",
            host_config=self._host_config(mounts),
        )
        # The daemon closing its attach stream is the sandbox's end of stdin (docker-py has no flag).
        config["StdinOnce"] = True
        container_id, found = self._create_limited(config, sandbox.name)
        self.limits.record_created(found)
        if found and not self.limits.allow_unenforced:  # create() removes the container
            raise LaunchError("limits_not_enforced", self.limits.refusal())
        if self.limits.unenforced:
            log.warning("sandbox_limits_unenforced container=%s limits=%s (allowed by allow_unenforced_limits)",
                        sandbox.name, self.limits.names())
        return container_id

    def _create_limited(self, config: dict[str, Any], name: str) -> tuple[str, dict[str, str]]:
        """Create the container: (its id, the limits the engine did not keep, warned about in the create
        response or missing from its effective configuration). An engine that refuses NanoCpus (no CFS
        scheduler, no cgroup) is asked again without them when unenforced limits are allowed; else
        nothing is created (id "")."""
        api, found = self._client.api, {}
        try:
            created = api.create_container_from_config(config, name=name)
        except docker.errors.APIError as exc:
            if not cpu_refused(str(exc.explanation or exc)):
                raise
            found["cpu"] = f"the engine refused the CPU limit: {exc.explanation or exc}"
            if not self.limits.allow_unenforced:
                return "", found
            self._omit_nano_cpus = True
            config["HostConfig"].pop("NanoCpus", None)
            created = api.create_container_from_config(config, name=name)
        container_id = str(created["Id"])
        found.update(dropped_by_warnings(created.get("Warnings")))
        host_config = api.inspect_container(container_id).get("HostConfig") or {}
        for limit, why in missing_from_host_config(host_config, self.limits.wanted).items():
            found.setdefault(limit, why)
        return container_id, found

    async def _probe_limits(self) -> None:
        """Run one sandbox-like container that reads its own cgroup; record what is not enforced.

        Inconclusive (no image, the engine failing, no cgroup visible as under gVisor): what the
        engine itself said stands, and each sandbox's creation is still checked.
        """
        try:
            # The runtime image, not the sandbox image: the probe needs /bin/sh, which an image may lack.
            image = (await self.runtime()).image_id
            found, output = await self._call(self._run_probe, image)
        except (LaunchError, *_ENGINE_ERRORS) as exc:
            log.warning("limits_probe_failed error=%s; each sandbox's limits are still checked at its creation", exc)
            self.limits.probed = True  # not again before every claim
            return
        in_cgroup = None if output is None else unenforced_in_cgroup(parse_probe(output), self.limits.wanted)
        if output is not None and in_cgroup is None:
            log.warning("limits_probe_inconclusive: the probe sees no cgroup (gVisor?); the engine's word stands")
        self.limits.record_probe({**found, **(in_cgroup or {})})  # the kernel's word over the engine's

    def _run_probe(self, image: str) -> tuple[dict[str, str], str | None]:
        """(what the engine did not keep, the probe's output; None when it could not be created)."""
        api = self._client.api
        name = f"sandboxd-probe-{uuid.uuid4().hex[:12]}"
        config = api.create_container_config(
            image, entrypoint=["/bin/sh", "-c", PROBE_SCRIPT], command=[], user=self.spec.user,
            labels=self._labels(name, **{LABEL_ROLE: "limits-probe"}), host_config=self._host_config([]),
        )
        container_id = ""
        try:
            container_id, found = self._create_limited(config, name)
            if not container_id:
                return found, None
            api.start(container_id)
            api.wait(container_id, timeout=PROBE_TIMEOUT_SECONDS)
            output = bytes(api.logs(container_id, stdout=True, stderr=False)).decode("utf-8", "replace")
        finally:
            with contextlib.suppress(*_ENGINE_ERRORS):
                api.remove_container(container_id or name, force=True, v=True)
        return found, output

    def _attach_stdin(self, container_id: str) -> socket.socket:
        stream: Any = self._client.api.attach_socket(container_id, params={"stdin": 1, "stream": 1})
        raw: socket.socket = getattr(stream, "_sock", stream)
        return raw

    async def assign(self, sandbox: Sandbox, record: AssignmentRecord, line: bytes) -> None:
        """Record the assignment on the engine, then write it to the sandbox's stdin.

        Recording first: a daemon that dies between the two leaves a record whose sandbox exits
        for want of an assignment, and the next daemon stops the item.
        """
        try:
            await self._call(self._client.volumes.create, name=sandbox.record_volume,
                             labels=self._labels(sandbox.name, **{LABEL_ROLE: "assignment"}, **record.labels()))
        except _ENGINE_ERRORS as exc:
            raise EngineError(f"could not record the assignment: {exc}") from exc
        sandbox.record = record
        await self.send(sandbox, line)

    async def send(self, sandbox: Sandbox, data: bytes) -> None:
        """Write control bytes to the sandbox's stdin."""
        if sandbox.stdin is None:
            raise EngineError("the sandbox's stdin is closed")
        stdin = sandbox.stdin
        try:
            await self._call(stdin.sendall, data)
        except OSError as exc:
            raise EngineError(f"could not write to the sandbox's stdin: {exc}") from exc

    async def close_stdin(self, sandbox: Sandbox) -> None:
        if sandbox.stdin is not None:
            stdin, sandbox.stdin = sandbox.stdin, None
            await self._call(_close_socket, stdin)

    async def put_workspace(self, sandbox: Sandbox, archive: IO[bytes] | bytes) -> None:
        """Extract a tar stream into the sandbox's /workspace (ownership as in the tar headers)."""
        try:
            ok = await self._call(self._client.api.put_archive, sandbox.container_id, WORKSPACE, archive)
        except _ENGINE_ERRORS as exc:
            raise EngineError(f"put_archive failed: {exc}") from exc
        if not ok:
            raise EngineError("the engine refused the workspace archive")

    def workspace_stream(self, sandbox: Sandbox) -> Iterator[bytes]:
        """The tar stream of a (stopped) sandbox's /workspace; blocking, for a worker thread."""
        stream, _ = self._client.api.get_archive(sandbox.container_id, WORKSPACE, chunk_size=1 << 20)
        return iter(stream)

    async def wait(self, sandbox: Sandbox) -> tuple[int, bool]:
        """Wait for the container to exit: (exit status, OOM-killed). Cancellable.

        The wait outlives an engine restart (with live-restore the container runs on): broken off
        because the engine went away, it is taken up again once the engine answers (asked with
        backoff until the session's deadline), and goes on, or gets the exit status the container
        reached meanwhile; a container the engine no longer has raises NotFound. A sandbox without
        an assignment (a pool member) is not waited for: its stdin went with the engine, so it can
        never be assigned (EngineError).
        """
        container_id = sandbox.container_id

        def wait_exit() -> int:
            result = self._client.api.wait(container_id, timeout=None)
            return int(result.get("StatusCode", -1))

        outages = 0
        while True:
            try:
                status = await anyio.to_thread.run_sync(wait_exit, limiter=self._waits, abandon_on_cancel=True)
                break
            except _ENGINE_ERRORS as exc:
                if not _engine_away(exc):
                    raise
                if sandbox.record is None:
                    raise EngineError(f"the engine went away before the sandbox was assigned: {exc}") from exc
                log.warning("engine_away container=%s error=%s; waiting for it until the session's deadline",
                            sandbox.name, exc)
                if not await self._engine_back(sandbox, outages):
                    raise EngineError(f"the engine did not answer again before the session's deadline: {exc}") from exc
                outages += 1
                log.info("engine_back container=%s; waiting for the sandbox again", sandbox.name)
        try:
            info = await self._call(self._client.api.inspect_container, container_id)
            oom = bool(info.get("State", {}).get("OOMKilled"))
        except _ENGINE_ERRORS:
            oom = False
        return status, oom

    async def events(self, sandbox: Sandbox) -> AsyncIterator[bytes]:
        """The sandbox's stdout from its start, in chunks as the engine sends them, following until it exits.

        Chunks, not lines: splitting is the reader's job (`protocol.LineSplitter`), within bounds.
        The follow outlives an engine restart, like `wait`: a stream that breaks, or ends while the
        container still runs, is opened again once the engine answers, from the second of the last
        chunk read (`since`; chunks come with their timestamps), and what was read already is
        skipped by its timestamp. Nothing is read twice or lost, also across a log rotation.
        """
        send, receive = anyio.create_memory_object_stream[bytes](64)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow_logs, sandbox, send)
            with receive:
                async for chunk in receive:
                    yield chunk
            tg.cancel_scope.cancel()

    async def _follow_logs(self, sandbox: Sandbox, send: MemoryObjectSendStream[bytes]) -> None:
        position, outages = LogPosition(), 0
        with send:
            while True:
                try:
                    read = partial(self._read_logs, sandbox.container_id, position, send)
                    if await anyio.to_thread.run_sync(read, limiter=self._waits, abandon_on_cancel=True):
                        return  # nobody listens any more
                    if not await self._running(sandbox):
                        return  # it exited: its stdout was read to the end
                    await anyio.sleep(RECONNECT_FIRST_SECONDS)  # the engine ended the stream: it is going away
                except _ENGINE_ERRORS as exc:
                    if not _engine_away(exc) or sandbox.record is None or not await self._engine_back(sandbox,
                                                                                                      outages):
                        return
                    outages += 1

    def _read_logs(self, container_id: str, position: LogPosition, send: MemoryObjectSendStream[bytes]) -> bool:
        """Follow the container's stdout from `position` into `send` (in a worker thread); True when
        nobody listens any more. Engine errors are raised."""
        try:
            for frame in self._client.api.logs(container_id, stdout=True, stderr=False, stream=True, follow=True,
                                               timestamps=True, since=position.since()):
                chunk = position.after(frame)
                if chunk is not None:
                    anyio.from_thread.run(send.send, chunk)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError):
            return True
        return False

    async def _running(self, sandbox: Sandbox) -> bool:
        """Whether the container runs now (False: exited or gone); engine errors are raised."""
        try:
            info = await self._call(self._client.api.inspect_container, sandbox.container_id)
        except docker.errors.NotFound:
            return False
        return bool((info.get("State") or {}).get("Running"))

    async def _engine_back(self, sandbox: Sandbox, outages: int) -> bool:
        """Ask the engine with backoff until it answers (True) or the session's deadline comes (False).

        `outages`: how many times this call site found the engine away already (a longer first wait).
        """
        if sandbox.record is None:
            return False
        delay = min(RECONNECT_MAX_SECONDS, RECONNECT_FIRST_SECONDS * 2 ** outages)
        while time.time() + delay < sandbox.record.deadline:
            await anyio.sleep(delay)
            if await self.ping():
                return True
            delay = min(RECONNECT_MAX_SECONDS, delay * 2)
        return False

    async def stop(self, sandbox: Sandbox, timeout_seconds: float) -> None:
        """SIGTERM the container, SIGKILL after `timeout_seconds`; already gone is fine."""
        await self._quietly(self._client.api.stop, sandbox.container_id, timeout=int(timeout_seconds))

    async def logs_tail(self, sandbox: Sandbox, lines: int) -> list[str]:
        if lines <= 0 or not sandbox.container_id:
            return []
        try:
            raw = await self._call(self._client.api.logs, sandbox.container_id, tail=lines, stdout=False,
                                   stderr=True)
        except _ENGINE_ERRORS as exc:
            return [f"(logs unavailable: {exc})"]
        return bytes(raw).decode("utf-8", "replace").splitlines()

    async def remove(self, sandbox: Sandbox) -> bool:
        """Remove the container, its workspace and its record; idempotent ('already gone' is done).

        False when the engine could not be asked (it is down): the caller tries again later.
        """
        await self.close_stdin(sandbox)
        # By label, never by name alone (a foreign container may hold the name), and also when the
        # create call was interrupted before it returned an id.
        try:
            ids = {sandbox.container_id} - {""} | set(await self._labelled("containers", sandbox.name, strict=True))
            done = [await self._quietly(self._client.api.remove_container, c, force=True, v=True) for c in ids]
            volumes = await self._labelled("volumes", sandbox.name, strict=True)
        except _ENGINE_ERRORS:
            return False
        done += [await self._quietly(self._client.api.remove_volume, volume, force=True) for volume in volumes]
        if self.disks is not None and all(done):  # the container is gone: nothing holds the filesystem
            await self._call(self.disks.destroy, sandbox.name)
        return all(done)

    async def _labelled(self, kind: str, sandbox: str, *, strict: bool = False) -> list[str]:
        """Ids of this instance's containers, or names of its volumes, of one sandbox (strict: raise)."""
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.spec.instance}", f"{LABEL_SANDBOX}={sandbox}"]
        try:
            if kind == "containers":
                found = await self._call(self._client.api.containers, all=True, filters={"label": labels})
                return [str(c["Id"]) for c in found]
            listing = await self._call(self._client.api.volumes, filters={"label": labels})
            return [str(v["Name"]) for v in (listing or {}).get("Volumes") or []]
        except _ENGINE_ERRORS as exc:
            log.warning("docker_list_failed kind=%s error=%s", kind, exc)
            if strict:
                raise
            return []

    async def _quietly(self, fn: Callable[..., object], *args: object, **kwargs: object) -> bool:
        """Call the engine; True when done or nothing to do (404, 409), False when it failed."""
        try:
            await self._call(fn, *args, **kwargs)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                log.warning("docker_call_failed call=%s error=%s", getattr(fn, "__name__", fn), exc)
                return False
        except _ENGINE_ERRORS as exc:
            log.warning("docker_call_failed call=%s error=%s", getattr(fn, "__name__", fn), exc)
            return False
        return True

    async def owned(self) -> list[Found]:
        """This instance's sandboxes on the engine (left by an earlier run), with their records."""
        mine = [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.spec.instance}"]
        containers = await self._call(self._client.api.containers, all=True, filters={"label": mine})
        listing = await self._call(self._client.api.volumes, filters={"label": [*mine, f"{LABEL_ROLE}=assignment"]})
        records = {}
        for volume in (listing or {}).get("Volumes") or []:
            labels = volume.get("Labels") or {}
            record = AssignmentRecord.from_labels(labels)
            if record is not None:
                records[labels.get(LABEL_SANDBOX, "")] = record
        found: list[Found] = []
        names = set()
        for info in containers:
            labels = info.get("Labels") or {}
            name = labels.get(LABEL_SANDBOX) or info["Names"][0].lstrip("/")
            names.add(name)
            sandbox = Sandbox(info["Id"], name, labels.get(LABEL_IMAGE_ID, ""),
                              parse_float(labels.get(LABEL_CREATED)), record=records.get(name))
            running = info.get("State") == "running"
            status, oom = (-1, False) if running else await self._exit_of(info["Id"])
            found.append(Found(sandbox, running, status, oom))
        # Volumes whose container is gone (a crash between the two creates): remove them too.
        for name in await self._volume_owners() - names:
            found.append(Found(Sandbox("", name, record=records.get(name)), False, -1, False))
        if self.disks is not None:  # workspace filesystems of sandboxes that are gone altogether
            for name in self.disks.leftovers({f.sandbox.name for f in found}):
                await self._call(self.disks.destroy, name)
        return found

    async def _exit_of(self, container_id: str) -> tuple[int, bool]:
        try:
            state = (await self._call(self._client.api.inspect_container, container_id)).get("State", {})
        except _ENGINE_ERRORS:
            return -1, False
        return int(state.get("ExitCode", -1)), bool(state.get("OOMKilled"))

    async def _volume_owners(self) -> set[str]:
        mine = [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.spec.instance}"]
        listing = await self._call(self._client.api.volumes, filters={"label": mine})
        return {(v.get("Labels") or {}).get(LABEL_SANDBOX, "") for v in (listing or {}).get("Volumes") or []} - {""}

    async def workspace_bytes(self) -> dict[str, int] | None:
        """Bytes used by each of this instance's workspace volumes, as the engine measures them; None
        when the engine could not say (down, or slower than the client's timeout)."""
        try:
            usage = await self._call(self._client.api._result,
                                     self._client.api._get(self._client.api._url("/system/df"),
                                                           params={"type": "volume"}), True)
        except _ENGINE_ERRORS as exc:
            log.warning("disk_usage_unavailable error=%s", exc)
            return None
        sizes = {}
        for volume in usage.get("Volumes") or []:
            labels = volume.get("Labels") or {}
            if labels.get(LABEL_INSTANCE) == self.spec.instance and labels.get(LABEL_ROLE) == "workspace":
                sizes[labels.get(LABEL_SANDBOX, "")] = int((volume.get("UsageData") or {}).get("Size", -1))
        return sizes


@dataclass
class LogPosition:
    """How far the daemon read a sandbox's stdout: the engine's timestamp of the last chunk passed on.

    Stamps are RFC 3339 with nanoseconds in a fixed width (`2026-12-01T21:38:00.123456789Z`), so
    comparing the bytes compares the times.
    """

    last: bytes = b""
    skipping: bool = False  # reopened: skip what is not newer than `last`

    def since(self) -> int | None:
        """The logs call's `since`: None from the start, else the second of the last chunk read."""
        if not self.last:
            return None
        self.skipping = True
        try:
            return max(1, int(datetime.fromisoformat(self.last.decode()).timestamp()))
        except ValueError:
            return None  # from the start: the skip still holds

    def after(self, frame: bytes) -> bytes | None:
        """The chunk of a timestamped frame, or None when it was read before."""
        stamp, sep, chunk = frame.partition(b" ")
        if not sep:
            return frame
        if self.skipping:
            if stamp <= self.last:
                return None
            self.skipping = False
        self.last = stamp
        return chunk


def _engine_away(exc: BaseException) -> bool:
    """The engine stopped answering (a restart, a dropped connection), as opposed to refusing a call
    about one container (NotFound, a bad request)."""
    if isinstance(exc, docker.errors.APIError):
        return bool(exc.is_server_error())
    return isinstance(exc, _ENGINE_ERRORS)


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def _first_cause(exc: BaseException) -> BaseException:
    """What to report of a task group's failure (the image lookup, the volume, or both): a
    LaunchError first, then an engine error; the group itself when it holds neither."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    for kind in (LaunchError, *_ENGINE_ERRORS):
        found: BaseException | None = exc.subgroup(kind)
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        if found is not None:
            return found
    return exc


def _launch_reason(exc: BaseException) -> str:
    if isinstance(exc, requests.ConnectionError) or (
        isinstance(exc, docker.errors.DockerException) and not isinstance(exc, docker.errors.APIError)
    ):
        return "engine_unavailable"
    if isinstance(exc, docker.errors.APIError) and exc.is_server_error():
        return "engine_error"
    return "create_failed"


__all__ = ["AssignmentRecord", "DockerBackend", "Found", "Sandbox", "SandboxSpec"]
