"""RetryPolicy, retry_delay and on_failure."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon._core.backoff import (
    DeadLetter,
    Retry,
    RetryPolicy,
    TryWindow,
    on_failure,
    retry_delay,
)
from pigeon.errors import ConfigurationError

NO_JITTER = RetryPolicy(max_attempts=10, base_delay=0.5, max_delay=10.0, factor=2.0, jitter=0.0)


def test_defaults_are_valid_and_frozen() -> None:
    p = RetryPolicy()
    fields = (p.max_attempts, p.base_delay, p.max_delay, p.factor, p.jitter)
    assert fields == (5, 0.1, 30.0, 2.0, 0.5)
    with pytest.raises(AttributeError):
        p.max_attempts = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (9, 10.0)],
)
def test_delay_grows_by_factor_and_is_capped(attempt: int, expected: float) -> None:
    assert retry_delay(NO_JITTER, attempt, 0.7) == pytest.approx(expected)


def test_attempt_zero_or_negative_uses_the_base_delay() -> None:
    assert retry_delay(NO_JITTER, 0, 0.0) == 0.5
    assert retry_delay(NO_JITTER, -3, 0.0) == 0.5


def test_factor_one_is_constant() -> None:
    p = RetryPolicy(base_delay=0.25, factor=1.0, jitter=0.0)
    assert {retry_delay(p, a, 0.3) for a in range(1, 20)} == {0.25}


def test_jitter_is_downwards_only() -> None:
    p = RetryPolicy(base_delay=4.0, max_delay=100.0, factor=2.0, jitter=0.5)
    assert retry_delay(p, 1, 0.0) == 4.0
    assert retry_delay(p, 1, 0.5) == pytest.approx(3.0)
    assert retry_delay(p, 1, 0.999999) == pytest.approx(2.0, abs=1e-5)
    full = RetryPolicy(base_delay=4.0, jitter=1.0)
    assert retry_delay(full, 1, 0.0) == 4.0
    assert retry_delay(full, 1, 0.75) == pytest.approx(1.0)


def test_zero_delays_are_allowed() -> None:
    p = RetryPolicy(base_delay=0.0, max_delay=0.0)
    assert retry_delay(p, 3, 0.4) == 0.0
    assert on_failure(p, 1, "e", 0.4) == Retry(0.0)


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_verdict_turns_to_dead_letter_at_max_attempts(max_attempts: int) -> None:
    p = RetryPolicy(max_attempts=max_attempts, base_delay=1.0, jitter=0.0)
    verdicts = [on_failure(p, a, "KeyError: 'x'", 0.0) for a in range(1, max_attempts + 2)]
    assert all(isinstance(v, Retry) for v in verdicts[: max_attempts - 1])
    for v in verdicts[max_attempts - 1 :]:
        assert isinstance(v, DeadLetter)
    last = verdicts[max_attempts - 1]
    assert isinstance(last, DeadLetter)
    assert f"{max_attempts} of {max_attempts}" in last.reason
    assert "KeyError: 'x'" in last.reason


def test_retry_carries_the_jittered_delay() -> None:
    p = RetryPolicy(max_attempts=5, base_delay=2.0, factor=3.0, jitter=0.5)
    assert on_failure(p, 2, "e", 0.5) == Retry(pytest.approx(6.0 * 0.75))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": 2.5},
        {"max_attempts": "3"},
        {"base_delay": -0.1},
        {"max_delay": -1.0},
        {"factor": 0.5},
        {"factor": 0.0},
        {"jitter": -0.01},
        {"jitter": 1.01},
        {"jitter": math.nan},
    ],
    ids=repr,
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["base_delay", "max_delay", "factor"])
def test_nan_is_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**{name: math.nan})  # type: ignore[arg-type]


@pytest.mark.parametrize("attempt", [1100, 10_000])
def test_large_attempts_are_capped_not_overflowing(attempt: int) -> None:
    p = RetryPolicy(max_attempts=100_000, base_delay=0.1, max_delay=30.0, factor=2.0, jitter=0.0)
    assert retry_delay(p, attempt, 0.0) == 30.0
    assert on_failure(p, attempt, "e", 0.0) == Retry(30.0)


policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 50),
    base_delay=st.floats(0, 10, allow_nan=False),
    max_delay=st.floats(0, 100, allow_nan=False),
    factor=st.floats(1, 4, allow_nan=False),
    jitter=st.floats(0, 1, allow_nan=False),
)
rands = st.floats(0, 1, exclude_max=True, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(policy=policies, attempt=st.integers(1, 60), rand=rands)
def test_delay_is_within_jitter_bounds_of_the_capped_delay(
    policy: RetryPolicy, attempt: int, rand: float
) -> None:
    capped = min(policy.max_delay, policy.base_delay * policy.factor ** (attempt - 1))
    d = retry_delay(policy, attempt, rand)
    assert 0.0 <= d <= policy.max_delay
    assert capped * (1 - policy.jitter) - 1e-9 <= d <= capped + 1e-9


@settings(max_examples=200, deadline=None)
@given(policy=policies, attempt=st.integers(1, 59))
def test_unjittered_delay_never_shrinks_with_attempts(policy: RetryPolicy, attempt: int) -> None:
    assert retry_delay(policy, attempt, 0.0) <= retry_delay(policy, attempt + 1, 0.0)


@settings(max_examples=200, deadline=None)
@given(policy=policies, attempt=st.integers(1, 60), rand=rands)
def test_verdict_depends_only_on_attempt_vs_max(
    policy: RetryPolicy, attempt: int, rand: float
) -> None:
    verdict = on_failure(policy, attempt, "err", rand)
    if attempt >= policy.max_attempts:
        assert isinstance(verdict, DeadLetter) and "err" in verdict.reason
    else:
        assert verdict == Retry(retry_delay(policy, attempt, rand))


def test_a_try_window_opens_at_the_first_failure_and_closes_after_its_seconds() -> None:
    window = TryWindow(3.0, 0.25)
    assert not window.opened and window.left(100.0) == 3.0
    assert window.again(100.0)  # the first failure opens it
    assert window.opened and window.left(101.0) == 2.0
    assert window.again(102.999)
    assert not window.again(103.0)  # closed: the failure stands
    assert window.left(104.0) == 0.0
