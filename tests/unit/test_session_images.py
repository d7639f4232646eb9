"""A session's own image: chosen from its metadata before any container, cold-started, refused cleanly."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from anthropic.types.beta.environments import BetaSelfHostedWork

from sandboxd.health import HealthState
from sandboxd.images import ImagePolicy
from sandboxd.outcome import Outcome
from tests.unit.fakes import FakeBackend, FakeQueue, work_item
from tests.unit.test_daemon import _daemon

pytestmark = pytest.mark.anyio
DEFAULT = "sandboxd-sandbox:test"


@dataclass
class _PerItemQueue(FakeQueue):
    by_item: dict[str, dict[str, str]] = field(default_factory=dict)

    async def session_metadata(self, item: BetaSelfHostedWork) -> Mapping[str, str]:
        return self.by_item.get(item.id, {})


def _outcomes(summary: object) -> dict[str, Outcome]:
    return {r.work_id: r.outcome for r in summary.results}  # type: ignore[attr-defined]


async def test_allowed_image_starts_cold_and_a_refused_one_starts_nothing() -> None:
    queue = _PerItemQueue(items=[work_item(n) for n in (1, 2, 3, 4)], by_item={
        "work_2": {"image": "python:3.13"},
        "work_3": {"image": "registry.example.com/evil:1"},
        "work_4": {"image": "not a reference"},
    })
    backend = FakeBackend()
    policy = ImagePolicy.of(DEFAULT, ["python:3.*"])
    daemon, metrics = _daemon(queue, backend, pool_size=1, images=policy)

    summary = await daemon.run(drain=True)

    outcomes = _outcomes(summary)
    assert outcomes["work_1"] is Outcome.SUCCEEDED and outcomes["work_2"] is Outcome.SUCCEEDED
    assert outcomes["work_3"] is Outcome.LAUNCH_FAILED and outcomes["work_4"] is Outcome.LAUNCH_FAILED
    assert backend.images.count("python:3.13") == 1, backend.images
    assert not {"registry.example.com/evil:1", "not a reference"} & set(map(str, backend.images))
    assert sorted(queue.stopped) == ["work_3", "work_4"], "refused items are stopped by the daemon, once each"
    assert metrics.launch_errors.labels("image_not_allowed")._value.get() == 1
    assert metrics.launch_errors.labels("image_invalid")._value.get() == 1
    reasons = {r.work_id: r.reason for r in summary.results}
    assert "not in allowed_images" in str(reasons["work_3"])


async def test_without_an_allow_list_a_named_image_is_refused_and_the_default_serves() -> None:
    queue = _PerItemQueue(items=[work_item(1), work_item(2)], by_item={"work_2": {"image": "python:3.13"}})
    backend = FakeBackend()
    daemon, metrics = _daemon(queue, backend, pool_size=1)

    summary = await daemon.run(drain=True)

    outcomes = _outcomes(summary)
    assert outcomes == {"work_1": Outcome.SUCCEEDED, "work_2": Outcome.LAUNCH_FAILED}
    assert "python:3.13" not in backend.images
    assert queue.stopped == ["work_2"]
    assert "allowed_images is empty" in str({r.work_id: r.reason for r in summary.results}["work_2"])
    assert metrics.launch_errors.labels("image_not_allowed")._value.get() == 1


def test_readyz_names_a_missing_default_image_and_mentions_a_missing_session_image() -> None:
    health = HealthState(poll_window_seconds=5, engine_ok=True, polling=True,
                         seconds_since_poll=lambda: 0.0)
    health.images = lambda: (False, "sandbox image 'sandboxd-sandbox:latest' is not present")
    assert health.ready() == (False, "sandbox image 'sandboxd-sandbox:latest' is not present")
    health.images = lambda: (True, "image 'python:3.13' unavailable")
    assert health.ready() == (True, "ok (image 'python:3.13' unavailable)")
