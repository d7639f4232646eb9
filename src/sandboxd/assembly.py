"""The composition root: the daemon's parts built from the Settings, in one place.

The CLI (`sandboxd run`, `drain`) and the demo call `run_daemon`; tests pass their own backend.
Narrow views of the settings are made here and nowhere else, so nothing below reads settings
it does not need (and nothing imports back into the CLI).
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import AsyncExitStack

import anyio

from .containers import DockerBackend, SandboxSpec
from .daemon import Daemon, Summary
from .disks import LoopDisks
from .errors import ConfigError, EngineError
from .exporter import collecting
from .health import HealthState, serving
from .images import ImagePolicy
from .lifecycle import Lifecycle, LifecycleLimits
from .metrics import Metrics
from .network.channels import Channels
from .notify import Notifier
from .pool import WarmPool
from .queue import WorkQueue
from .retention import WorkspaceRetention
from .session import SessionLimits, SessionSupervisor
from .settings import Settings
from .workspace import WorkspaceConfig, Workspaces
from .workspace.store import WorkspaceStore

log = logging.getLogger(__name__)


def instance_name(settings: Settings) -> str:
    """The containers' instance label: what a restarted daemon recognises as its own."""
    return settings.worker_id or f"{socket.gethostname()}-{settings.environment_id}"


def channels(settings: Settings) -> Channels | None:
    return Channels.build(
        network_mode=settings.network_mode,
        socket_dir=settings.socket_dir or settings.state_dir / "run",
        base_url=settings.base_url,
        allowed_hosts=settings.egress_allowed_hosts,
        audit=settings.egress_audit,
        grants_dir=settings.state_dir / "grants",
        credentials=[credential.rule() for credential in settings.egress_credentials],
        egress_dir=settings.state_dir / "egress",
        ca_files=(settings.egress_ca_cert_file, settings.egress_ca_key_file)
        if settings.egress_ca_cert_file is not None and settings.egress_ca_key_file is not None else None,
        upstream_ca_file=settings.egress_upstream_ca_file,
    )


def sandbox_spec(settings: Settings, ways_out: Channels | None = None) -> SandboxSpec:
    return SandboxSpec(
        image=settings.image,
        user=settings.sandbox_user,
        network_mode=settings.network_mode,
        memory_limit=settings.memory_limit,
        cpus=settings.cpus,
        pids_limit=settings.pids_limit,
        tmp_size=settings.tmp_size,
        base_url=settings.effective_sandbox_base_url,
        max_idle_seconds=settings.max_idle_seconds,
        max_file_bytes=settings.max_file_bytes,
        pull_policy=settings.pull_policy,
        runtime=settings.runtime,
        instance=instance_name(settings),
        extra_env=ways_out.sandbox_env() if ways_out else {},
        env_for=ways_out.sandbox_env_for if ways_out and ways_out.injection else None,
        channel_dir=str(ways_out.socket_dir) if ways_out else None,
        allow_unenforced_limits=settings.allow_unenforced_limits,
        runtime_image=settings.runtime_image,
        pull_policy_of=image_policy(settings).pull_policy,
    )


def image_policy(settings: Settings) -> ImagePolicy:
    return ImagePolicy.of(settings.image, settings.allowed_images, settings.image_pull_policies, settings.pull_policy)


def workspace_disks(settings: Settings) -> LoopDisks | None:
    """A filesystem per workspace where this host allows it (see sandboxd.disks), else None: the poll."""
    if settings.workspace_quota == "poll":
        return None
    why = LoopDisks.unavailable(os.environ.get("DOCKER_HOST"))
    if why:
        if settings.workspace_quota == "filesystem":
            raise ConfigError(f"`workspace_quota = filesystem` is not possible here: {why}")
        log.warning("workspace_quota mode=poll reason=%r (writes are bounded by a poll of sizes)", why)
        return None
    uid, gid = (int(n) for n in settings.sandbox_user.split(":"))
    log.info("workspace_quota mode=filesystem max_bytes=%d max_inodes=%d", settings.workspace_max_bytes,
             settings.workspace_max_inodes)
    return LoopDisks(settings.state_dir / "disks", settings.workspace_max_bytes, settings.workspace_max_inodes,
                     uid, gid)


def lifecycle_limits(settings: Settings) -> LifecycleLimits:
    return LifecycleLimits(
        stop_timeout_seconds=settings.stop_timeout_seconds,
        container_log_lines=settings.container_log_lines,
        workspace_max_bytes=settings.workspace_max_bytes,
        disk_check_interval_seconds=settings.disk_check_interval_seconds,
        stall_tool_seconds=settings.stall_tool_seconds,
        stall_silence_seconds=settings.stall_silence_seconds,
    )


def workspace_store(settings: Settings) -> WorkspaceStore | None:
    if settings.workspace_retention_seconds <= 0:
        return None
    uid, gid = (int(n) for n in settings.sandbox_user.split(":"))
    spool = settings.state_dir / "spool"  # restores are verified into a spooled file here
    spool.mkdir(parents=True, exist_ok=True)
    return WorkspaceStore(
        settings.workspace_store_dir or settings.state_dir / "workspaces",
        max_bytes=settings.workspace_max_bytes,
        store_max_bytes=settings.workspace_store_max_bytes,
        retention_seconds=settings.workspace_retention_seconds,
        uid=uid,
        gid=gid,
        spool_dir=spool,
    )


async def run_daemon(
    settings: Settings, *, drain: bool, metrics: Metrics | None = None, backend: DockerBackend | None = None
) -> Summary:
    """Wire the daemon's parts from the settings and run it (`backend`: tests pass a fake engine)."""
    assert settings.environment_id and settings.environment_key
    environment_key = settings.environment_key.get_secret_value()
    metrics = metrics or Metrics()
    ways_out = channels(settings)
    if ways_out is not None:
        ways_out.prepare()
    backend = backend or DockerBackend.from_env(sandbox_spec(settings, ways_out), workspace_disks(settings))
    if not await backend.ping():
        raise EngineError("the Docker engine does not answer (is dockerd running? DOCKER_HOST?)")
    queue = WorkQueue(
        base_url=settings.base_url,
        environment_id=settings.environment_id,
        environment_key=environment_key,
        worker_id=settings.worker_id,
        block_ms=settings.poll_block_ms,
        reclaim_older_than_ms=settings.reclaim_older_than_ms,
        metrics=metrics,
    )
    workspaces = Workspaces(WorkspaceConfig.from_settings(settings))
    await workspaces.reap_abandoned()  # staging left by a crashed run
    lifecycle = Lifecycle(backend, metrics, lifecycle_limits(settings))
    store = workspace_store(settings)
    retention = WorkspaceRetention(store, backend, queue, metrics) if store is not None else None
    pool = None
    if settings.warm_pool_size:
        pool = WarmPool(lifecycle, metrics, size=settings.warm_pool_size,
                        max_age_seconds=settings.warm_pool_max_age_seconds)
        lifecycle.pool = pool
    limits = SessionLimits(settings.max_session_seconds, settings.allow_environment_key_in_sandbox)
    supervisor = SessionSupervisor(queue, lifecycle, workspaces, metrics, limits, environment_key, retention,
                                   image_policy(settings))
    health = HealthState(poll_window_seconds=settings.ready_poll_window_seconds)
    notifier = Notifier.from_environ(os.environ)
    daemon = Daemon(
        queue, supervisor, lifecycle, metrics, health, notifier,
        max_sessions=settings.max_sessions,
        shutdown_grace_seconds=settings.shutdown_grace_seconds,
        drain_timeout_seconds=settings.drain_timeout_seconds if drain else None,
        shutdown_mode=settings.shutdown_mode,
        pool=pool,
    )
    try:
        async with AsyncExitStack() as stack:
            # /metrics, /healthz and /readyz answer before the first poll; queue stats only with an API key.
            await stack.enter_async_context(serving(settings.metrics_address, metrics.registry, health))
            await stack.enter_async_context(collecting(settings, metrics.queue))
            async with anyio.create_task_group() as tg:
                if ways_out is not None:
                    lifecycle.doors = await tg.start(ways_out.serve, metrics, name="channels")
                if retention is not None:
                    tg.start_soon(retention.sweep_forever, name="workspace store sweep")
                summary = await daemon.run(drain=drain)
                tg.cancel_scope.cancel()
            return summary
    finally:
        await queue.aclose()
        notifier.close()
