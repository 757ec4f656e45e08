"""QueueLedger: one table row per transition, then the credit, redelivery,
dead-letter, stale-settle and wakeup rules, each on its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon._core.ledger import DEAD_SUFFIX, QueueLedger, dead_letter_queue
from pigeon.errors import LocalProtocolError
from pigeon.message import Message

TTL = 10.0


def msg(mid: str, **kwargs: Any) -> Message:
    return Message(id=mid, body=b"body-" + mid.encode(), **kwargs)


def ids(messages: list[Message]) -> list[str]:
    return [m.id for m in messages]


def delivered(batches: list[tuple[Any, list[Message]]]) -> dict[Any, list[str]]:
    return {cid: ids(msgs) for cid, msgs in batches}


def counts(ledger: QueueLedger) -> tuple[int, int, int]:
    return ledger.ready_count, ledger.delayed_count, ledger.in_flight_count


def stat_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# -- the transition table ------------------------------------------------------


def start(state: str) -> QueueLedger:
    """A ledger with consumers A and B (prefetch 2) and message m in ``state``."""
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 2)
    led.add_consumer("B", 2)
    if state == "empty":
        return led
    led.put(msg("m"))
    if state == "ready":
        return led
    batches, dead = led.dispatch(0.0)
    assert delivered(batches) == {"A": ["m"]} and dead == []
    if state == "in_flight":
        return led
    if state == "acked":
        assert led.ack("m", "A")
        return led
    if state == "delayed":
        assert led.nack("m", "A", 1.0, delay=5.0) is not None
        return led
    raise AssertionError(state)


@dataclass
class Row:
    state: str
    op: Callable[[QueueLedger], Any]
    returns: Callable[[Any], bool]
    after: tuple[int, int, int]  # ready, delayed, in flight
    stats: dict[str, int] = field(default_factory=dict)


def _is_dead(reason: str) -> Callable[[Any], bool]:
    def check(m: Any) -> bool:
        return (
            isinstance(m, Message)
            and m.id == "m"
            and m.headers["x-pigeon-dead-reason"] == reason
            and m.headers["x-pigeon-dead-queue"] == "q"
            and m.headers["x-pigeon-attempts"] == "1"
        )

    return check


TABLE = {
    "put new": Row(
        "empty", lambda led: led.put(msg("m")), lambda r: r is True, (1, 0, 0), {"received": 1}
    ),
    "put duplicate of ready": Row(
        "ready", lambda led: led.put(msg("m")), lambda r: r is False, (1, 0, 0), {"duplicates": 1}
    ),
    "put duplicate of in-flight": Row(
        "in_flight",
        lambda led: led.put(msg("m")),
        lambda r: r is False,
        (0, 0, 1),
        {"duplicates": 1},
    ),
    "put duplicate of acked": Row(
        "acked", lambda led: led.put(msg("m")), lambda r: r is False, (0, 0, 0), {"duplicates": 1}
    ),
    "put duplicate of delayed": Row(
        "delayed", lambda led: led.put(msg("m")), lambda r: r is False, (0, 1, 0), {"duplicates": 1}
    ),
    "dispatch ready": Row(
        "ready",
        lambda led: delivered(led.dispatch(0.0)[0]),
        lambda r: r == {"A": ["m"]},
        (0, 0, 1),
        {"delivered": 1},
    ),
    "dispatch with nothing ready": Row(
        "in_flight", lambda led: led.dispatch(1.0), lambda r: r == ([], []), (0, 0, 1)
    ),
    "ack": Row(
        "in_flight", lambda led: led.ack("m", "A"), lambda r: r is True, (0, 0, 0), {"acked": 1}
    ),
    "nack now": Row(
        "in_flight",
        lambda led: led.nack("m", "A", 1.0),
        lambda r: r.id == "m" and r.redelivered,
        (1, 0, 0),
        {"nacked": 1},
    ),
    "nack with delay": Row(
        "in_flight",
        lambda led: led.nack("m", "A", 1.0, delay=3.0),
        lambda r: r.id == "m" and r.redelivered,
        (0, 1, 0),
        {"nacked": 1},
    ),
    "nack with reason": Row(
        "in_flight",
        lambda led: led.nack("m", "A", 1.0, reason="boom"),
        lambda r: r.headers == {"x-pigeon-last-error": "boom"},
        (1, 0, 0),
        {"nacked": 1},
    ),
    "reject": Row(
        "in_flight",
        lambda led: led.reject("m", "A", "bad input"),
        _is_dead("bad input"),
        (0, 0, 0),
        {"dead_lettered": 1},
    ),
    "extend": Row(
        "in_flight",
        lambda led: (led.extend("m", "A", 4.0), led.next_wakeup()),
        lambda r: r == (True, 4.0 + TTL),
        (0, 0, 1),
    ),
    "expire due lease": Row(
        "in_flight", lambda led: led.expire(TTL), lambda r: r == 1, (1, 0, 0), {"expired": 1}
    ),
    "expire before due": Row(
        "in_flight", lambda led: led.expire(TTL - 0.001), lambda r: r == 0, (0, 0, 1)
    ),
    "remove holder, lost": Row(
        "in_flight",
        lambda led: led.remove_consumer("A", lost=True),
        lambda r: r == 1,
        (1, 0, 0),
        {"consumers_lost": 1, "consumers": -1},
    ),
    "remove holder, cancelled": Row(
        "in_flight",
        lambda led: led.remove_consumer("A"),
        lambda r: r == 1,
        (1, 0, 0),
        {"consumers": -1},
    ),
    "remove other consumer": Row(
        "in_flight",
        lambda led: led.remove_consumer("B", lost=True),
        lambda r: r == 0,
        (0, 0, 1),
        {"consumers_lost": 1, "consumers": -1},
    ),
    "remove unknown consumer": Row(
        "in_flight", lambda led: led.remove_consumer("Z", lost=True), lambda r: r == 0, (0, 0, 1)
    ),
    "delayed not yet due": Row(
        "delayed", lambda led: led.dispatch(5.999), lambda r: r == ([], []), (0, 1, 0)
    ),
    "delayed due": Row(
        "delayed",
        lambda led: delivered(led.dispatch(6.0)[0]),
        lambda r: list(r.values()) == [["m"]],
        (0, 0, 1),
        {"delivered": 1, "redelivered": 1},
    ),
    "restore now": Row("empty", lambda led: led.restore(msg("m")), lambda r: r is None, (1, 0, 0)),
    "restore later": Row(
        "empty", lambda led: led.restore(msg("m"), ready_at=7.0), lambda r: r is None, (0, 1, 0)
    ),
    "ack after ack": Row(
        "acked",
        lambda led: led.ack("m", "A"),
        lambda r: r is False,
        (0, 0, 0),
        {"stale_settles": 1},
    ),
    "ack by wrong consumer": Row(
        "in_flight",
        lambda led: led.ack("m", "B"),
        lambda r: r is False,
        (0, 0, 1),
        {"stale_settles": 1},
    ),
    "nack by wrong consumer": Row(
        "in_flight",
        lambda led: led.nack("m", "B", 1.0),
        lambda r: r is None,
        (0, 0, 1),
        {"stale_settles": 1},
    ),
    "reject by wrong consumer": Row(
        "in_flight",
        lambda led: led.reject("m", "B", "x"),
        lambda r: r is None,
        (0, 0, 1),
        {"stale_settles": 1},
    ),
    "extend by wrong consumer": Row(
        "in_flight",
        lambda led: led.extend("m", "B", 1.0),
        lambda r: r is False,
        (0, 0, 1),
        {"stale_settles": 1},
    ),
    "ack of a delayed message": Row(
        "delayed",
        lambda led: led.ack("m", "A"),
        lambda r: r is False,
        (0, 1, 0),
        {"stale_settles": 1},
    ),
    "ack of an unknown id": Row(
        "empty",
        lambda led: led.ack("nope", "A"),
        lambda r: r is False,
        (0, 0, 0),
        {"stale_settles": 1},
    ),
}


@pytest.mark.parametrize("row", TABLE.values(), ids=TABLE.keys())
def test_transition(row: Row) -> None:
    led = start(row.state)
    before = led.snapshot()
    result = row.op(led)
    assert row.returns(result), result
    assert counts(led) == row.after
    assert stat_delta(before, led.snapshot()) == {**row.stats, **_depth_delta(before, row.after)}


def _depth_delta(before: dict[str, int], after: tuple[int, int, int]) -> dict[str, int]:
    out = {}
    for key, value in zip(("ready", "delayed", "in_flight"), after, strict=True):
        if value != before[key]:
            out[key] = value - before[key]
    return out


def test_dead_letter_queue_name() -> None:
    assert dead_letter_queue("jobs") == "jobs" + DEAD_SUFFIX == "jobs.dead"


def test_ack_restores_credit_and_forgets_the_message() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 1)
    for mid in ("a", "b"):
        led.put(msg(mid))
    assert delivered(led.dispatch(0.0)[0]) == {"A": ["a"]}
    assert led.dispatch(0.0) == ([], [])
    assert led.ack("a", "A")
    assert delivered(led.dispatch(1.0)[0]) == {"A": ["b"]}
    assert led.ack("b", "A")
    # a forgets nothing but the message: nothing is left to do or to time out
    assert counts(led) == (0, 0, 0)
    assert not led.has_work()
    assert led.next_wakeup() is None
    assert led.expire(1e9) == 0


def test_nack_now_goes_to_the_front() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 1)
    for mid in ("a", "b", "c"):
        led.put(msg(mid))
    led.dispatch(0.0)
    led.nack("a", "A", 1.0)
    assert ids(led.dispatch(1.0)[0][0][1]) == ["a"]


def test_delayed_message_joins_the_back_when_due() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 1)
    led.put(msg("a"))
    led.dispatch(0.0)
    led.nack("a", "A", 0.0, delay=2.0)
    led.put(msg("b"))
    assert led.has_work() and led.delayed_count == 1
    assert delivered(led.dispatch(1.0)[0]) == {"A": ["b"]}
    led.ack("b", "A")
    assert delivered(led.dispatch(2.0)[0]) == {"A": ["a"]}


def test_delayed_messages_come_due_in_due_order() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 3)
    for mid in ("a", "b", "c"):
        led.put(msg(mid))
    led.dispatch(0.0)
    led.nack("a", "A", 0.0, delay=3.0)
    led.nack("b", "A", 0.0, delay=1.0)
    led.nack("c", "A", 0.0, delay=2.0)
    assert led.next_wakeup() == 1.0
    assert delivered(led.dispatch(2.0)[0]) == {"A": ["b", "c"]}
    assert delivered(led.dispatch(3.0)[0]) == {"A": ["a"]}


def test_nack_reason_keeps_other_headers() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 1)
    led.put(msg("a", headers={"trace": "t1"}))
    led.dispatch(0.0)
    out = led.nack("a", "A", 0.0, reason="oops")
    assert out is not None
    assert out.headers == {"trace": "t1", "x-pigeon-last-error": "oops"}
    # an empty reason leaves the headers as they are
    led.dispatch(0.0)
    out = led.nack("a", "A", 0.0, reason="")
    assert out is not None and out.headers == {"trace": "t1", "x-pigeon-last-error": "oops"}


def test_expired_and_returned_leases_keep_their_order_at_the_front() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 3)
    for mid in ("a", "b", "c", "d", "e"):
        led.put(msg(mid))
    led.dispatch(0.0)
    assert led.expire(TTL) == 3
    led.add_consumer("B", 5)
    led.remove_consumer("A")
    assert delivered(led.dispatch(TTL)[0]) == {"B": ["a", "b", "c", "d", "e"]}
    assert led.remove_consumer("B", lost=True) == 5
    led.add_consumer("C", 5)
    assert delivered(led.dispatch(TTL)[0]) == {"C": ["a", "b", "c", "d", "e"]}


def test_remove_consumer_returns_only_its_own_leases() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 2)
    led.add_consumer("B", 2)
    for mid in "abcd":
        led.put(msg(mid))
    got = delivered(led.dispatch(0.0)[0])
    assert got == {"A": ["a", "b"], "B": ["c", "d"]}
    assert led.consumer_count == 2
    assert led.remove_consumer("B", lost=True) == 2
    assert led.consumer_count == 1
    assert counts(led) == (2, 0, 2)
    # B's settles are now stale; A's still count
    assert not led.ack("c", "B")
    assert led.ack("a", "A")
    assert led.stats.stale_settles == 1 and led.stats.acked == 1


def test_restore_marks_redelivered_and_counts_as_seen() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 5)
    led.restore(msg("a"))
    led.restore(msg("b", attempt=2), ready_at=5.0)
    assert led.put(msg("a")) is False and led.put(msg("b")) is False
    out = led.dispatch(5.0)[0][0][1]
    # "a" may have been delivered before the restart: attempt 2 (Rule 2).
    assert [(m.id, m.attempt, m.redelivered) for m in out] == [("a", 2, True), ("b", 3, True)]
    assert led.stats.redelivered == 2
    assert led.stats.received == 0 and led.stats.duplicates == 2


def test_put_does_not_change_a_known_message() -> None:
    led = QueueLedger("q")
    led.put(msg("a"))
    assert not led.put(Message("a", b"other body"))
    led.add_consumer("A", 1)
    assert led.dispatch(0.0)[0][0][1][0].body == b"body-a"


def test_dedupe_window_forgets_the_oldest_acked_ids() -> None:
    # The window keeps the last dedupe_size..2*dedupe_size forgotten ids.
    led = QueueLedger("q", dedupe_size=2)
    led.add_consumer("A", 5)
    for mid in "abcd":
        led.put(msg(mid))
    led.dispatch(0.0)
    for mid in "abcd":
        led.ack(mid, "A")
    assert not led.put(msg("d")) and not led.put(msg("c"))
    assert led.put(msg("a")) and led.put(msg("b"))  # outside the window: accepted as new
    assert led.remember("x") and not led.remember("x")


def test_resend_of_a_held_message_is_a_duplicate_even_outside_the_window() -> None:
    led = QueueLedger("q", dedupe_size=2)
    led.add_consumer("A", 4)
    led.put(msg("a"))
    led.put(msg("b"))
    led.put(msg("c"))  # "a" leaves the window but is still ready
    assert led.put(msg("a")) is False
    assert led.ready_count == 3


def test_resend_of_an_in_flight_message_outside_the_window_is_never_delivered_twice() -> None:
    led = QueueLedger("q", dedupe_size=1)
    led.add_consumer("A", 3)
    led.put(msg("a"))
    led.dispatch(0.0)
    led.put(msg("b"))  # "a" leaves the window while it is in flight
    led.put(msg("a"))  # the producer resends it
    got = delivered(led.dispatch(0.0)[0])
    assert led.ack("a", "A")
    led.ack("b", "A")
    got2 = delivered(led.dispatch(1.0)[0])
    assert "a" not in got.get("A", []) + got2.get("A", [])
    # all settled: the consumer has its whole credit back
    for mid in "cde":
        led.put(msg(mid))
    assert delivered(led.dispatch(2.0)[0]) == {"A": ["c", "d", "e"]}


# -- credit (Rule 1) ----------------------------------------------------------


def test_nothing_is_dispatched_without_consumers() -> None:
    led = QueueLedger("q")
    led.put(msg("a"))
    assert led.dispatch(0.0) == ([], [])
    assert not led.is_dispatchable()
    assert counts(led) == (1, 0, 0) and led.stats.delivered == 0


def test_prefetch_bounds_unsettled_deliveries() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 2)
    for i in range(5):
        led.put(msg(f"m{i}"))
    assert delivered(led.dispatch(0.0)[0]) == {"A": ["m0", "m1"]}
    assert not led.is_dispatchable()
    assert led.dispatch(0.0) == ([], [])
    led.nack("m0", "A", 0.0, delay=1.0)
    assert delivered(led.dispatch(0.0)[0]) == {"A": ["m2"]}
    assert led.dispatch(0.0) == ([], [])
    led.expire(led.lease_ttl)
    assert delivered(led.dispatch(led.lease_ttl)[0]) == {"A": ["m1", "m2"]}


def test_lowering_prefetch_withholds_deliveries_until_settled_below_it() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 3)
    for i in range(6):
        led.put(msg(f"m{i}"))
    led.dispatch(0.0)
    led.add_consumer("A", 1)  # re-subscribe with a smaller prefetch
    assert led.consumer_count == 1
    led.ack("m0", "A")
    assert led.dispatch(0.0) == ([], [])  # 2 unsettled, prefetch 1
    led.ack("m1", "A")
    assert led.dispatch(0.0) == ([], [])  # 1 unsettled
    led.ack("m2", "A")
    assert delivered(led.dispatch(0.0)[0]) == {"A": ["m3"]}


@pytest.mark.parametrize("prefetch", [0, -1])
def test_prefetch_must_be_positive(prefetch: int) -> None:
    led = QueueLedger("q")
    with pytest.raises(LocalProtocolError):
        led.add_consumer("A", prefetch)
    assert led.consumer_count == 0


def test_only_consumers_with_credit_get_messages() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 1)
    led.add_consumer("B", 1)
    led.put(msg("a"))
    led.dispatch(0.0)
    led.put(msg("b"))
    led.put(msg("c"))
    assert delivered(led.dispatch(0.0)[0]) == {"B": ["b"]}
    assert led.ready_count == 1 and not led.is_dispatchable()


def test_round_robin_within_one_dispatch() -> None:
    led = QueueLedger("q")
    for c in "ABC":
        led.add_consumer(c, 10)
    for i in range(9):
        led.put(msg(f"m{i}"))
    got = delivered(led.dispatch(0.0)[0])
    assert {c: len(v) for c, v in got.items()} == {"A": 3, "B": 3, "C": 3}
    assert sorted(sum(got.values(), [])) == [f"m{i}" for i in range(9)]


def test_chunk_serves_consumers_in_rounds() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 10)
    led.add_consumer("B", 10)
    for i in range(8):
        led.put(msg(f"m{i}"))
    got = delivered(led.dispatch(0.0, chunk=2)[0])
    assert got == {"A": ["m0", "m1", "m4", "m5"], "B": ["m2", "m3", "m6", "m7"]}


def test_smaller_credit_gets_smaller_share_rest_goes_elsewhere() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 1)
    led.add_consumer("B", 10)
    for i in range(6):
        led.put(msg(f"m{i}"))
    got = delivered(led.dispatch(0.0)[0])
    assert {c: len(v) for c, v in got.items()} == {"A": 1, "B": 5}


def test_shares_differ_by_at_most_one_when_credit_is_plenty() -> None:
    led = QueueLedger("q")
    for c in "ABCDEFGH":
        led.add_consumer(c, 10)
    for i in range(9):
        led.put(msg(f"m{i}"))
    got = delivered(led.dispatch(0.0)[0])
    shares = [len(got.get(c, [])) for c in "ABCDEFGH"]
    assert max(shares) - min(shares) <= 1, shares


def test_round_robin_across_dispatches() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 10)
    led.add_consumer("B", 10)
    receivers = []
    for i in range(4):
        led.put(msg(f"m{i}"))
        ((cid, _),) = led.dispatch(float(i))[0]
        receivers.append(cid)
    assert receivers.count("A") == receivers.count("B") == 2, receivers


@settings(max_examples=150, deadline=None)
@given(
    prefetches=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    unsettled=st.lists(st.integers(0, 6), min_size=5, max_size=5),
    n=st.integers(0, 40),
    chunk=st.integers(1, 8),
)
def test_dispatch_respects_credit_and_is_work_conserving(
    prefetches: list[int], unsettled: list[int], n: int, chunk: int
) -> None:
    led = QueueLedger("q")
    held = {}
    for i, prefetch in enumerate(prefetches):
        held[i] = min(unsettled[i], prefetch)
        if held[i] == 0:
            continue
        # a prefetch equal to what it should hold: only this consumer has credit
        led.add_consumer(i, held[i])
        for j in range(held[i]):
            led.put(msg(f"pre-{i}-{j}"))
        assert delivered(led.dispatch(0.0)[0]) == {i: [f"pre-{i}-{j}" for j in range(held[i])]}
    for i, prefetch in enumerate(prefetches):
        led.add_consumer(i, prefetch)
    for j in range(n):
        led.put(msg(f"m{j:03d}"))
    batches, dead = led.dispatch(1.0, chunk=chunk)
    assert dead == []
    got = delivered(batches)
    credit = {i: prefetches[i] - held[i] for i in held}
    for cid, mids in got.items():
        assert 0 < len(mids) <= credit[cid]
        assert mids == sorted(mids)  # FIFO within one consumer
    total = sum(len(v) for v in got.values())
    assert total == min(n, sum(credit.values()))
    assert sorted(sum(got.values(), [])) == [f"m{j:03d}" for j in range(total)]
    assert led.ready_count == n - total
    assert led.is_dispatchable() is (led.ready_count > 0 and total < sum(credit.values()))


# -- redelivered flag and attempts (Rule 2) --------------------------------------


def _redeliver_by(how: str, led: QueueLedger, now: float) -> None:
    if how == "nack":
        led.nack("a", "A", now)
    elif how == "nack delay":
        led.nack("a", "A", now, delay=0.5)
    elif how == "expire":
        assert led.expire(now + TTL) == 1
    elif how == "lost":
        led.remove_consumer("A", lost=True)
        led.add_consumer("A", 1)
    elif how == "cancel":
        led.remove_consumer("A")
        led.add_consumer("A", 1)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["nack", "nack delay", "expire", "lost", "cancel"])
def test_every_later_delivery_is_flagged_and_counts_an_attempt(how: str) -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 1)
    led.put(msg("a"))
    seen = []
    now = 0.0
    for _ in range(4):
        batches, dead = led.dispatch(now)
        assert dead == []
        ((cid, (m,)),) = batches
        seen.append((m.attempt, m.redelivered))
        _redeliver_by(how, led, now)
        now += 2 * TTL
    assert seen == [(1, False), (2, True), (3, True), (4, True)]
    assert led.stats.delivered == 4 and led.stats.redelivered == 3


def test_unflagged_first_deliveries_of_fresh_messages() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 5)
    for mid in "abc":
        led.put(msg(mid))
    out = led.dispatch(0.0)[0][0][1]
    assert [(m.attempt, m.redelivered) for m in out] == [(1, False)] * 3
    assert led.stats.redelivered == 0


# -- max_attempts (Rule 5) and dead letters -------------------------------------


def test_max_attempts_dead_letters_instead_of_delivering_again() -> None:
    led = QueueLedger("jobs", lease_ttl=TTL, max_attempts=2)
    led.add_consumer("A", 1)
    led.put(msg("a", headers={"k": "v"}))
    led.put(msg("b"))
    for attempt in (1, 2):
        ((_, (m,)),) = led.dispatch(0.0)[0]
        assert (m.id, m.attempt) == ("a", attempt)
        led.nack("a", "A", 0.0)
    batches, dead = led.dispatch(0.0)
    # the dead message does not use up A's credit: b goes out in the same call
    assert delivered(batches) == {"A": ["b"]}
    assert ids(dead) == ["a"]
    (d,) = dead
    assert d.attempt == 2
    assert d.headers["k"] == "v"
    assert d.headers["x-pigeon-dead-queue"] == "jobs"
    assert d.headers["x-pigeon-attempts"] == "2"
    assert "2" in d.headers["x-pigeon-dead-reason"]
    assert "jobs" in d.headers["x-pigeon-dead-reason"]
    assert led.stats.dead_lettered == 1 and led.stats.delivered == 3
    assert counts(led) == (0, 0, 1)
    assert not led.put(msg("a"))  # still known: a resend is not a new message


def test_max_attempts_counts_deliveries_lost_to_expiry() -> None:
    led = QueueLedger("q", lease_ttl=TTL, max_attempts=3)
    led.add_consumer("A", 1)
    led.put(msg("a"))
    now = 0.0
    for _ in range(3):
        assert delivered(led.dispatch(now)[0]) == {"A": ["a"]}
        now += TTL
        assert led.expire(now) == 1
    batches, dead = led.dispatch(now)
    assert batches == [] and ids(dead) == ["a"]
    assert dead[0].headers["x-pigeon-attempts"] == "3"
    assert led.stats.expired == 3


def test_without_max_attempts_there_is_no_limit() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 1)
    led.put(msg("a"))
    for attempt in range(1, 51):
        ((_, (m,)),) = led.dispatch(0.0)[0]
        assert m.attempt == attempt
        led.nack("a", "A", 0.0)
    assert led.stats.dead_lettered == 0


def test_reject_dead_letters_at_once_and_frees_credit() -> None:
    led = QueueLedger("q", max_attempts=10)
    led.add_consumer("A", 1)
    led.put(msg("a"))
    led.put(msg("b"))
    led.dispatch(0.0)
    d = led.reject("a", "A", "schema mismatch")
    assert d is not None
    assert d.headers == {
        "x-pigeon-dead-reason": "schema mismatch",
        "x-pigeon-dead-queue": "q",
        "x-pigeon-attempts": "1",
    }
    assert delivered(led.dispatch(0.0)[0]) == {"A": ["b"]}
    assert led.reject("a", "A", "again") is None
    assert led.stats.dead_lettered == 1 and led.stats.stale_settles == 1


# -- stale settles (Rule 4) ------------------------------------------------------


@pytest.mark.parametrize("settle", ["ack", "nack", "reject", "extend"])
def test_settle_after_expiry_is_stale_and_changes_nothing(settle: str) -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 1)
    led.add_consumer("B", 1)
    led.put(msg("a"))
    led.dispatch(0.0)
    led.expire(TTL)
    assert delivered(led.dispatch(TTL)[0]) == {"B": ["a"]}
    before = led.snapshot()
    result = {
        "ack": lambda: led.ack("a", "A"),
        "nack": lambda: led.nack("a", "A", TTL, delay=1.0),
        "reject": lambda: led.reject("a", "A", "x"),
        "extend": lambda: led.extend("a", "A", TTL),
    }[settle]()
    assert result in (False, None)
    assert stat_delta(before, led.snapshot()) == {"stale_settles": 1}
    # B still holds the lease and A keeps its credit
    assert led.ack("a", "B")
    led.put(msg("b"))
    assert delivered(led.dispatch(TTL)[0]) == {"A": ["b"]}


def test_settle_twice_is_stale() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 2)
    led.put(msg("a"))
    led.put(msg("b"))
    led.dispatch(0.0)
    assert led.ack("a", "A")
    assert not led.ack("a", "A")
    assert led.nack("a", "A", 0.0) is None
    assert led.nack("b", "A", 0.0) is not None
    assert led.nack("b", "A", 0.0) is None
    assert led.stats.stale_settles == 3
    assert led.stats.acked == 1 and led.stats.nacked == 1
    # a double settle must not hand out extra credit
    for mid in "cde":
        led.put(msg(mid))
    assert delivered(led.dispatch(0.0)[0]) == {"A": ["b", "c"]}


def test_settle_after_the_consumer_left_is_stale() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 1)
    led.put(msg("a"))
    led.dispatch(0.0)
    led.remove_consumer("A")
    led.add_consumer("A", 1)  # same identity comes back
    assert not led.ack("a", "A")
    assert led.stats.stale_settles == 1
    ((_, (m,)),) = led.dispatch(0.0)[0]
    assert m.id == "a" and m.redelivered and m.attempt == 2


# -- next_wakeup and expiry --------------------------------------------------------


def test_next_wakeup_none_when_idle() -> None:
    led = QueueLedger("q")
    assert led.next_wakeup() is None
    led.put(msg("a"))
    assert led.next_wakeup() is None  # ready work is not a timer


def test_next_wakeup_tracks_leases_and_extends() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 5)
    led.put(msg("a"))
    led.dispatch(0.0)
    led.put(msg("b"))
    led.dispatch(1.0)
    assert led.next_wakeup() == 10.0
    assert led.extend("a", "A", 5.0)
    assert led.next_wakeup() == 11.0  # b is now the first to expire
    assert led.expire(10.5) == 0
    assert led.expire(11.0) == 1
    assert led.next_wakeup() == 15.0
    assert led.expire(14.999) == 0
    assert led.extend("a", "A", 14.0)
    assert led.next_wakeup() == 24.0
    assert led.expire(23.0) == 0 and led.in_flight_count == 1
    assert led.stats.stale_settles == 0


def test_next_wakeup_is_the_earlier_of_lease_and_delay() -> None:
    led = QueueLedger("q", lease_ttl=TTL)
    led.add_consumer("A", 5)
    led.put(msg("a"))
    led.put(msg("b"))
    led.dispatch(0.0)
    led.nack("b", "A", 2.0, delay=3.0)
    assert led.next_wakeup() == 5.0
    led.nack("a", "A", 2.0, delay=30.0)
    assert led.next_wakeup() == 5.0
    led.dispatch(5.0)  # b is leased again until 15
    assert led.next_wakeup() == 15.0
    led.restore(msg("c"), ready_at=12.0)
    assert led.next_wakeup() == 12.0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["put", "extend", "tick"]), st.integers(0, 6)), max_size=40)
)
def test_next_wakeup_is_the_earliest_lease_expiry(ops: list[tuple[str, int]]) -> None:
    led = QueueLedger("q", lease_ttl=3.0)
    led.add_consumer("A", 10)
    now = 0.0
    held: dict[str, float] = {}  # id -> expiry, as the test sees it
    n = 0
    for op, arg in ops:
        if op == "put":
            led.put(msg(f"m{n}"))
            n += 1
            for _, msgs in led.dispatch(now)[0]:
                held.update((m.id, now + 3.0) for m in msgs)
        elif op == "extend" and held:
            mid = sorted(held)[arg % len(held)]
            assert led.extend(mid, "A", now)
            held[mid] = now + 3.0
        else:
            now += arg * 0.5
            due = {mid for mid, at in held.items() if at <= now}
            assert led.expire(now) == len(due)
            for mid in due:
                del held[mid]
            for _, msgs in led.dispatch(now)[0]:
                held.update((m.id, now + 3.0) for m in msgs)
        assert led.in_flight_count == len(held)
        wake = led.next_wakeup()
        assert wake == (min(held.values()) if held else None)
        if wake is not None:
            assert wake > now
            assert led.expire(wake - 1e-6) == 0
    assert led.stats.stale_settles == 0


def test_a_consumer_with_a_shorter_lease_ttl_expires_on_time() -> None:
    led = QueueLedger("q", lease_ttl=100.0)
    led.add_consumer("A", 1)
    led.put(msg("a"))
    led.dispatch(0.0)
    led.add_consumer("B", 5, lease_ttl=5.0)  # another worker with a shorter ttl
    led.put(msg("b"))
    led.dispatch(1.0)
    assert led.next_wakeup() == 6.0
    assert led.expire(10.0) == 1


def test_snapshot_reports_depths_and_counters() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 1)
    led.put(msg("a"))
    led.put(msg("a"))
    led.put(msg("b"))
    led.dispatch(0.0)
    snap = led.snapshot()
    assert snap == {
        "ready": 1,
        "on_disk": 0,
        "delayed": 0,
        "in_flight": 1,
        "consumers": 1,
        "received": 2,
        "duplicates": 1,
        "delivered": 1,
        "redelivered": 0,
        "acked": 0,
        "nacked": 0,
        "dead_lettered": 0,
        "expired": 0,
        "ttl_expired": 0,
        "consumers_lost": 0,
        "stale_settles": 0,
        "scheduled": 0,
        "delay_clamped": 0,
        "bad_not_before": 0,
    }
    assert led.stats.as_dict() == {
        k: v
        for k, v in snap.items()
        if k not in ("ready", "on_disk", "delayed", "in_flight", "consumers")
    }


def test_a_consumer_earns_its_prefetch_by_settling() -> None:
    led = QueueLedger("q", initial_credit=4)
    led.add_consumer("A", 100)
    for i in range(50):
        led.put(msg(f"m{i:02d}"))
    first = delivered(led.dispatch(0.0)[0])["A"]
    assert len(first) == 4  # only its first window before it settles anything
    led.ack_many(first, "A")  # each settle lets it hold one more
    assert len(delivered(led.dispatch(0.0)[0])["A"]) == 8
    led.nack("m04", "A", 0.0)
    led.reject("m05", "A", "bad")
    assert len(delivered(led.dispatch(0.0)[0])["A"]) == 4  # window 10, 6 held


def test_a_consumer_that_never_settles_holds_only_its_first_window() -> None:
    led = QueueLedger("q", initial_credit=4, lease_ttl=10.0)
    led.add_consumer("hostage", 1000)
    led.add_consumer("worker", 10)
    for i in range(100):
        led.put(msg(f"m{i:02d}"))
    held = 0
    for _ in range(20):
        got = delivered(led.dispatch(1.0)[0])
        held += len(got.get("hostage", []))
        led.ack_many(got.get("worker", []), "worker")
    assert held == 4  # the worker took the rest
    assert led.ready_count == 0 and led.in_flight_count == 4
    # Its leases expire: they come back, and it starts from its first window again.
    led.expire(100.0)
    again = delivered(led.dispatch(100.0)[0])
    assert len(again.get("hostage", [])) <= 4


# -- message deadlines (Rule 7) -----------------------------------------------


def test_a_message_past_its_deadline_is_dead_lettered_unrun() -> None:
    led = QueueLedger("jobs", lease_ttl=TTL)
    led.add_consumer("A", 10)
    led.put(msg("stale", deadline=100.0))
    led.put(msg("fresh", deadline=200.0))
    led.put(msg("timeless"))
    batches, dead = led.dispatch(0.0, wall=150.0)
    assert delivered(batches) == {"A": ["fresh", "timeless"]}
    assert ids(dead) == ["stale"]
    assert dead[0].headers["x-pigeon-dead-reason"] == "expired"
    assert dead[0].attempt == 0  # never handed out
    assert led.stats.ttl_expired == 1 and led.stats.dead_lettered == 1


def test_deadlines_are_not_read_without_a_wall_clock() -> None:
    led = QueueLedger("jobs", lease_ttl=TTL)
    led.add_consumer("A", 10)
    led.put(msg("stale", deadline=100.0))
    batches, dead = led.dispatch(0.0)
    assert delivered(batches) == {"A": ["stale"]} and dead == []


def test_a_dead_letter_never_expires() -> None:
    led = QueueLedger("jobs.dead", lease_ttl=TTL)
    led.add_consumer("A", 10)
    led.put(msg("letter", deadline=100.0, headers={"x-pigeon-dead-reason": "expired"}))
    batches, dead = led.dispatch(0.0, wall=150.0)
    assert delivered(batches) == {"A": ["letter"]} and dead == []
