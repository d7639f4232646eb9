"""Every Prometheus metric sandboxd exports, in one module: prefix `sandboxd_`, base units.

Label values are bounded enums created up front (so a series exists before its first event);
session and work ids never become labels — they belong in logs. `environment_id` is the one
label from configuration (one value per configured environment). `Metrics` is the daemon's
registry; `QueueMetrics` alone (plus build info) is the stats-only exporter's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__
from .limits import LIMITS
from .outcome import Outcome

# Launch failure reasons (LaunchError.reason) and workspace failure reasons (WorkspaceError.reason).
LAUNCH_REASONS = ("image_missing", "image_not_allowed", "image_invalid", "runtime_unavailable",
                  "engine_unavailable", "engine_error", "create_failed", "workspace_disk", "limits_not_enforced")
WORKSPACE_REASONS = (
    "invalid_metadata",
    "path_escape",
    "scheme_not_allowed",
    "option_injection",
    "host_not_allowed",
    "ref_not_found",
    "not_found",
    "too_large",
    "digest_mismatch",
    "unreachable",
    "timed_out",
    "auth_failed",
    "fetch_failed",
    "delivery_failed",
)
TOOLS = ("bash", "read", "write", "edit", "glob", "grep", "other")
EGRESS_DECISIONS = ("allowed", "refused", "audit")
# The values of sandboxd.network.broker.Refusal and sandboxd.protocol.Dropped (a unit test keeps them equal).
BROKER_REFUSALS = ("not_assigned", "credential", "route", "bad_request", "body_too_large", "timeout", "upstream")
OUTPUT_DROPS = ("malformed", "oversized", "not_an_event", "rate_limited")
EGRESS_REFUSALS = ("not_allowed", "address", "unresolved", "bad_request", "too_large", "smuggling", "host_mismatch",
                   "header_timeout", "not_tls", "no_sni", "sni_mismatch", "hidden_sni", "hello_timeout", "placeholder",
                   "upstream_tls", "client_tls")
RESTORE_RESULTS = ("hit", "miss", "expired", "corrupt", "discarded")
_FAST_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


def register_build_info(registry: CollectorRegistry) -> Info:
    """`sandboxd_build_info{version}`: which sandboxd is answering."""
    info = Info("sandboxd_build", "sandboxd build information.", registry=registry)
    info.info({"version": __version__})
    return info


class QueueMetrics:
    """The work queue as the stats API reports it, per environment, and the health of that scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r, env = registry, ["environment_id"]
        self.depth = Gauge("sandboxd_queue_depth", "Work items queued and not yet polled.", env, registry=r)
        self.pending = Gauge("sandboxd_queue_pending", "Work items polled but not yet acknowledged.", env, registry=r)
        self.oldest_age = Gauge(
            "sandboxd_queue_oldest_age_seconds", "Age of the oldest queued or pending work item (0 when empty).",
            env, registry=r,
        )
        self.workers_polling = Gauge(
            "sandboxd_queue_workers_polling", "Workers that polled in the last 30 seconds.", env, registry=r
        )
        self.up = Gauge(
            "sandboxd_queue_stats_up", "1 if the last queue-stats scrape succeeded, else 0.", env, registry=r
        )
        self.errors = Counter(
            "sandboxd_queue_stats_errors_total", "Queue-stats scrapes that failed.", env, registry=r
        )
        self.last_success = Gauge(
            "sandboxd_queue_stats_last_success_timestamp_seconds", "Unix time of the last successful scrape.",
            env, registry=r,
        )

    def add_environment(self, environment_id: str) -> None:
        """Create the environment's series (up=0 until the first scrape succeeds)."""
        for family in (self.depth, self.pending, self.oldest_age, self.workers_polling, self.last_success):
            family.labels(environment_id)
        self.up.labels(environment_id).set(0)
        self.errors.labels(environment_id)

    @classmethod
    def exporter_registry(cls) -> tuple[QueueMetrics, CollectorRegistry]:
        """The stats-only exporter's registry: build info and the queue gauges, no daemon metrics."""
        registry = CollectorRegistry()
        register_build_info(registry)
        return cls(registry), registry


class Metrics:
    """The daemon's metrics, registered on their own registry (tests build as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = register_build_info(r)
        self.sessions_running = Gauge("sandboxd_sessions_running", "Sessions running now.", registry=r)
        self.sessions_capacity = Gauge("sandboxd_sessions_capacity", "Sessions this daemon runs at once.", registry=r)
        self.work_items_claimed = Counter(
            "sandboxd_work_items_claimed_total", "Work items claimed from the queue, by type.", ["type"], registry=r
        )
        self.sessions_finished = Counter(
            "sandboxd_sessions_finished_total", "Sessions finished, by outcome.", ["outcome"], registry=r
        )
        self.launch_errors = Counter(
            "sandboxd_container_launch_errors_total", "Sandbox containers that failed to start.", ["reason"], registry=r
        )
        self.workspace_failures = Counter(
            "sandboxd_workspace_failures_total", "Workspaces that could not be prepared.", ["reason"], registry=r
        )
        self.poll_errors = Counter("sandboxd_poll_errors_total", "Failed work-queue poll requests.", registry=r)
        self.polls = Counter("sandboxd_polls_total", "Work-queue poll requests answered.", registry=r)
        self.last_poll_success = Gauge(
            "sandboxd_last_poll_success_timestamp_seconds", "Unix time of the last successful poll.", registry=r
        )
        self.claim_to_start = Histogram(
            "sandboxd_claim_to_start_seconds", "From claim to the sandbox holding the work.",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.workspace_duration = Histogram(
            "sandboxd_workspace_prepare_seconds", "Time to prepare a session's workspace.",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.session_duration = Histogram(
            "sandboxd_session_duration_seconds", "From claim to the end of the session.",
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.claim_to_first_heartbeat = Histogram(
            "sandboxd_claim_to_first_heartbeat_seconds",
            "From the claim to the sandbox's first accepted heartbeat, as the daemon sees it.",
            ["source"], buckets=_FAST_BUCKETS, registry=r,
        )
        self.tool_calls = Counter(
            "sandboxd_tool_calls_total", "Tool calls the sandboxes ran, by tool and outcome.", ["tool", "outcome"],
            registry=r,
        )
        self.tool_duration = Histogram(
            "sandboxd_tool_call_duration_seconds", "Duration of tool calls, by tool.", ["tool"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.sessions_stalled = Gauge(
            "sandboxd_sessions_stalled", "Sessions whose tool call or silence outlasted the stall settings.",
            registry=r,
        )
        self.disk_limit_stops = Counter(
            "sandboxd_workspace_disk_limit_stops_total", "Sessions stopped for a /workspace over its size limit.",
            registry=r,
        )
        self.sessions_adopted = Counter(
            "sandboxd_sessions_adopted_total", "Running sessions a starting daemon took over from an earlier one.",
            registry=r,
        )
        self.pool_size = Gauge("sandboxd_pool_size", "Configured warm pool size.", registry=r)
        self.pool_ready = Gauge("sandboxd_pool_ready", "Warm pool members ready for an assignment.", registry=r)
        self.pool_acquisitions = Counter(
            "sandboxd_pool_acquisitions_total", "Claimed items served from the pool (hit) or cold (miss).",
            ["result"], registry=r,
        )
        self.pool_creations = Counter(
            "sandboxd_pool_creations_total", "Warm pool members created, by result.", ["result"], registry=r
        )
        self.workspace_saves = Counter(
            "sandboxd_workspace_saves_total", "Workspaces saved for a session's next work item, by result.",
            ["result"], registry=r,
        )
        self.workspace_restores = Counter(
            "sandboxd_workspace_restores_total", "Workspace restores at a session's next work item, by result.",
            ["result"], registry=r,
        )
        self.workspace_transfer_seconds = Histogram(
            "sandboxd_workspace_transfer_seconds", "Time to save or restore a workspace.", ["direction"],
            buckets=_DURATION_BUCKETS, registry=r,
        )
        self.workspace_transfer_bytes = Counter(
            "sandboxd_workspace_transfer_bytes_total", "Uncompressed workspace bytes saved or restored.",
            ["direction"], registry=r,
        )
        self.egress_requests = Counter(
            "sandboxd_egress_requests_total", "Egress proxy decisions.", ["decision"], registry=r
        )
        self.disk_check_failures = Counter(
            "sandboxd_disk_check_failures_total",
            "Workspace size polls that failed or timed out (no sandbox was checked that round).", registry=r,
        )
        self.broker_refused = Counter(
            "sandboxd_broker_refused_total", "API broker requests refused, by reason.", ["reason"], registry=r
        )
        self.egress_refused = Counter(
            "sandboxd_egress_refused_total", "Egress proxy refusals, by reason.", ["reason"], registry=r
        )
        # `rule` is an operator-named credential rule (bounded by the configuration); its series are made at start.
        self.egress_credentials_injected = Counter(
            "sandboxd_egress_credentials_injected_total", "Requests the egress proxy injected a credential into.",
            ["rule"], registry=r,
        )
        self.sandbox_output_dropped = Counter(
            "sandboxd_sandbox_output_dropped_total",
            "Lines of a sandbox's stdout that were not events (malformed, oversized, binary).", ["reason"],
            registry=r,
        )
        self.limits_unenforced = Gauge(
            "sandboxd_limits_unenforced",
            "1 when the engine does not enforce this sandbox limit (memory, pids, cpu): sessions are refused, "
            "or run without it under allow_unenforced_limits.", ["limit"], registry=r,
        )
        for limit in LIMITS:
            self.limits_unenforced.labels(limit).set(0)
        self.queue = QueueMetrics(r)
        self._create_series()

    def _create_series(self) -> None:
        """Every bounded label value up front, so each series exists before its first event."""
        series: list[tuple[Counter | Histogram, list[tuple[str, ...]]]] = [
            (self.sessions_finished, [(o.value,) for o in Outcome]),
            (self.launch_errors, [(r,) for r in LAUNCH_REASONS]),
            (self.workspace_failures, [(r,) for r in WORKSPACE_REASONS]),
            (self.work_items_claimed, [("session",), ("healthcheck",), ("other",)]),
            (self.tool_duration, [(t,) for t in TOOLS]),
            (self.tool_calls, [(t, o) for t in TOOLS for o in ("ok", "error")]),
            (self.claim_to_first_heartbeat, [("pool",), ("cold",), ("adopted",)]),
            (self.pool_acquisitions, [("hit",), ("miss",)]),
            (self.pool_creations, [("ok",), ("failed",)]),
            (self.workspace_saves, [("ok",), ("failed",)]),
            (self.workspace_restores, [(r,) for r in RESTORE_RESULTS]),
            (self.workspace_transfer_seconds, [("save",), ("restore",)]),
            (self.workspace_transfer_bytes, [("save",), ("restore",)]),
            (self.egress_requests, [(d,) for d in EGRESS_DECISIONS]),
            (self.broker_refused, [(r,) for r in BROKER_REFUSALS]),
            (self.egress_refused, [(r,) for r in EGRESS_REFUSALS]),
            (self.sandbox_output_dropped, [(r,) for r in OUTPUT_DROPS]),
        ]
        for family, values in series:
            for labels in values:
                family.labels(*labels)

    @staticmethod
    def tool_label(name: str) -> str:
        """A bounded label for a tool name (custom tools count as `other`)."""
        return name if name in TOOLS else "other"
