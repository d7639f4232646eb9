"""A session keeps its /workspace across its work items: save at the end, restore at the next start.

When a session's sandbox has finished, its /workspace is read out of the stopped container
(`get_archive`) into the `WorkspaceStore` — local to this host, or a directory shared by every
daemon of the environment — keyed by the session id. The session's next work item, served by any
of those daemons, gets it back before its first tool call, and the repositories and files named
in the metadata are not fetched over it (the agent's changes win). A session known to be
terminated has its workspace deleted. The store does the filtering, checksums and atomicity;
this module decides when, and counts.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.to_thread

from .containers import DockerBackend
from .errors import EngineError, WorkspaceError
from .lifecycle import Tracked
from .metrics import Metrics
from .outcome import Outcome
from .queue import WorkQueue
from .sandbox import Sandbox
from .settlement import Settlement
from .workspace.store import RestoreResult, WorkspaceStore

log = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 600.0
SAVE_WAIT_SECONDS = 120.0
# A workspace left by a session that never really ran (refused, never started, fetch failed) is
# not worth keeping: the next item fetches afresh.
_NOT_KEPT = frozenset({Outcome.LAUNCH_FAILED, Outcome.WORKSPACE_FAILED})


class WorkspaceRetention:
    """Saves and restores session workspaces through the store (blocking work in threads)."""

    def __init__(self, store: WorkspaceStore, backend: DockerBackend, queue: WorkQueue, metrics: Metrics) -> None:
        self._store = store
        self._backend = backend
        self._queue = queue
        self._metrics = metrics
        self._threads = anyio.CapacityLimiter(4)
        # Sessions with a sandbox on this daemon, set once its workspace is saved: the next item of
        # a session is queued as soon as the previous one is stopped, before its sandbox has exited.
        self._latest: dict[str, anyio.Event] = {}  # session id -> its newest sandbox's event
        self._saved: dict[str, anyio.Event] = {}  # sandbox name -> its event

    async def restore(self, session_id: str, sandbox: Sandbox) -> bool:
        """Put the session's kept workspace into the sandbox; False when there is none to restore."""
        previous = self._latest.get(session_id)
        self._latest[session_id] = self._saved[sandbox.name] = anyio.Event()
        if previous is not None and not previous.is_set():
            log.info("workspace_restore_waits session_id=%s (its previous sandbox is finishing)", session_id)
            with anyio.move_on_after(SAVE_WAIT_SECONDS):
                await previous.wait()
        restored = await anyio.to_thread.run_sync(self._store.restore, session_id, limiter=self._threads)
        self._metrics.workspace_restores.labels(restored.result.value).inc()
        if restored.result is not RestoreResult.HIT or restored.archive is None:
            log.info("workspace_restore result=%s session_id=%s%s; fetching from the metadata",
                     restored.result.value, session_id, f" reason={restored.reason}" if restored.reason else "")
            return False
        began = time.monotonic()
        with restored:
            try:
                await self._backend.put_workspace(sandbox, restored.archive)
            except EngineError as exc:
                raise WorkspaceError("delivery_failed", f"the engine did not take the kept workspace: {exc}") from exc
        seconds = restored.seconds + time.monotonic() - began
        self._metrics.workspace_transfer_seconds.labels("restore").observe(seconds)
        self._metrics.workspace_transfer_bytes.labels("restore").inc(restored.tar_bytes)
        log.info("workspace_restore result=hit session_id=%s bytes=%d seconds=%.2f", session_id,
                 restored.tar_bytes, seconds)
        return True

    async def keep(self, tracked: Tracked, settlement: Settlement) -> None:
        """Save the finished sandbox's workspace for the session's next item (or delete it: terminated)."""
        record = tracked.sandbox.record
        saved = self._saved.pop(tracked.sandbox.name, None)
        try:
            await self._keep(tracked, settlement)
        finally:
            if saved is not None:
                saved.set()
                if record is not None and self._latest.get(record.item.session_id) is saved:
                    del self._latest[record.item.session_id]

    async def _keep(self, tracked: Tracked, settlement: Settlement) -> None:
        sandbox = tracked.sandbox
        if (sandbox.record is None or not sandbox.container_id or not tracked.workspace_ready
                or settlement.outcome in _NOT_KEPT):
            return
        session_id = sandbox.record.item.session_id
        if await self._queue.session_status(session_id) == "terminated":
            removed = await anyio.to_thread.run_sync(self._store.delete, session_id, limiter=self._threads)
            log.info("workspace_deleted session_id=%s reason=terminated files=%d", session_id, removed)
            return

        def save() -> int:
            info = self._store.save(session_id, self._backend.workspace_stream(sandbox))
            return info.tar_bytes

        began = time.monotonic()
        try:
            with anyio.CancelScope(shield=True):
                saved = await anyio.to_thread.run_sync(save, limiter=self._threads)
        except Exception as exc:  # noqa: BLE001 - a failed save keeps the previous snapshot; never fails the session
            self._metrics.workspace_saves.labels("failed").inc()
            log.warning("workspace_save_failed session_id=%s error=%s", session_id, exc)
            return
        seconds = time.monotonic() - began
        self._metrics.workspace_saves.labels("ok").inc()
        self._metrics.workspace_transfer_seconds.labels("save").observe(seconds)
        self._metrics.workspace_transfer_bytes.labels("save").inc(saved)
        log.info("workspace_saved session_id=%s bytes=%d seconds=%.2f", session_id, saved, seconds)

    async def sweep_forever(self) -> None:
        """Expire, evict (oldest first) and clean up the store, every SWEEP_INTERVAL_SECONDS."""
        while True:
            try:
                counts = await anyio.to_thread.run_sync(self._store.sweep, limiter=self._threads)
                log.info("workspace_store_swept expired=%d evicted=%d entries=%d bytes=%d", counts.expired,
                         counts.evicted, counts.entries, counts.store_bytes)
            except OSError as exc:
                log.warning("workspace_store_sweep_failed error=%s", exc)
            await anyio.sleep(SWEEP_INTERVAL_SECONDS)
