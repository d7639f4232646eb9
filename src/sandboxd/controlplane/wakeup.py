"""Cross-thread change notification for the local control plane.

Owns `ChangeSignal`: a generation counter that state changes bump from any
thread, and that async handlers (long polls, SSE streams) wait on so they
wake as soon as something changed instead of on their next tick.
"""

from __future__ import annotations

import asyncio
import threading


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ChangeSignal:
    """Bumped on every state change; `wait` returns once the generation moved or on timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def notify(self) -> None:
        """Record a change and wake every waiter (callable from any thread)."""
        with self._lock:
            self._generation += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that loop has closed; nobody is waiting any more
                pass

    async def wait(self, since: int, within: float) -> None:
        """Wait until the generation differs from `since`, at most `within` seconds."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if self._generation != since:
                return
            self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, within)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)
