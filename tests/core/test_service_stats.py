"""Service counters: percentiles from fixed buckets, bounded by names."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from pigeon._core.service_stats import (
    BASE,
    BUCKETS,
    GROWTH,
    ServiceCounts,
    ServiceTally,
    bucket_of,
    upper_edge,
)


def test_no_calls_no_percentiles() -> None:
    assert ServiceTally().snapshot() == {"calls": 0, "errors": 0, "p50_ms": None, "p99_ms": None}


@given(st.floats(min_value=BASE, max_value=100.0))
def test_a_percentile_is_at_most_one_bucket_above_the_true_value(seconds: float) -> None:
    tally = ServiceTally()
    tally.record(seconds, failed=False)
    p50 = tally.percentile(0.5)
    assert p50 is not None
    assert seconds <= p50 * (1 + 1e-9) <= seconds * GROWTH * (1 + 1e-9)


def test_odd_latencies_land_in_the_end_buckets() -> None:
    assert bucket_of(-1.0) == bucket_of(math.nan) == bucket_of(0.0) == 0
    assert bucket_of(1e9) == BUCKETS and upper_edge(BUCKETS) == math.inf


def test_p50_and_p99_split_fast_and_slow_calls() -> None:
    tally = ServiceTally()
    for _ in range(98):
        tally.record(0.001, failed=False)
    for _ in range(2):
        tally.record(0.5, failed=True)
    snap = tally.snapshot()
    assert snap["calls"] == 100 and snap["errors"] == 2
    assert 1.0 <= snap["p50_ms"] <= 1.25
    assert 500.0 <= snap["p99_ms"] <= 625.0


def test_names_beyond_the_bound_are_counted_not_kept() -> None:
    counts = ServiceCounts(max_services=2)
    for name in ("a", "b", "c", "c"):
        counts.record(name, 0.01, failed=False)
    assert sorted(counts.snapshot()) == ["a", "b"]
    assert counts.untracked == 2
