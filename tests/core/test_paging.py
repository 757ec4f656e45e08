"""Paging a durable queue's backlog: the window in memory, the rest on disk."""

from __future__ import annotations

import pytest

from pigeon._core.ledger import QueueLedger
from pigeon._core.paging import DiskBacklog, PageRequest, Window
from pigeon.message import Message, make_message


def msg(mid: str) -> Message:
    return make_message(b"x" * 10, message_id=mid)


def ledger(messages: int = 4) -> QueueLedger:
    return QueueLedger("q", window=Window(messages, 1 << 20))


def test_past_the_window_committed_messages_stay_on_disk() -> None:
    led = ledger(4)
    assert all(led.stored(msg(f"m{i}")) for i in range(10))
    assert [m.id for m in led.peek_ready(100)] == ["m0", "m1", "m2", "m3"]
    assert led.backlog.paging and led.backlog.count == 6
    snap = led.snapshot()
    assert (snap["ready"], snap["on_disk"], snap["received"]) == (10, 6, 10)
    assert not led.is_idle()  # a queue with a backlog on disk is never forgotten


def test_a_page_is_read_only_for_a_consumer_when_the_window_is_half_empty() -> None:
    led = ledger(4)
    for i in range(10):
        led.stored(msg(f"m{i}"))
    assert led.page_request() is None  # nobody consumes: nothing to read for
    led.add_consumer("A", 3)
    assert led.page_request() is None  # 4 ready: the window is full
    led.dispatch(0.0)
    request = led.page_request()
    # 3 rows of room; the bytes held (1 ready, 3 in flight) come off the byte bound.
    assert request == PageRequest(after=0, limit=3, max_bytes=(1 << 20) - 40)
    assert led.page_request() is None  # one read at a time


def test_rows_read_back_skip_what_is_held_or_was_just_settled() -> None:
    led = ledger(4)
    for i in range(5):
        led.stored(msg(f"m{i}"))
    led.add_consumer("A", 2)
    [(_, got)], _ = led.dispatch(0.0)  # m0 and m1 in flight, m2 and m3 ready
    led.ack_many([got[0].id], "A")  # m0 is done while the read is on its way
    assert led.page_request() is not None
    rows = [(p, msg(f"m{p - 1}"), 0.0) for p in range(1, 6)]  # the store's rows 1..5
    assert led.page_loaded(rows, more=False, now=0.0) == 1  # only m4 is new
    assert [m.id for m in led.peek_ready(10)] == ["m2", "m3", "m4"]
    assert not led.backlog.paging and led.backlog.count == 0
    # Paging over: what commits next joins the window again.
    led.stored(msg("m5"))
    assert not led.backlog.paging


def test_rows_from_before_a_restart_come_back_marked_redelivered() -> None:
    led = ledger(4)
    led.backlog.restored(count=3, through=2)
    led.add_consumer("A", 10)
    rows = [(1, msg("a"), 0.0), (2, msg("b"), 0.0), (3, msg("c"), 0.0)]
    led.page_loaded(rows, more=False, now=0.0)
    [(_, got)], _ = led.dispatch(0.0)
    assert [(m.id, m.redelivered) for m in got] == [("a", True), ("b", True), ("c", False)]


def test_a_row_due_later_waits_in_the_delayed_heap() -> None:
    led = ledger(4)
    led.backlog.restored(count=1, through=1)
    led.page_loaded([(1, msg("a"), 50.0)], more=False, now=10.0)
    assert led.delayed_count == 1 and led.next_wakeup() == 50.0


def test_a_read_that_stopped_early_keeps_paging_from_its_last_row() -> None:
    backlog = DiskBacklog()
    backlog.restored(count=10, through=10)
    request = backlog.request(ready=0, held_bytes=0, window=Window(4, 100))
    assert request == PageRequest(0, 4, 100)
    backlog.loaded(last_position=4, taken=4, size=40, more=True)
    assert backlog.paging and backlog.count == 6
    assert backlog.request(0, 0, Window(4, 100)) == PageRequest(4, 4, 100)
    backlog.failed()
    assert backlog.request(0, 0, Window(4, 100)) == PageRequest(4, 4, 100)


def test_a_window_holds_something() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Window(0, 10)
