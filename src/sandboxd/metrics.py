"""Every Prometheus metric sandboxd exports, in one module: prefix `sandboxd_`, base units.

Label values are bounded enums created up front (so a series exists before its first event);
session and work ids never become labels — they belong in logs. `environment_id` is the one
label from configuration (one value per configured environment). `Metrics` is the daemon's
registry; `QueueMetrics` alone (plus build info) is the stats-only exporter's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__
from .outcome import Outcome

# Launch failure reasons (LaunchError.reason) and workspace failure reasons (WorkspaceError.reason).
LAUNCH_REASONS = ("image_missing", "engine_unavailable", "engine_error", "create_failed")
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
        self.queue = QueueMetrics(r)
        for outcome in Outcome:
            self.sessions_finished.labels(outcome.value)
        for reason in LAUNCH_REASONS:
            self.launch_errors.labels(reason)
        for reason in WORKSPACE_REASONS:
            self.workspace_failures.labels(reason)
        for kind in ("session", "healthcheck", "other"):
            self.work_items_claimed.labels(kind)
