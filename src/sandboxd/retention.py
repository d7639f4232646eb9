"""A session keeps its /workspace across its work items: save at the end, restore at the next start.

When a session's sandbox has finished, its /workspace is read out of the stopped container
(`get_archive`) into the `WorkspaceStore` — local to this host, or a directory shared by every
daemon of the environment — keyed by the session id. The session's next work item, served by any
of those daemons, gets it back before its first tool call, and the repositories and files named
in the metadata are not fetched over it (the agent's changes win). A session known to be
terminated has its workspace deleted. The store does the filtering, checksums and atomicity;
this module decides when, and counts.

Saves and restores run in threads with limiters of their own, so however long saves take (each is
bounded by the store's deadline) they never delay another session's restore. A save that fails
deletes the session's previous snapshot too: keeping it would silently roll the session back to an
older workspace, so its next item fetches from the metadata instead. A restore the engine refuses
is discarded the same way, once: the snapshot is deleted and the item fetches from the metadata.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.to_thread
import docker.errors

from .containers import DockerBackend
from .errors import EngineError, WorkspaceError
from .lifecycle import Tracked
from .metrics import Metrics
from .outcome import Outcome
from .queue import WorkQueue
from .sandbox import Sandbox
from .settlement import Settlement
from .workspace.store import RestoreResult, SnapshotError, WorkspaceStore

log = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 600.0
SAVE_WAIT_MARGIN_SECONDS = 60.0  # a restore waits for its session's save: the store's deadline and this
SAVE_THREADS = 4  # saves at once (each a tar copy in Python, bounded by the store's deadline)
RESTORE_THREADS = 4  # restores at once, never waiting for a save's thread
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
        self._saves = anyio.CapacityLimiter(SAVE_THREADS)
        self._restores = anyio.CapacityLimiter(RESTORE_THREADS)
        self._chores = anyio.CapacityLimiter(1)  # the sweep, and deleting terminated sessions' entries
        # Sessions with a sandbox on this daemon, set once its workspace is saved: the next item of
        # a session is queued as soon as the previous one is stopped, before its sandbox has exited.
        self._latest: dict[str, anyio.Event] = {}  # session id -> its newest sandbox's event
        self._saved: dict[str, anyio.Event] = {}  # sandbox name -> its event

    async def restore(self, session_id: str, sandbox: Sandbox) -> bool:
        """Put the session's kept workspace into the sandbox; False when there is none to restore (or the
        engine refused it, and it was discarded): the caller fetches from the metadata."""
        previous = self._latest.get(session_id)
        self._latest[session_id] = self._saved[sandbox.name] = anyio.Event()
        if previous is not None and not previous.is_set():
            log.info("workspace_restore_waits session_id=%s (its previous sandbox is finishing)", session_id)
            with anyio.move_on_after(self._store.save_timeout_seconds + SAVE_WAIT_MARGIN_SECONDS):
                await previous.wait()
        restored = await anyio.to_thread.run_sync(self._store.restore, session_id, limiter=self._restores)
        if restored.result is not RestoreResult.HIT or restored.archive is None:
            self._metrics.workspace_restores.labels(restored.result.value).inc()
            log.info("workspace_restore result=%s session_id=%s%s; fetching from the metadata",
                     restored.result.value, session_id, f" reason={restored.reason}" if restored.reason else "")
            return False
        began = time.monotonic()
        with restored:
            try:
                await self._backend.put_workspace(sandbox, restored.archive)
            except EngineError as exc:
                if not _refused_by_engine(exc):  # the sandbox is gone, or the engine unreachable: keep the snapshot
                    self._metrics.workspace_restores.labels(RestoreResult.HIT.value).inc()
                    raise WorkspaceError("delivery_failed", f"the engine did not take the kept workspace: {exc}"
                                         ) from exc
                await self._discard(session_id, exc)
                return False
        self._metrics.workspace_restores.labels(RestoreResult.HIT.value).inc()
        seconds = restored.seconds + time.monotonic() - began
        self._metrics.workspace_transfer_seconds.labels("restore").observe(seconds)
        self._metrics.workspace_transfer_bytes.labels("restore").inc(restored.tar_bytes)
        log.info("workspace_restore result=hit session_id=%s bytes=%d seconds=%.2f", session_id,
                 restored.tar_bytes, seconds)
        return True

    async def _discard(self, session_id: str, exc: EngineError) -> None:
        """The engine refused the snapshot: delete it, so neither this item nor a later one tries it again.

        put_archive extracts member by member, so what it wrote before refusing stays in /workspace;
        the fetch from the metadata that follows replaces whatever it names again. The snapshot puts
        every directory before what is in it, so a link it left is replaced, never followed."""
        self._metrics.workspace_restores.labels(RestoreResult.DISCARDED.value).inc()
        try:
            removed = await anyio.to_thread.run_sync(self._store.delete, session_id, limiter=self._restores)
        except OSError as error:
            removed = 0
            log.warning("workspace_discard_failed session_id=%s error=%s", session_id, _bounded(error))
        log.warning("workspace_restore result=discarded session_id=%s reason=engine_refused files=%d error=%s; the "
                    "snapshot is deleted and the workspace fetched from the metadata", session_id, removed,
                    _bounded(exc))

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
            removed = await anyio.to_thread.run_sync(self._store.delete, session_id, limiter=self._chores)
            log.info("workspace_deleted session_id=%s reason=terminated files=%d", session_id, removed)
            return

        def save() -> int:
            info = self._store.save(session_id, self._backend.workspace_stream(sandbox))
            return info.tar_bytes

        began = time.monotonic()
        try:
            with anyio.CancelScope(shield=True):  # the thread ends by itself: the store's deadline bounds it
                saved = await anyio.to_thread.run_sync(save, limiter=self._saves)
        except Exception as exc:  # noqa: BLE001 - a failed save never fails the session
            self._metrics.workspace_saves.labels("failed").inc()
            with anyio.CancelScope(shield=True):
                await self._save_failed(session_id, exc)
            return
        seconds = time.monotonic() - began
        self._metrics.workspace_saves.labels("ok").inc()
        self._metrics.workspace_transfer_seconds.labels("save").observe(seconds)
        self._metrics.workspace_transfer_bytes.labels("save").inc(saved)
        log.info("workspace_saved session_id=%s bytes=%d seconds=%.2f", session_id, saved, seconds)

    async def _save_failed(self, session_id: str, exc: Exception) -> None:
        """Delete the previous snapshot too: restoring it would roll the session back without a word."""
        reason = exc.reason if isinstance(exc, SnapshotError) else "source_failed"
        try:
            removed = await anyio.to_thread.run_sync(self._store.delete, session_id, limiter=self._saves)
        except OSError as error:
            removed = 0
            log.warning("workspace_discard_failed session_id=%s error=%s", session_id, _bounded(error))
        log.warning("workspace_save_failed session_id=%s reason=%s error=%s; the previous snapshot is deleted "
                    "(files=%d): the next item fetches from the metadata", session_id, reason, _bounded(exc), removed)

    async def sweep_forever(self) -> None:
        """Expire, evict (oldest first) and clean up the store, every SWEEP_INTERVAL_SECONDS."""
        while True:
            try:
                counts = await anyio.to_thread.run_sync(self._store.sweep, limiter=self._chores)
                log.info("workspace_store_swept expired=%d evicted=%d entries=%d bytes=%d", counts.expired,
                         counts.evicted, counts.entries, counts.store_bytes)
            except OSError as exc:
                log.warning("workspace_store_sweep_failed error=%s", exc)
            await anyio.sleep(SWEEP_INTERVAL_SECONDS)


def _refused_by_engine(exc: EngineError) -> bool:
    """Whether the engine answered the put_archive and refused the archive (or extracting it failed), as
    opposed to the sandbox being gone or the engine not answering: only then is the snapshot at fault."""
    cause = exc.__cause__
    if cause is None:
        return True  # put_archive answered, with a refusal
    if isinstance(cause, docker.errors.NotFound):
        return False
    return isinstance(cause, docker.errors.APIError) and cause.response is not None


def _bounded(error: BaseException, limit: int = 400) -> str:
    """An error for a log line, quoted and cut: its text can hold names from the workspace, up to 4 KB each."""
    text = str(error)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}...(+{len(text) - limit} chars)"
