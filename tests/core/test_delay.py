"""The not-before rules (``pigeon._core.delay``) and the ledger's Rule 9,
with a fake clock: no event loop, no sleeping."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon._core import delay, headers
from pigeon._core.ledger import QueueLedger
from pigeon._core.queue_policies import QueuePolicies
from pigeon.message import make_message

NOW = 1_700_000_000.0


def test_no_delay_writes_no_header() -> None:
    assert delay.not_before_header(None, None, NOW, 100.0) == {}


def test_a_delay_becomes_a_wall_clock_time() -> None:
    header = delay.not_before_header(2.5, None, NOW, 100.0)
    assert float(header[headers.NOT_BEFORE]) == NOW + 2.5


def test_a_time_is_kept_as_given() -> None:
    header = delay.not_before_header(None, NOW + 7, NOW, 100.0)
    assert float(header[headers.NOT_BEFORE]) == NOW + 7


@pytest.mark.parametrize("past", [NOW, NOW - 1, 0.0])
def test_a_time_already_passed_means_now(past: float) -> None:
    assert delay.not_before_header(None, past, NOW, 100.0) == {}
    assert delay.not_before_header(0, None, NOW, 100.0) == {}


@pytest.mark.parametrize(
    ("delay_", "not_before", "rule"),
    [
        (1.0, NOW + 1, "not both"),
        (-1.0, None, ">= 0"),
        (math.nan, None, ">= 0"),
        (math.inf, None, ">= 0"),
        ("1", None, ">= 0"),
        (True, None, ">= 0"),
        (None, math.nan, "finite time"),
        (None, "tomorrow", "finite time"),
        (101.0, None, "max_delay=100"),
        (None, NOW + 101, "max_delay=100"),
    ],
)
def test_bad_input_is_refused_naming_the_rule(
    delay_: object, not_before: object, rule: str
) -> None:
    with pytest.raises(ValueError, match=rule):
        delay.not_before_header(delay_, not_before, NOW, 100.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "reading", "wait"),
    [
        (None, delay.Reading.NONE, 0.0),
        (repr(NOW - 5), delay.Reading.NONE, 0.0),
        (repr(NOW + 5), delay.Reading.WAIT, 5.0),
        (repr(NOW + 500), delay.Reading.CLAMPED, 100.0),
        ("nan", delay.Reading.BAD, 0.0),
        ("inf", delay.Reading.BAD, 0.0),
        ("soon", delay.Reading.BAD, 0.0),
        ("", delay.Reading.BAD, 0.0),
    ],
)
def test_a_host_reads_a_peers_header_defensively(
    value: str | None, reading: delay.Reading, wait: float
) -> None:
    found = {} if value is None else {headers.NOT_BEFORE: value}
    assert delay.read(found, NOW, 100.0) == (reading, pytest.approx(wait))


@given(st.text(max_size=30))
def test_any_header_value_reads_within_bounds(value: str) -> None:
    reading, wait = delay.read({headers.NOT_BEFORE: value}, NOW, 100.0)
    assert 0.0 <= wait <= 100.0
    assert (wait > 0) == (reading in (delay.Reading.WAIT, delay.Reading.CLAMPED))


# -- the ledger's Rule 9 ----------------------------------------------------


def later(body: str, at: float) -> object:
    return make_message(body, headers={headers.NOT_BEFORE: repr(at)})


def test_a_message_is_not_handed_out_before_its_time() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 10)
    led.put(later("late", NOW + 5))  # type: ignore[arg-type]
    led.put(make_message("now"))
    assert led.delayed_count == 1
    batches, _ = led.dispatch(100.0, wall=NOW)
    assert [m.decode() for _, ms in batches for m in ms] == ["now"]
    assert led.snapshot()["delayed"] == 1
    assert led.next_wakeup() == pytest.approx(105.0)  # on the caller's clock
    assert led.dispatch(104.9, wall=NOW + 4.9)[0] == []
    batches, _ = led.dispatch(105.0, wall=NOW + 5)
    (message,) = [m for _, ms in batches for m in ms]
    assert message.decode() == "late"
    assert message.attempt == 1 and not message.redelivered
    assert led.stats.scheduled == 1 and led.delayed_count == 0


def test_an_unplaced_message_asks_for_a_dispatch_at_once() -> None:
    led = QueueLedger("q")
    led.put(later("late", NOW + 5))  # type: ignore[arg-type]
    assert led.next_wakeup() == -math.inf
    assert not led.is_idle() and led.has_work()
    led.dispatch(0.0, wall=NOW)  # no consumer: placed all the same
    assert led.next_wakeup() == pytest.approx(5.0)


def test_a_peers_far_time_is_held_max_delay_only() -> None:
    led = QueueLedger("q", max_delay=60.0)
    led.add_consumer("A", 10)
    led.put(later("far", NOW + 10**6))  # type: ignore[arg-type]
    led.dispatch(0.0, wall=NOW)
    assert led.stats.delay_clamped == 1
    assert led.next_wakeup() == pytest.approx(60.0)


def test_a_bad_header_is_delivered_at_once_and_counted() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 10)
    led.put(make_message("odd", headers={headers.NOT_BEFORE: "tomorrow"}))
    batches, _ = led.dispatch(0.0, wall=NOW)
    assert len(batches[0][1]) == 1
    assert led.stats.bad_not_before == 1


def test_a_stored_message_read_back_still_waits() -> None:
    # After a restart the store gives rows back with ready_at 0 (a Put):
    # the header alone keeps the message waiting.
    led = QueueLedger("q")
    led.add_consumer("A", 10)
    led.page_loaded([(1, later("late", NOW + 5), 0.0)], False, 0.0)  # type: ignore[list-item]
    assert led.dispatch(0.0, wall=NOW)[0] == []
    batches, _ = led.dispatch(5.0, wall=NOW + 5)
    assert [m.decode() for _, ms in batches for m in ms] == ["late"]


def test_a_resend_of_a_delayed_message_is_a_duplicate() -> None:
    led = QueueLedger("q")
    message = later("late", NOW + 5)
    assert led.put(message)  # type: ignore[arg-type]
    assert not led.put(message)  # type: ignore[arg-type]
    assert led.stats.duplicates == 1 and led.delayed_count == 1


def test_max_delay_is_a_queue_policy_field() -> None:
    policies = QueuePolicies()
    assert policies.for_queue("q").max_delay == delay.DEFAULT_MAX_DELAY
    assert policies.declare("reports.*", {"max_delay": 3600}).max_delay == 3600.0
    assert policies.for_queue("reports.daily").max_delay == 3600.0
    with pytest.raises(ValueError, match="max_delay must be"):
        policies.declare("q", {"max_delay": -1})


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "dispatch", "ack_all"]),
            st.floats(min_value=-5, max_value=20),  # not-before, relative to the start
            st.floats(min_value=0, max_value=3),  # time passing
        ),
        max_size=40,
    )
)
def test_nothing_is_handed_out_before_its_time_and_nothing_is_lost(
    steps: list[tuple[str, float, float]],
) -> None:
    # The caller's clock (``now``) and the wall clock move together here,
    # offset as a loop clock and time.time() are.
    led = QueueLedger("q")
    led.add_consumer("A", 1000)
    now, wall = 50.0, NOW
    due: dict[str, float] = {}
    delivered: set[str] = set()
    for action, at, passing in steps:
        now, wall = now + passing, wall + passing
        if action == "put":
            message = later(f"m{len(due)}", NOW + at)
            led.put(message)  # type: ignore[arg-type]
            due[message.id] = NOW + at  # type: ignore[attr-defined]
        else:
            batches, dead = led.dispatch(now, wall=wall)
            assert not dead
            for _, messages in batches:
                for message in messages:
                    assert wall >= due[message.id] - 1e-6, "handed out early"
                    delivered.add(message.id)
            if action == "ack_all":
                for _, messages in batches:
                    led.ack_many([m.id for m in messages], "A")
    # Far enough ahead, everything put has been handed out.
    later_now = now + 100
    batches, _ = led.dispatch(later_now, wall=wall + 100)
    delivered |= {m.id for _, messages in batches for m in messages}
    assert delivered == set(due)
