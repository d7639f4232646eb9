"""The metric catalogue: one prefix, base units, bounded labels, every outcome series from the start."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.exporter import oldest_age_seconds
from sandboxd.limits import LIMITS
from sandboxd.metrics import EGRESS_DECISIONS, LAUNCH_REASONS, RESTORE_RESULTS, TOOLS, Metrics, QueueMetrics
from sandboxd.outcome import Outcome
from sandboxd.workspace.store import RestoreResult

BOUNDED_LABELS = {"outcome", "reason", "type", "environment_id", "version", "le"}
# Label names added with the sandbox lifecycle, each with the one closed set of values it may take.
ENUM_LABELS = {
    "tool": set(TOOLS),
    "source": {"pool", "cold", "adopted"},
    "result": {"hit", "miss", "ok", "failed"} | set(RESTORE_RESULTS),
    "direction": {"save", "restore"},
    "decision": set(EGRESS_DECISIONS),
    "limit": set(LIMITS),
}


def families(registry: object) -> dict[str, object]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(registry: object) -> list[tuple[str, dict[str, str], float]]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def test_every_metric_has_the_prefix_and_bounded_labels() -> None:
    metrics = Metrics()
    metrics.queue.add_environment("env_a")
    for name, labels, _ in samples(metrics.registry):
        assert name.startswith("sandboxd_"), name
        assert set(labels) <= BOUNDED_LABELS | set(ENUM_LABELS), (name, labels)
        for label, value in labels.items():
            assert value in ENUM_LABELS.get(label, {value}), (name, label, value)


def test_label_values_from_the_outside_are_mapped_onto_their_closed_sets() -> None:
    assert {Metrics.tool_label(t) for t in ("bash", "grep", "mcp__github__create_pr", "", "Bash")} == {
        "bash", "grep", "other"}
    assert {r.value for r in RestoreResult} == set(RESTORE_RESULTS)


def test_every_labelled_series_exists_before_the_first_event() -> None:
    found = samples(Metrics().registry)
    seen: dict[str, set[str]] = {}
    for _name, labels, _ in found:
        for label, value in labels.items():
            if label in ENUM_LABELS:
                seen.setdefault(label, set()).add(value)
    assert seen["tool"] == set(TOOLS)
    assert seen["source"] == {"pool", "cold", "adopted"}
    assert seen["direction"] == {"save", "restore"}
    assert seen["decision"] == set(EGRESS_DECISIONS)
    assert seen["result"] == {"hit", "miss", "ok", "failed"} | set(RESTORE_RESULTS)
    assert seen["limit"] == {"memory", "pids", "cpu"}


def test_every_outcome_and_launch_reason_exists_before_the_first_event() -> None:
    found = samples(Metrics().registry)
    outcomes = {labels["outcome"] for name, labels, _ in found if name == "sandboxd_sessions_finished_total"}
    assert outcomes == {o.value for o in Outcome}
    assert outcomes >= {"succeeded", "failed", "timed_out", "launch_failed", "workspace_failed", "lease_lost",
                        "cancelled"}
    reasons = {labels["reason"] for name, labels, _ in found if name == "sandboxd_container_launch_errors_total"}
    assert reasons == set(LAUNCH_REASONS)
    kinds = {labels["type"] for name, labels, _ in found if name == "sandboxd_work_items_claimed_total"}
    assert kinds == {"session", "healthcheck", "other"}


def test_durations_are_histograms_in_seconds() -> None:
    found = families(Metrics().registry)
    for name in ("sandboxd_claim_to_start_seconds", "sandboxd_workspace_prepare_seconds",
                 "sandboxd_session_duration_seconds", "sandboxd_claim_to_first_heartbeat_seconds",
                 "sandboxd_tool_call_duration_seconds", "sandboxd_workspace_transfer_seconds"):
        assert found[name].type == "histogram"  # type: ignore[attr-defined]
    for name, family in found.items():
        if family.type == "histogram":  # type: ignore[attr-defined]
            assert name.endswith("_seconds"), f"{name}: a histogram of durations in base units"
        assert not name.endswith(("_ms", "_milliseconds", "_minutes", "_kb", "_mb", "_kilobytes")), name
        if family.type == "counter":  # type: ignore[attr-defined]
            assert not name.endswith("_seconds"), f"{name}: a counter of seconds reads as _seconds_total"
    assert found["sandboxd_build_info"].type == "gauge"  # type: ignore[attr-defined]  # an Info, as text


def test_queue_series_appear_per_environment_with_up_at_zero() -> None:
    metrics = Metrics()
    assert not [s for s in samples(metrics.registry) if s[0].startswith("sandboxd_queue_")]
    metrics.queue.add_environment("env_a")
    up = [(labels, value) for name, labels, value in samples(metrics.registry) if name == "sandboxd_queue_stats_up"]
    assert up == [({"environment_id": "env_a"}, 0.0)]


def test_the_exporter_registry_holds_no_daemon_metrics() -> None:
    queue, registry = QueueMetrics.exporter_registry()
    queue.add_environment("env_a")
    names = {name for name, _, _ in samples(registry)}
    assert "sandboxd_build_info" in names
    assert "sandboxd_queue_depth" in names
    assert not {n for n in names if n.startswith(("sandboxd_sessions", "sandboxd_poll", "sandboxd_last_poll"))}


@pytest.mark.parametrize(
    ("stamp", "age"),
    [
        (None, 0.0),
        ("", 0.0),
        ("2030-01-01T00:00:00Z", 10.0),
        ("2030-01-01T00:00:00.500000Z", 9.5),
        ("2030-01-01T00:00:00.500000123Z", 9.5),  # nanoseconds
        ("2030-01-01T01:00:00+01:00", 10.0),
        ("2030-01-01T00:00:20Z", 0.0),  # clocks disagree: never negative
        ("not a time", 0.0),
    ],
)
def test_oldest_age_from_an_rfc3339_stamp(stamp: str | None, age: float) -> None:
    now = datetime(2030, 1, 1, 0, 0, 10, tzinfo=UTC).timestamp()
    assert oldest_age_seconds(stamp, now) == pytest.approx(age, abs=1e-3)
