"""Sandbox resource limits that are in force, or a loud refusal.

An engine can take a container's memory, pids and CPU limits and not enforce them. A rootless
engine without cgroup delegation (the usual rootless dind in a pod) drops them: it says so in the
create response's `Warnings` (or refuses `NanoCpus` outright), and `inspect` then shows no limit.
An engine may also keep them in the container's configuration while no cgroup bounds the
container. Two checks see both:

- **the probe**, once at start-up (and again while sessions are refused): one container built like
  a sandbox (image, user, runtime, walls and limits) prints its own cgroup's limits, cgroup v2
  `memory.max`, `pids.max`, `cpu.max` or v1 `memory.limit_in_bytes`, `pids.max`,
  `cpu.cfs_quota_us`/`cpu.cfs_period_us`: what the kernel enforces, whatever the engine says.
  Under gVisor a sandbox sees no cgroup files: the probe is then inconclusive, and the engine's
  word (warnings, inspect) stands;
- **every sandbox**: the create response's warnings (free) and its effective limits read back
  with one inspect (`HostConfig.Memory`, `PidsLimit`, `NanoCpus`). No exec, nothing per tool call.

A limit not in force refuses sessions: the daemon claims nothing, a sandbox creation fails with
LaunchError `limits_not_enforced`, `/readyz` answers 503 naming the limit and
`sandboxd_limits_unenforced{limit}` is 1. `allow_unenforced_limits = true` lets sessions run
without: every sandbox start then logs `sandbox_limits_unenforced`, the gauge stays 1 and `/readyz`
says so in its (200) answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from docker.utils import parse_bytes

from .errors import EngineError

log = logging.getLogger(__name__)

LIMITS = ("memory", "pids", "cpu")
ALLOW_SETTING = "allow_unenforced_limits"

# Runs in the probe container as the sandbox user: prints `name=value` for each cgroup file it can
# read. cgroup v2: the container's own group, found from /proc/self/cgroup (a host cgroup namespace
# shows the whole tree) or at the mount's root (a private namespace); v1: one mount per controller.
PROBE_SCRIPT = r"""
root=/sys/fs/cgroup
own=$(sed -n 's/^0:://p' /proc/self/cgroup 2>/dev/null)
v2=$root
if [ -n "$own" ] && [ -f "$root$own/memory.max" ]; then v2=$root$own; fi
for f in memory.max pids.max cpu.max; do
    if [ -r "$v2/$f" ]; then echo "$f=$(cat "$v2/$f")"; fi
done
for f in memory/memory.limit_in_bytes pids/pids.max cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us; do
    if [ -r "$root/$f" ]; then echo "$f=$(cat "$root/$f")"; fi
done
true
"""


class LimitsNotEnforced(EngineError):
    """The engine does not enforce the sandboxes' limits and `allow_unenforced_limits` is false."""


@dataclass(frozen=True)
class Wanted:
    """The limits every sandbox must have (from the settings)."""

    memory_bytes: int
    pids: int
    nano_cpus: int

    @classmethod
    def of(cls, memory_limit: str, pids_limit: int, cpus: float) -> Wanted:
        return cls(int(parse_bytes(memory_limit)), pids_limit, int(cpus * 1e9))

    def describe(self) -> str:
        return f"memory={self.memory_bytes} pids={self.pids} cpus={self.nano_cpus / 1e9:g}"


def dropped_by_warnings(warnings: Iterable[str] | None) -> dict[str, str]:
    """Limits the engine says it discarded, from a create response's `Warnings` (by limit).

    Docker words them "Your kernel does not support memory limit capabilities or the cgroup is not
    mounted. Limitation discarded.", "... PIDs limit discarded.", "... CPU CFS scheduler. CPU
    quota discarded."; "running ... without cgroups" drops all three. Others (block I/O weight) are not ours.
    Swap warnings are not about these limits (memory stays bounded, only without swap accounting).
    """
    dropped: dict[str, str] = {}
    for text in warnings or ():
        low = text.lower()
        if "swap" in low or not any(word in low for word in ("discarded", "not support", "cgroup")):
            continue
        named = [limit for limit, words in (("memory", ("memory",)), ("pids", ("pids",)), ("cpu", ("cpu", "cfs")))
                 if any(word in low for word in words)]
        if not named and "without cgroup" in low:
            named = list(LIMITS)
        for limit in named:
            dropped.setdefault(limit, f"the engine warned: {text}")
    return dropped


def cpu_refused(explanation: str) -> bool:
    """The engine refused the container because it cannot apply NanoCpus (no CFS scheduler or cgroup)."""
    low = explanation.lower()
    return "nanocpus" in low and ("not support" in low or "can not be set" in low or "cannot be set" in low)


def missing_from_host_config(host_config: Mapping[str, Any], wanted: Wanted) -> dict[str, str]:
    """Limits the container's effective configuration (inspect's HostConfig) does not carry."""
    missing: dict[str, str] = {}
    checks = (("memory", "Memory", wanted.memory_bytes), ("pids", "PidsLimit", wanted.pids),
              ("cpu", "NanoCpus", wanted.nano_cpus))
    for limit, key, want in checks:
        value = host_config.get(key) or 0
        if not 0 < int(value) <= want:
            missing[limit] = f"the container's {key} is {value!r}, not {want}"
    return missing


def parse_probe(output: str) -> dict[str, str]:
    readings = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            readings[name.strip()] = value.strip()
    return readings


def unenforced_in_cgroup(readings: Mapping[str, str], wanted: Wanted) -> dict[str, str] | None:
    """Limits the probe's own cgroup does not enforce (by limit); None when it saw no cgroup at all."""
    memory = readings.get("memory.max") or readings.get("memory/memory.limit_in_bytes")
    pids = readings.get("pids.max") or readings.get("pids/pids.max")
    cpu = readings.get("cpu.max")
    if cpu is None and "cpu/cpu.cfs_quota_us" in readings:
        cpu = f"{readings['cpu/cpu.cfs_quota_us']} {readings.get('cpu/cpu.cfs_period_us', '')}"
    if memory is None and pids is None and cpu is None:
        return None
    found: dict[str, str] = {}
    if not _within(memory, wanted.memory_bytes):
        found["memory"] = f"the sandbox's cgroup memory limit is {memory or 'not visible'}, not {wanted.memory_bytes}"
    if not _within(pids, wanted.pids):
        found["pids"] = f"the sandbox's cgroup pids limit is {pids or 'not visible'}, not {wanted.pids}"
    if not _cpu_within(cpu, wanted.nano_cpus):
        found["cpu"] = f"the sandbox's cgroup CPU quota is {cpu or 'not visible'}, not {wanted.nano_cpus / 1e9:g} CPUs"
    return found


def _within(value: str | None, limit: int) -> bool:
    try:
        return value is not None and 0 < int(value) <= limit
    except ValueError:  # "max": no limit
        return False


def _cpu_within(value: str | None, nano_cpus: int) -> bool:
    """`quota period` (v2 cpu.max, or v1's two files): at most `nano_cpus` worth of CPU time."""
    try:
        quota, period = (int(part) for part in (value or "").split())
    except ValueError:  # "max 100000", or not visible
        return False
    return quota > 0 and period > 0 and quota * 1_000_000_000 <= nano_cpus * period * (1 + 1e-6)


async def _nothing() -> None:
    return None


class Gauge(Protocol):
    def labels(self, *values: str) -> Any: ...


@dataclass
class SandboxLimits:
    """What this daemon knows of the engine's enforcement of the sandbox limits; read by /readyz,
    the claim gate and every sandbox creation (see the module docstring)."""

    wanted: Wanted
    allow_unenforced: bool = False
    probed: bool = False  # the start-up probe ran (whatever it found)
    probe_found: dict[str, str] = field(default_factory=dict)  # limit -> evidence, from the probe
    created_found: dict[str, str] = field(default_factory=dict)  # ... from the last sandbox created
    gauge: Gauge | None = None  # sandboxd_limits_unenforced{limit}
    check: Callable[[], Awaitable[None]] = field(default=lambda: _nothing())  # the probe (set by the backend)
    _reported: frozenset[str] | None = None

    @property
    def unenforced(self) -> dict[str, str]:
        return {**self.probe_found, **self.created_found}

    @property
    def refused(self) -> bool:
        return bool(self.unenforced) and not self.allow_unenforced

    def names(self) -> str:
        return ", ".join(limit for limit in LIMITS if limit in self.unenforced)

    def record_probe(self, found: Mapping[str, str]) -> None:
        self.probed = True
        self.probe_found, self.created_found = dict(found), {}
        self._changed()

    def record_created(self, found: Mapping[str, str]) -> None:
        self.created_found = dict(found)
        self._changed()

    def refusal(self) -> str:
        evidence = "; ".join(f"{limit}: {why}" for limit, why in self.unenforced.items())
        return (f"the engine does not enforce the sandbox limits ({self.names()}): {evidence}. Sessions are "
                f"refused; `{ALLOW_SETTING} = true` runs them without these limits")

    def readiness(self) -> tuple[bool, str]:
        """(ready as far as limits go, detail for /readyz); the detail is empty when every limit holds."""
        if not self.unenforced:
            return True, ""
        if self.allow_unenforced:
            return True, f"sandbox limits not enforced: {self.names()}; allowed by {ALLOW_SETTING}"
        return False, (f"sandbox limits not enforced by the engine: {self.names()}; sessions refused "
                       f"({ALLOW_SETTING} is false)")

    def _changed(self) -> None:
        unenforced = self.unenforced
        if self.gauge is not None:
            for limit in LIMITS:
                self.gauge.labels(limit).set(1 if limit in unenforced else 0)
        now = frozenset(unenforced)
        if now == self._reported:
            return
        self._reported = now
        if not unenforced:
            log.info("limits_enforced %s", self.wanted.describe())
        elif self.allow_unenforced:
            log.warning("limits_not_enforced limits=%s; sessions run without them (allowed by %s): %s",
                        self.names(), ALLOW_SETTING, "; ".join(unenforced.values()))
        else:
            log.error("limits_not_enforced limits=%s; refusing sessions: %s", self.names(), self.refusal())
