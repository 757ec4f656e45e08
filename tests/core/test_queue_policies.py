"""The host's policy per queue: defaults, exact names, patterns, checks."""

from __future__ import annotations

import pytest

from pigeon._core.limits import QueuePolicy
from pigeon._core.queue_policies import QueuePolicies, check_pattern, matches


def test_patterns_match_segments() -> None:
    assert matches("orders.*", "orders.eu")
    assert not matches("orders.*", "orders.eu.paid")
    assert not matches("orders.*", "orders")
    assert matches("orders.>", "orders.eu.paid")
    assert not matches("orders.>", "orders")
    assert matches("*.paid", "eu.paid") and not matches("*.paid", "eu.open")


def test_an_exact_name_beats_patterns_and_patterns_go_in_order() -> None:
    policies = QueuePolicies(
        QueuePolicy(max_attempts=9),
        {
            "orders.>": {"max_attempts": 3},
            "orders.*": {"max_attempts": 4},
            "orders.eu": {"max_attempts": 5, "max_length": 10},
        },
    )
    assert policies.for_queue("orders.eu").max_attempts == 5
    assert policies.for_queue("orders.eu").max_length == 10
    assert policies.for_queue("orders.us").max_attempts == 3  # the first pattern given
    assert policies.for_queue("other").max_attempts == 9
    assert policies.for_queue("other") is policies.default


def test_declaring_again_replaces_the_override_whole() -> None:
    policies = QueuePolicies(QueuePolicy(), {"jobs": {"max_attempts": 2, "max_length": 5}})
    assert policies.for_queue("jobs").max_length == 5
    made = policies.declare("jobs", {"max_prefetch": 7})
    assert made.max_prefetch == 7 and made.max_length is None and made.max_attempts == 0
    assert policies.for_queue("jobs") == made  # the cache saw the change
    assert policies.overrides() == {"jobs": {"max_prefetch": 7}}


def test_a_lease_default_above_its_bound_raises_the_bound() -> None:
    made = QueuePolicies().declare("jobs", {"lease_ttl": 7200, "max_lease_ttl": 60})
    assert made.lease_ttl == 7200.0 and made.max_lease_ttl == 7200.0


@pytest.mark.parametrize(
    ("pattern", "fields", "error"),
    [
        ("jobs", {"max_attempts": -1}, "max_attempts must be an int 0 to"),
        ("jobs", {"max_attempts": True}, "max_attempts must be an int"),
        ("jobs", {"max_prefetch": 0}, "max_prefetch must be an int 1 to"),
        ("jobs", {"max_bytes": 1.5}, "max_bytes must be an int"),
        ("jobs", {"lease_ttl": float("nan")}, "lease_ttl must be 0 to"),
        ("jobs", {"max_lease_ttl": 0}, "max_lease_ttl must be 0 to"),
        ("jobs", {"dead_letter": "x"}, "unknown policy field 'dead_letter'"),
        ("a.>.b", {}, "'>' may only be the last segment"),
        ("a b", {}, "queue name"),
        ("", {}, "queue name"),
    ],
)
def test_bad_overrides_are_refused_and_change_nothing(
    pattern: str, fields: dict[str, object], error: str
) -> None:
    policies = QueuePolicies(QueuePolicy(), {"jobs": {"max_attempts": 2}})
    with pytest.raises(ValueError, match=error):
        policies.declare(pattern, fields)
    assert policies.overrides() == {"jobs": {"max_attempts": 2}}


def test_a_pattern_must_be_text() -> None:
    with pytest.raises(TypeError):
        check_pattern(5)


def test_room_applies_max_length_then_max_bytes() -> None:
    assert QueuePolicy().room(ready=10**6, held_bytes=10**9, count=5, sizes=[1] * 5) == 5
    assert QueuePolicy(max_length=3).room(ready=1, held_bytes=0, count=5, sizes=[1] * 5) == 2
    assert QueuePolicy(max_length=3).room(ready=4, held_bytes=0, count=5, sizes=[1] * 5) == 0
    # 1,000 bytes free: 600 fits, the next 600 crosses the line and is taken, then none.
    by_bytes = QueuePolicy(max_bytes=1000)
    assert by_bytes.room(ready=0, held_bytes=0, count=3, sizes=[600] * 3) == 2
    assert by_bytes.room(ready=0, held_bytes=1000, count=3, sizes=[1] * 3) == 0
    both = QueuePolicy(max_length=1, max_bytes=1000)
    assert both.room(ready=0, held_bytes=0, count=3, sizes=[10] * 3) == 1
