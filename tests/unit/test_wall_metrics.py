"""The walls' refusal series: one per reason a wall can count, created before the first refusal."""

from __future__ import annotations

from prometheus_client import generate_latest

from sandboxd.metrics import BROKER_REFUSALS, EGRESS_REFUSALS, OUTPUT_DROPS, Metrics
from sandboxd.network.broker import Refusal
from sandboxd.network.egress import RefusalReason
from sandboxd.protocol import Dropped


def test_the_wall_refusal_series_are_the_walls_own_reasons() -> None:
    assert set(BROKER_REFUSALS) == {r.value for r in Refusal}
    assert set(EGRESS_REFUSALS) == {r.value for r in RefusalReason}
    assert set(OUTPUT_DROPS) == {d.value for d in Dropped}
    text = generate_latest(Metrics().registry).decode()
    for reason in BROKER_REFUSALS:
        assert f'sandboxd_broker_refused_total{{reason="{reason}"}} 0.0' in text
    for reason in EGRESS_REFUSALS:
        assert f'sandboxd_egress_refused_total{{reason="{reason}"}} 0.0' in text
    for reason in OUTPUT_DROPS:
        assert f'sandboxd_sandbox_output_dropped_total{{reason="{reason}"}} 0.0' in text
