"""Seeded fault injection for the local control plane (no HTTP, own lock).

Owns the active `FaultPlan` and what it did: which rule hits the n-th request of a route
(a hash of seed, rule, route and n, so a run with the same seed and request order injects
the same faults), and counters of every injected fault and every one-shot fault
(lease revocations, terminated sessions, dropped streams) for the snapshot. Replacing the
plan with an empty one turns every rate-based fault off; counters are kept.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from typing import Any

from .scenario import FaultKind, FaultPlan, FaultRule


def _fraction(seed: int, rule: int, route: str, number: int) -> float:
    digest = hashlib.sha256(f"{seed}:{rule}:{route}:{number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FaultInjector:
    """Decides, per request, which fault rule (if any) applies, and counts what was injected."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self._lock = threading.Lock()
        self._plan = plan if plan is not None else FaultPlan()
        self._seen: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    @property
    def plan(self) -> FaultPlan:
        with self._lock:
            return self._plan

    def set_plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan

    def pick(self, route: str, kinds: tuple[FaultKind, ...]) -> FaultRule | None:
        """The rule of one of `kinds` (first matching, in plan order) hitting this request of `route`.

        Requests are numbered per (route, kinds), so decisions depend on the request order only."""
        key = f"{route}/{','.join(kinds)}"
        with self._lock:
            number = self._seen[key]
            self._seen[key] += 1
            for index, rule in enumerate(self._plan.rules):
                if rule.route != route or rule.kind not in kinds:
                    continue
                if _fraction(self._plan.seed, index, route, number) < rule.rate:
                    self.injected[f"{route}.{rule.kind}"] += 1
                    return rule
        return None

    def count(self, name: str) -> None:
        """Count a one-shot fault (`lease_revoked`, `session_terminated`, `stream_dropped`...)."""
        with self._lock:
            self.injected[name] += 1

    def snapshot(self) -> dict[str, Any]:
        """`{"plan": FaultPlan, "injected": {"route.kind" | one-shot name: count}}`."""
        with self._lock:
            return {"plan": self._plan.model_dump(), "injected": dict(sorted(self.injected.items()))}
