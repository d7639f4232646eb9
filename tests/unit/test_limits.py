"""Sandbox limits in force, or a loud refusal (sandboxd.limits), against a fake engine.

The engine's answers are Docker 20.10's own: the create response's warnings when a kernel or a
rootless engine cannot apply a limit, an effective HostConfig without it, a refused NanoCpus, and
the cgroup files a sandbox-like probe container reads (v1, v2, a rootless engine's parent group,
and nothing at all under gVisor).
"""

from __future__ import annotations

import logging
from functools import partial

import anyio
import pytest

from sandboxd.containers import DockerBackend, Sandbox
from sandboxd.daemon import ExitStatus
from sandboxd.errors import LaunchError
from sandboxd.health import HealthState
from sandboxd.limits import (
    LIMITS,
    SandboxLimits,
    Wanted,
    dropped_by_warnings,
    missing_from_host_config,
    parse_probe,
    unenforced_in_cgroup,
)
from sandboxd.metrics import Metrics
from tests.unit.fake_engine import FakeAPI, backend
from tests.unit.fakes import FakeBackend, FakeQueue, eventually, work_item
from tests.unit.test_daemon import _daemon

pytestmark = pytest.mark.anyio

WANTED = Wanted.of("1g", 256, 1.0)  # the fakes' sandbox spec
MEMORY_WARNING = ("Your kernel does not support memory limit capabilities or the cgroup is not mounted. "
                  "Limitation discarded.")
PIDS_WARNING = ("Your kernel does not support PIDs limit capabilities or the cgroup is not mounted. "
                "PIDs limit discarded.")
SWAP_WARNING = ("Your kernel does not support swap limit capabilities or the cgroup is not mounted. "
                "Memory limited without swap.")
V1_ENFORCED = (b"memory/memory.limit_in_bytes=1073741824\npids/pids.max=256\n"
               b"cpu/cpu.cfs_quota_us=100000\ncpu/cpu.cfs_period_us=100000\n")
V2_ENFORCED = b"memory.max=1073741824\npids.max=256\ncpu.max=100000 100000\n"
# A rootless engine that cannot make cgroups: the sandbox sits in its parent's group, unbounded.
V2_UNBOUNDED = b"memory.max=max\npids.max=max\ncpu.max=max 100000\n"


def _sandbox() -> Sandbox:
    sandbox = DockerBackend.new_sandbox()
    sandbox.image_id = "sha256:img"
    return sandbox


def _gauge(metrics: Metrics) -> dict[str, float]:
    return {limit: float(metrics.limits_unenforced.labels(limit)._value.get()) for limit in LIMITS}


# --- what counts as evidence ------------------------------------------------------------------------


def test_the_warnings_name_the_limits_the_engine_dropped() -> None:
    assert set(dropped_by_warnings([MEMORY_WARNING, PIDS_WARNING, SWAP_WARNING])) == {"memory", "pids"}
    assert set(dropped_by_warnings(["Your kernel does not support CPU CFS scheduler. CPU quota discarded."])) == {
        "cpu"}
    assert set(dropped_by_warnings(["Running in rootless-mode without cgroups."])) == set(LIMITS)
    # Swap accounting, block I/O weights and ports are not the limits at stake.
    assert dropped_by_warnings([SWAP_WARNING, "Published ports are discarded when using host network mode",
                                "Your kernel does not support Block I/O weight or the cgroup is not mounted. "
                                "Weight discarded."]) == {}
    assert dropped_by_warnings(None) == {}


def test_the_effective_configuration_must_carry_each_limit() -> None:
    full = {"Memory": 1 << 30, "PidsLimit": 256, "NanoCpus": 1_000_000_000}
    assert missing_from_host_config(full, WANTED) == {}
    assert set(missing_from_host_config({**full, "Memory": 0, "PidsLimit": None}, WANTED)) == {"memory", "pids"}
    assert set(missing_from_host_config({**full, "PidsLimit": -1, "NanoCpus": 2_000_000_000}, WANTED)) == {
        "pids", "cpu"}


def test_the_cgroup_a_sandbox_reads_decides_v1_and_v2() -> None:
    assert unenforced_in_cgroup(parse_probe(V1_ENFORCED.decode()), WANTED) == {}
    assert unenforced_in_cgroup(parse_probe(V2_ENFORCED.decode()), WANTED) == {}
    assert set(unenforced_in_cgroup(parse_probe(V2_UNBOUNDED.decode()), WANTED) or {}) == set(LIMITS)
    v1_unbounded = ("memory/memory.limit_in_bytes=9223372036854771712\npids/pids.max=max\n"
                    "cpu/cpu.cfs_quota_us=-1\ncpu/cpu.cfs_period_us=100000\n")
    assert set(unenforced_in_cgroup(parse_probe(v1_unbounded), WANTED) or {}) == set(LIMITS)
    looser = "memory.max=2147483648\npids.max=1024\ncpu.max=200000 100000\n"
    assert set(unenforced_in_cgroup(parse_probe(looser), WANTED) or {}) == set(LIMITS)
    stricter = "memory.max=536870912\npids.max=128\ncpu.max=50000 100000\n"
    assert unenforced_in_cgroup(parse_probe(stricter), WANTED) == {}
    assert set(unenforced_in_cgroup({"memory.max": "1073741824"}, WANTED) or {}) == {"pids", "cpu"}
    assert unenforced_in_cgroup({}, WANTED) is None  # no cgroup visible (gVisor): inconclusive


# --- every sandbox: the create response and its effective limits -------------------------------------


def test_a_sandbox_whose_limits_hold_is_created_with_them() -> None:
    api = FakeAPI()
    engine = backend(api)
    assert engine._create(_sandbox()) == "c1"
    host_config = api.created[0]["HostConfig"]
    assert (host_config["Memory"], host_config["PidsLimit"], host_config["NanoCpus"]) == (1 << 30, 256, 10**9)
    assert engine.limits.unenforced == {} and engine.limits.readiness() == (True, "")


def test_dropped_limits_refuse_the_sandbox_and_every_later_one(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeAPI(warnings=[MEMORY_WARNING, PIDS_WARNING], drop={"Memory", "PidsLimit"})
    engine = backend(api)
    metrics = Metrics()
    engine.limits.gauge = metrics.limits_unenforced
    with caplog.at_level(logging.ERROR), pytest.raises(LaunchError) as refused:
        engine._create(_sandbox())
    assert refused.value.reason == "limits_not_enforced"
    assert "memory, pids" in str(refused.value) and "allow_unenforced_limits = true" in str(refused.value)
    assert "limits_not_enforced limits=memory, pids; refusing sessions" in caplog.text
    assert engine.limits.refused and _gauge(metrics) == {"memory": 1, "pids": 1, "cpu": 0}
    ready, detail = engine.limits.readiness()
    assert not ready and detail.startswith("sandbox limits not enforced by the engine: memory, pids")
    with pytest.raises(LaunchError, match="memory, pids"):
        engine._create(_sandbox())
    assert len(api.created) == 1, "nothing more is created while limits are refused"


def test_a_limit_missing_from_inspect_without_a_warning_is_caught() -> None:
    engine = backend(FakeAPI(drop={"NanoCpus"}))
    with pytest.raises(LaunchError, match=r"\(cpu\).*NanoCpus is 0"):
        engine._create(_sandbox())


def test_allowed_unenforced_limits_run_with_a_warning_at_every_start(caplog: pytest.LogCaptureFixture) -> None:
    engine = backend(FakeAPI(warnings=[MEMORY_WARNING], drop={"Memory"}), allow_unenforced_limits=True)
    with caplog.at_level(logging.WARNING):
        engine._create(_sandbox())
        engine._create(_sandbox())
    assert caplog.text.count("sandbox_limits_unenforced") == 2
    assert "limits=memory (allowed by allow_unenforced_limits)" in caplog.text
    assert not engine.limits.refused
    assert engine.limits.readiness() == (
        True, "sandbox limits not enforced: memory; allowed by allow_unenforced_limits")


def test_a_refused_cpu_limit_is_refused_or_if_allowed_left_out() -> None:
    api = FakeAPI(refuse_nano_cpus=True)
    with pytest.raises(LaunchError, match="refused the CPU limit: NanoCPUs can not be set"):
        backend(api)._create(_sandbox())
    assert len(api.created) == 1 and api.containers == {}

    api = FakeAPI(refuse_nano_cpus=True)
    engine = backend(api, allow_unenforced_limits=True)
    engine._create(_sandbox())
    engine._create(_sandbox())
    assert ["NanoCpus" in c["HostConfig"] for c in api.created] == [True, False, False], "asked once, then left out"
    assert set(engine.limits.unenforced) == {"cpu"}


# --- the probe: what a sandbox-like container's cgroup enforces --------------------------------------


async def test_the_probe_reads_the_cgroup_of_a_container_built_like_a_sandbox() -> None:
    api = FakeAPI(probe_output=V1_ENFORCED)
    engine = backend(api, runtime="runsc")
    await engine._probe_limits()
    assert engine.limits.probed and engine.limits.unenforced == {}
    (probe,) = api.created
    assert probe["Entrypoint"][:2] == ["/bin/sh", "-c"] and probe["User"] == engine.spec.user
    walls = {k: probe["HostConfig"][k] for k in ("Memory", "PidsLimit", "NanoCpus", "ReadonlyRootfs", "CapDrop",
                                                  "NetworkMode", "Runtime", "Init")}
    assert walls == {"Memory": 1 << 30, "PidsLimit": 256, "NanoCpus": 10**9, "ReadonlyRootfs": True,
                     "CapDrop": ["ALL"], "NetworkMode": "none", "Runtime": "runsc", "Init": True}
    assert api.removed == ["c1"] and api.containers == {}


async def test_an_engine_that_accepts_limits_and_does_not_enforce_them_is_found_out() -> None:
    api = FakeAPI(probe_output=V2_UNBOUNDED)  # no warning, a HostConfig with every limit
    engine = backend(api)
    await engine._probe_limits()
    assert engine.limits.refused and set(engine.limits.unenforced) == set(LIMITS)
    assert "the sandbox's cgroup memory limit is max" in engine.limits.refusal()
    with pytest.raises(LaunchError, match="limits_not_enforced|memory, pids, cpu"):
        engine._create(_sandbox())


async def test_a_probe_that_sees_no_cgroup_leaves_it_to_the_engine(caplog: pytest.LogCaptureFixture) -> None:
    engine = backend(FakeAPI(probe_output=b""))  # gVisor: /sys/fs/cgroup is not readable inside
    with caplog.at_level(logging.WARNING):
        await engine._probe_limits()
    assert "limits_probe_inconclusive" in caplog.text
    assert engine.limits.probed and not engine.limits.refused
    engine = backend(FakeAPI(probe_output=b"", warnings=[PIDS_WARNING], drop={"PidsLimit"}))
    await engine._probe_limits()
    assert set(engine.limits.unenforced) == {"pids"}, "what the engine itself said still counts"


async def test_a_probe_the_engine_fails_decides_nothing(caplog: pytest.LogCaptureFixture) -> None:
    engine = backend(FakeAPI(up=False))
    with caplog.at_level(logging.WARNING):
        await engine._probe_limits()
    assert "limits_probe_failed" in caplog.text and engine.limits.probed and not engine.limits.refused


async def test_the_probe_is_what_a_new_probe_says_and_clears_a_sandbox_finding() -> None:
    api = FakeAPI(warnings=[MEMORY_WARNING], drop={"Memory"}, probe_output=V1_ENFORCED)
    engine = backend(api)
    with pytest.raises(LaunchError):
        engine._create(_sandbox())
    api.warnings, api.drop = [], set()  # the engine was restarted with delegation
    await engine.limits.check()
    assert not engine.limits.refused
    assert engine._create(_sandbox())


# --- readiness and the claim gate --------------------------------------------------------------------


def test_readyz_names_the_limit_or_says_it_was_allowed() -> None:
    limits = SandboxLimits(WANTED)
    health = HealthState(poll_window_seconds=60, engine_ok=True, polling=True, seconds_since_poll=lambda: 1.0,
                         sandbox_limits=limits.readiness)
    assert health.ready() == (True, "ok")
    limits.record_probe({"pids": "the sandbox's cgroup pids limit is max, not 256"})
    assert health.ready() == (False, "sandbox limits not enforced by the engine: pids; sessions refused "
                                     "(allow_unenforced_limits is false)")
    limits.allow_unenforced = True
    assert health.ready() == (True, "ok (sandbox limits not enforced: pids; allowed by allow_unenforced_limits)")


def _limited(backend: FakeBackend, verdicts: list[dict[str, str]]) -> SandboxLimits:
    """Give the fake engine limits whose probe answers `verdicts`, one per run (the last one sticks)."""
    limits = SandboxLimits(WANTED)

    async def probe() -> None:
        limits.record_probe(verdicts.pop(0) if len(verdicts) > 1 else verdicts[0])

    limits.check = probe
    backend.limits = limits  # type: ignore[attr-defined]
    return limits


async def test_the_daemon_claims_nothing_while_limits_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sandboxd.daemon.LIMITS_RECHECK_SECONDS", 0.05)
    queue = FakeQueue(items=[work_item(1)])
    engine = FakeBackend()
    refused = {"memory": "the engine warned: ... Limitation discarded."}
    limits = _limited(engine, [refused] * 5 + [{}])
    daemon, metrics = _daemon(queue, engine)
    queue.running = lambda: daemon._running
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(daemon.run, drain=False))
        await eventually(lambda: limits.probed)
        assert _gauge(metrics)["memory"] == 1 and daemon._health.sandbox_limits()[0] is False
        assert queue.claimed_while == [] and engine.create_calls == 0
        await eventually(lambda: queue.claimed_while)  # the engine enforces them now: work is claimed
        await eventually(lambda: daemon.summary.results)
        tg.cancel_scope.cancel()
    assert _gauge(metrics)["memory"] == 0


async def test_drain_stops_at_once_when_limits_are_refused() -> None:
    queue = FakeQueue(items=[work_item(1)])
    engine = FakeBackend()
    _limited(engine, [{"pids": "the sandbox's cgroup pids limit is max, not 256"}])
    daemon, _ = _daemon(queue, engine)
    queue.running = lambda: daemon._running

    summary = await daemon.run(drain=True)

    assert summary.exit_code(drain=True) == ExitStatus.FATAL
    assert summary.fatal and "(pids)" in summary.fatal and "allow_unenforced_limits" in summary.fatal
    assert queue.claimed_while == [] and queue.stopped == [] and engine.create_calls == 0


async def test_allowed_unenforced_limits_do_not_hold_claims() -> None:
    queue = FakeQueue(items=[work_item(1)])
    engine = FakeBackend()
    limits = _limited(engine, [{"cpu": "the engine refused the CPU limit"}])
    limits.allow_unenforced = True
    daemon, _ = _daemon(queue, engine)

    summary = await daemon.run(drain=True)

    assert summary.exit_code(drain=True) == ExitStatus.OK and len(summary.results) == 1
