"""The schedule rules (``pigeon._core.schedule``): period starts, tick ids,
when ticks are sent, repeats. A fake clock: ``now`` is passed in."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon._core.schedule import (
    MAX_LEAD,
    Repeats,
    Schedule,
    check_cron,
    check_every,
    next_tick,
    tick_start_ok,
)


def at(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("every", "now", "start"),
    [
        (2.0, 100.0, 102.0),  # on a boundary: the next one, strictly after
        (2.0, 100.5, 102.0),
        (2.0, 101.999, 102.0),
        (60.0, 59.0, 60.0),
        (0.5, 10.25, 10.5),
    ],
)
def test_every_periods_start_at_multiples_since_the_epoch(
    every: float, now: float, start: float
) -> None:
    assert Schedule("s", every=every).next_start(now) == start


@pytest.mark.parametrize(
    ("expression", "now", "start"),
    [
        ("*/5 * * * *", at(2026, 1, 1, 0, 3), at(2026, 1, 1, 0, 5)),
        ("*/5 * * * *", at(2026, 1, 1, 0, 5), at(2026, 1, 1, 0, 10)),
        ("*/5 * * * *", at(2026, 1, 1, 0, 4) + 59.9, at(2026, 1, 1, 0, 5)),
        ("0 3 * * *", at(2026, 1, 1, 4, 0), at(2026, 1, 2, 3, 0)),
        ("30 12 1 * *", at(2026, 1, 31), at(2026, 2, 1, 12, 30)),
    ],
)
def test_cron_times_are_read_in_utc(expression: str, now: float, start: float) -> None:
    assert Schedule("s", cron=expression).next_start(now) == start


def test_a_cron_period_is_the_gap_to_the_next_time() -> None:
    schedule = Schedule("s", cron="*/5 * * * *")
    assert schedule.period(at(2026, 1, 1, 0, 5)) == 300.0
    assert schedule.lead(at(2026, 1, 1, 0, 5)) == MAX_LEAD


def test_the_lead_is_half_a_short_period() -> None:
    assert Schedule("s", every=2.0).lead(10.0) == 1.0


def test_every_copy_names_a_period_alike() -> None:
    one, other = Schedule("report", every=2.0), Schedule("report", every=2.0)
    # Two copies that started at different times agree on the next tick.
    assert next_tick(one, 100.2, None) == next_tick(other, 100.9, None)
    assert next_tick(one, 100.2, None).message_id == "report@102000"


def test_a_copy_sends_each_period_once_and_skips_missed_ones() -> None:
    schedule = Schedule("s", every=2.0)
    first = next_tick(schedule, 100.2, None)
    assert (first.start, first.send_at) == (102.0, 101.0)
    # Sent; woken again early (same clock reading): the next period, not this one.
    assert next_tick(schedule, 101.0, first.start).start == 104.0
    # Frozen for a while: periods that began meanwhile are skipped (Rule 4).
    assert next_tick(schedule, 109.3, first.start).start == 110.0


@given(
    st.floats(min_value=0.01, max_value=1e5),
    st.floats(min_value=0, max_value=2e9),
)
def test_the_next_start_is_after_now_and_within_a_period(every: float, now: float) -> None:
    schedule = Schedule("s", every=every)
    tick = next_tick(schedule, now, None)
    assert now < tick.start <= now + every * (1 + 1e-9) + 1e-6
    assert tick.send_at < tick.start
    assert tick.start - tick.send_at <= MAX_LEAD


def test_repeats_are_told_apart_and_bounded() -> None:
    repeats = Repeats(keep=3)
    assert repeats.take(1.0)
    assert not repeats.take(1.0)
    for start in (2.0, 3.0, 4.0, 5.0):
        assert repeats.take(start)
    assert len(repeats._taken) == 3  # the oldest went
    assert not repeats.take(5.0)


@pytest.mark.parametrize("seconds", [0, -1, math.nan, math.inf, 0.001, "1", True, 2e9])
def test_a_bad_period_is_refused(seconds: object) -> None:
    with pytest.raises(ValueError, match="every must be"):
        check_every("s", seconds)


@pytest.mark.parametrize(
    "expression", ["*/5 * * *", "61 * * * *", "0 0 30 2 *", "every minute", "", 5]
)
def test_a_bad_cron_expression_is_refused(expression: object) -> None:
    with pytest.raises(ValueError, match="cron expression"):
        check_cron("s", expression)


def test_a_bad_name_is_refused() -> None:
    with pytest.raises(ValueError, match="schedule name"):
        check_every("two words", 1.0)


@pytest.mark.parametrize(
    ("start", "ok"),
    [
        (1000.0, True),  # the period started: a late tick still runs (Rule 4)
        (0.0, True),
        (1000.0 + MAX_LEAD, True),  # as far ahead as a copy sends
        (1000.0 + MAX_LEAD + 29.0, True),  # within the clock slack
        (1000.0 + 86_400.0, False),  # would hold the queue for a day
        (math.inf, False),
        (math.nan, False),
    ],
)
def test_a_tick_start_a_peer_sent_is_range_checked(start: float, ok: bool) -> None:
    assert tick_start_ok(start, now=1000.0) is ok
