"""monitoring/: the alert rules parse as PromQL and behave, the dashboard is valid, and every metric
either of them queries is one sandboxd's /metrics exposes.

PromQL is parsed by promql-parser (a real PromQL grammar); when Debian's `prometheus` package is
installed, `promtool` also checks the rules file and runs alert scenarios against it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandboxd.health import HealthServer
from sandboxd.metrics import Metrics

try:
    import promql_parser
    import yaml
except ImportError as exc:  # a missing dev dependency must fail the suite, not skip it
    raise ImportError(f"{exc}: install the dev extras (pip install -e '.[dev]')") from exc

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# Series Prometheus records itself for every target; the only names not served by sandboxd.
PROMETHEUS_OWN = {"up"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


class _Probes:
    def live(self) -> tuple[bool, str]:
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        return True, "ok"


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Metric and sample names scraped from a daemon's /metrics (queue series for one environment)."""
    metrics = Metrics()
    metrics.queue.add_environment("env_test")
    server = HealthServer("127.0.0.1:0", metrics.registry, _Probes()).start()
    try:
        text = httpx2.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """Every metric name an expression selects (raises ValueError when it is not valid PromQL)."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def dashboard_exprs() -> Iterator[str]:
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            yield re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_the_rules_cover_the_four_required_alerts() -> None:
    names = {rule["alert"] for rule in rules()}
    assert {"SandboxdQueueBackingUp", "SandboxdQueueOldestItemTooOld", "SandboxdNotPolling",
            "SandboxdSessionsFailing"} <= names
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


@pytest.mark.parametrize("rule", rules(), ids=lambda rule: rule["alert"])
def test_each_rule_is_promql_over_exposed_metrics(rule: dict[str, Any], exposed: set[str]) -> None:
    names = metric_names(rule["expr"])
    assert names, "the rule selects no metric"
    assert names - PROMETHEUS_OWN <= exposed, f"not in /metrics: {names - PROMETHEUS_OWN - exposed}"


def test_the_rules_cover_the_lifecycle_metrics() -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    stalled = by_name["SandboxdSessionsStalled"]
    assert metric_names(stalled["expr"]) == {"sandboxd_sessions_stalled"} and "> 0" in stalled["expr"]
    assert stalled["for"] == "10m"
    refused = by_name["SandboxdEgressRefusedSpike"]
    assert 'decision="refused"' in refused["expr"] and refused["labels"]["severity"] == "info"
    corrupt = by_name["SandboxdWorkspaceRestoreCorrupt"]
    assert 'result="corrupt"' in corrupt["expr"] and "> 0" in corrupt["expr"]
    assert metric_names(by_name["SandboxdWarmPoolNotFilling"]["expr"]) == {"sandboxd_pool_ready", "sandboxd_pool_size"}
    assert metric_names(by_name["SandboxdWorkspaceDiskLimitStops"]["expr"]) == {
        "sandboxd_workspace_disk_limit_stops_total"}


def test_the_dashboard_is_valid_json_with_unique_panels() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance", "environment"}
    for panel in board["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_dashboard_query_is_promql_over_exposed_metrics(exposed: set[str]) -> None:
    queried: set[str] = set()
    exprs = list(dashboard_exprs())
    assert len(exprs) >= 15
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        queried |= names
    for variable in dashboard()["templating"]["list"]:
        match = re.match(r"label_values\((\w+),", variable.get("definition", ""))
        if match:
            queried.add(match.group(1))
    assert queried <= exposed, f"not in /metrics: {queried - exposed}"
    # Every family of the daemon is on the dashboard somewhere.
    families = {n.removesuffix("_bucket") for n in queried}
    assert {"sandboxd_queue_depth", "sandboxd_queue_oldest_age_seconds", "sandboxd_sessions_finished_total",
            "sandboxd_container_launch_errors_total", "sandboxd_session_duration_seconds"} <= families
    # ... and this round's lifecycle, tool, egress and workspace-store families.
    assert {"sandboxd_sessions_stalled", "sandboxd_workspace_disk_limit_stops_total", "sandboxd_pool_ready",
            "sandboxd_pool_size", "sandboxd_pool_acquisitions_total", "sandboxd_claim_to_first_heartbeat_seconds",
            "sandboxd_tool_calls_total", "sandboxd_tool_call_duration_seconds", "sandboxd_egress_requests_total",
            "sandboxd_workspace_restores_total", "sandboxd_sessions_adopted_total"} <= families


def test_promql_parser_rejects_invalid_promql() -> None:
    with pytest.raises(ValueError):
        metric_names("sum(rate(sandboxd_polls_total[5m])")


promtool = shutil.which("promtool")
# Skipped only off CI: `make test` (and so CI) installs Debian's prometheus, and there a missing
# promtool must fail the suite rather than quietly skip the two checks that use it.
needs_promtool = pytest.mark.skipif(
    promtool is None and not os.environ.get("CI"), reason="promtool not installed (Debian package prometheus)"
)


@needs_promtool
def test_promtool_checks_the_rules_file() -> None:
    result = subprocess.run([str(promtool), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    rendered = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{rendered}}}", "values": values}


def _firing(at: str, expected: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "expr": 'count by (alertname, instance, environment_id) (ALERTS{alertstate="firing"})',
        "eval_time": at,
        "exp_samples": [
            {"labels": "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}", "value": 1}
            for labels in expected
        ],
    }


def _scenarios() -> list[dict[str, Any]]:
    d1, d2, d3 = ({"instance": i, "job": "sandboxd"} for i in ("d1", "d2", "d3"))
    series = [
        # env_a backs up with nobody polling; env_b is healthy.
        _series("sandboxd_queue_depth", {"environment_id": "env_a", **d1}, "20x40"),
        _series("sandboxd_queue_oldest_age_seconds", {"environment_id": "env_a", **d1}, "900x40"),
        _series("sandboxd_queue_workers_polling", {"environment_id": "env_a", **d1}, "0x40"),
        _series("sandboxd_queue_depth", {"environment_id": "env_b", **d1}, "0x40"),
        _series("sandboxd_queue_oldest_age_seconds", {"environment_id": "env_b", **d1}, "0x40"),
        _series("sandboxd_queue_workers_polling", {"environment_id": "env_b", **d1}, "1x40"),
        _series("sandboxd_queue_stats_up", {"environment_id": "env_a", **d1}, "1x40"),
        _series("sandboxd_queue_stats_up", {"environment_id": "env_b", **d2}, "0x40"),
        # d1 has free slots and never polled; d2 never polled but is at capacity; d3 polls.
        _series("sandboxd_last_poll_success_timestamp_seconds", d1, "0x40"),
        _series("sandboxd_sessions_running", d1, "0x40"),
        _series("sandboxd_sessions_capacity", d1, "4x40"),
        _series("sandboxd_last_poll_success_timestamp_seconds", d2, "0x40"),
        _series("sandboxd_sessions_running", d2, "4x40"),
        _series("sandboxd_sessions_capacity", d2, "4x40"),
        _series("sandboxd_last_poll_success_timestamp_seconds", d3, "0+60x40"),
        _series("sandboxd_sessions_running", d3, "1x40"),
        _series("sandboxd_sessions_capacity", d3, "4x40"),
        # d3's sessions fail; d2's are only cancelled (a shutdown), which is not failing.
        _series("sandboxd_sessions_finished_total", {"outcome": "failed", **d3}, "0+2x40"),
        _series("sandboxd_sessions_finished_total", {"outcome": "succeeded", **d3}, "0x40"),
        _series("sandboxd_sessions_finished_total", {"outcome": "cancelled", **d2}, "0+2x40"),
        _series("sandboxd_sessions_finished_total", {"outcome": "succeeded", **d2}, "0+1x40"),
        # d1's sessions are all handed off to its successor: not failing either.
        _series("sandboxd_sessions_finished_total", {"outcome": "handed_off", **d1}, "0+3x40"),
        _series("sandboxd_sessions_finished_total", {"outcome": "succeeded", **d1}, "0+1x40"),
        # d1 has a stalled session throughout; d2's stalled for 5 minutes only (under the 10m `for`).
        _series("sandboxd_sessions_stalled", d1, "1x40"),
        _series("sandboxd_sessions_stalled", d2, "0x20 1x5 0x15"),
        # d3's egress proxy refuses 5 requests a minute; d2's 1 a minute (normal noise).
        _series("sandboxd_egress_requests_total", {"decision": "refused", **d3}, "0+5x40"),
        _series("sandboxd_egress_requests_total", {"decision": "refused", **d2}, "0+1x40"),
        _series("sandboxd_egress_requests_total", {"decision": "allowed", **d2}, "0+50x40"),
        # d3 restored a corrupt workspace once; d2's restores all hit.
        _series("sandboxd_workspace_restores_total", {"result": "corrupt", **d3}, "0x25 1x15"),
        _series("sandboxd_workspace_restores_total", {"result": "hit", **d2}, "0+3x40"),
        # d1 stopped a session over its disk limit; d1's pool never fills, d3's is full.
        _series("sandboxd_workspace_disk_limit_stops_total", d1, "0x20 1x20"),
        _series("sandboxd_pool_size", d1, "2x40"),
        _series("sandboxd_pool_ready", d1, "0x40"),
        _series("sandboxd_pool_size", d3, "2x40"),
        _series("sandboxd_pool_ready", d3, "2x40"),
    ]
    expected = [
        {"alertname": "SandboxdQueueBackingUp", "environment_id": "env_a"},
        {"alertname": "SandboxdQueueOldestItemTooOld", "environment_id": "env_a"},
        {"alertname": "SandboxdQueueNoWorkers", "environment_id": "env_a"},
        {"alertname": "SandboxdQueueStatsDown", "environment_id": "env_b", "instance": "d2"},
        {"alertname": "SandboxdNotPolling", "instance": "d1"},
        {"alertname": "SandboxdAtCapacity", "instance": "d2"},
        {"alertname": "SandboxdSessionsFailing", "instance": "d3"},
        {"alertname": "SandboxdSessionsStalled", "instance": "d1"},
        {"alertname": "SandboxdEgressRefusedSpike", "instance": "d3"},
        {"alertname": "SandboxdWorkspaceRestoreCorrupt", "instance": "d3"},
        {"alertname": "SandboxdWorkspaceDiskLimitStops", "instance": "d1"},
        {"alertname": "SandboxdWarmPoolNotFilling", "instance": "d1"},
    ]
    return [{"interval": "1m", "input_series": series, "promql_expr_test": [_firing("30m", expected)]}]


@needs_promtool
def test_promtool_alert_scenarios(tmp_path: Path) -> None:
    spec = tmp_path / "scenarios.yaml"  # JSON is YAML
    spec.write_text(json.dumps({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": _scenarios()}))
    result = subprocess.run([str(promtool), "test", "rules", str(spec)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
