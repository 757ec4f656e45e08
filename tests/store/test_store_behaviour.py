"""One behavioural suite, run over MemoryStore and SqliteStore alike."""

from __future__ import annotations

import pytest

from pigeon.errors import ClosedError, ConfigurationError
from pigeon.store import Ack, Dead, DeadLetter, Put, Replay, Requeue, StoredMessage

from .conftest import T0, Opener, msg


def ids(store) -> list[tuple[str, str]]:
    return [(s.queue, s.message.id) for s in store.load()]


def test_put_is_new_once_then_duplicate(store):
    assert store.apply([Put("q", msg("a"))]) == [True]
    assert store.apply([Put("q", msg("a", b"other body"))]) == [False]
    assert store.load() == [StoredMessage("q", msg("a"), 0.0)]


def test_same_id_in_two_queues_is_two_messages(store):
    assert store.apply([Put("q1", msg("a")), Put("q2", msg("a"))]) == [True, True]
    assert store.apply([Ack("q1", "a")]) == [True]
    assert ids(store) == [("q2", "a")]


def test_put_of_a_dead_id_is_a_duplicate(store):
    store.apply([Put("q", msg("a")), Dead("q", msg("a"), "bad")])
    assert store.apply([Put("q", msg("a"))]) == [False]
    assert store.load() == []


def test_acked_id_is_a_duplicate_within_the_window_only(store, clock):
    store.apply([Put("q", msg("a")), Ack("q", "a")])
    clock.advance(119.0)
    assert store.apply([Put("q", msg("a"))]) == [False]
    assert store.load() == []
    clock.advance(2.0)  # 121 s after the ack: the tombstone has expired
    assert store.apply([Put("q", msg("a"))]) == [True]
    assert ids(store) == [("q", "a")]


def test_dedupe_window_zero_forgets_acked_ids(opener):
    store = opener.open(dedupe_window=0.0)
    store.apply([Put("q", msg("a")), Ack("q", "a")])
    assert store.apply([Put("q", msg("a"))]) == [True]


def test_negative_dedupe_window_is_refused(opener):
    with pytest.raises(ConfigurationError, match="dedupe_window"):
        opener.open(dedupe_window=-1.0)


def test_ack_is_true_only_for_a_live_message(store):
    store.apply([Put("q", msg("a")), Put("q", msg("d")), Dead("q", msg("d"), "x")])
    assert store.apply([Ack("q", "a"), Ack("q", "a"), Ack("q", "nope"), Ack("q", "d")]) == [
        True,
        False,
        False,
        False,
    ]
    assert store.load() == []
    assert len(store.dead_letters()) == 1


def test_requeue_stores_attempt_headers_and_ready_at_and_keeps_place(store):
    store.apply([Put("q", msg("a")), Put("q", msg("b"))])
    nacked = msg("a", attempt=2, redelivered=True, headers={"x-pigeon-error": "boom"})
    assert store.apply([Requeue("q", nacked, T0 + 30.0)]) == [True]
    assert store.load() == [
        StoredMessage("q", nacked, T0 + 30.0),
        StoredMessage("q", msg("b"), 0.0),
    ]


def test_requeue_never_resurrects_an_acked_or_unknown_message(store):
    store.apply([Put("q", msg("a")), Ack("q", "a")])
    assert store.apply([Requeue("q", msg("a"), T0), Requeue("q", msg("zz"), T0)]) == [
        False,
        False,
    ]
    assert store.load() == []


def test_dead_keeps_message_headers_reason_and_time(store, clock):
    store.apply([Put("q", msg("a"))])
    clock.advance(5.0)
    final = msg("a", attempt=5, headers={"x-pigeon-error": "ValueError"})
    assert store.apply([Dead("q", final, "too many attempts")]) == [True]
    assert store.load() == []
    assert store.dead_letters() == [DeadLetter("q", final, "too many attempts", T0 + 5.0)]
    assert store.apply([Dead("q", final, "again")]) == [False]


def test_dead_letters_by_queue_in_the_order_they_died(store):
    store.apply([Put("q1", msg("a")), Put("q2", msg("b")), Put("q1", msg("c"))])
    store.apply([Dead("q1", msg("c"), "1"), Dead("q2", msg("b"), "2"), Dead("q1", msg("a"), "3")])
    assert [(d.queue, d.message.id) for d in store.dead_letters()] == [
        ("q1", "c"),
        ("q2", "b"),
        ("q1", "a"),
    ]
    assert [d.reason for d in store.dead_letters("q1")] == ["1", "3"]
    assert store.dead_letters("empty") == []


def test_replay_resets_attempt_and_goes_to_the_end(store):
    store.apply([Put("q", msg("a")), Put("q", msg("b"))])
    store.apply([Dead("q", msg("a", attempt=4, headers={"h": "v"}), "x")])
    assert store.apply([Replay("q", "a")]) == [True]
    assert store.dead_letters() == []
    assert store.load() == [
        StoredMessage("q", msg("b"), 0.0),
        StoredMessage("q", msg("a", attempt=0, headers={"h": "v"}), 0.0),
    ]


def test_replay_is_false_unless_dead(store):
    store.apply([Put("q", msg("a"))])
    assert store.apply([Replay("q", "a"), Replay("q", "unknown")]) == [False, False]
    assert ids(store) == [("q", "a")]


def test_load_keeps_insertion_order_across_queues(store):
    names = [(f"q{i % 3}", f"m{i:03d}") for i in range(30)]
    store.apply([Put(q, msg(i)) for q, i in names[:10]])
    store.apply([Put(q, msg(i)) for q, i in names[10:]])
    assert ids(store) == names


def test_ops_in_one_batch_apply_in_order(store):
    results = store.apply(
        [
            Put("q", msg("a")),
            Requeue("q", msg("a", attempt=1), T0 + 1),
            Ack("q", "a"),
            Put("q", msg("a")),
            Put("q", msg("b")),
            Dead("q", msg("b"), "x"),
            Replay("q", "b"),
        ]
    )
    assert results == [True, True, True, False, True, True, True]
    assert ids(store) == [("q", "b")]


def test_empty_batch(store):
    assert store.apply([]) == []


def test_a_batch_with_a_non_op_applies_nothing(store):
    with pytest.raises(TypeError, match="Put, Ack"):
        store.apply([Put("q", msg("a")), ("q", "a")])
    assert store.load() == []


def test_counts(store):
    assert store.counts() == {}
    store.apply([Put("q1", msg(str(i))) for i in range(4)] + [Put("q2", msg("x"))])
    store.apply([Dead("q1", msg("0"), "x"), Ack("q1", "1"), Dead("q2", msg("x"), "y")])
    assert store.counts() == {"q1": {"ready": 2, "dead": 1}, "q2": {"ready": 0, "dead": 1}}


def test_every_message_field_round_trips(store):
    original = msg(
        "ü-id",
        bytes(range(256)) * 40,
        content_type="application/json",
        headers={"k": "v", "ключ": "значение"},
        attempt=3,
        redelivered=True,
        created_at=T0 - 1.5,
        deadline=T0 + 60.25,
    )
    store.apply([Put("queue/ü", original)])
    assert store.load() == [StoredMessage("queue/ü", original, 0.0)]


def test_later_changes_to_a_message_object_do_not_reach_the_store(store):
    message = msg("a", headers={"k": "v"})
    store.apply([Put("q", message)])
    message.headers["k"] = "changed"
    assert store.load()[0].message.headers == {"k": "v"}


def test_a_closed_store_raises_closed_error(opener: Opener):
    with opener.open() as store:
        store.apply([Put("q", msg("a"))])
    for call in (
        lambda: store.apply([Put("q", msg("b"))]),
        store.load,
        store.dead_letters,
        store.counts,
    ):
        with pytest.raises(ClosedError):
            call()
    store.close()  # closing twice is fine


def test_ack_without_tombstone_forgets_the_id(store) -> None:  # noqa: ANN001
    from pigeon.message import make_message
    from pigeon.store import Ack, Put

    m = make_message(b"x", message_id="m1")
    assert store.apply([Put("q", m)]) == [True]
    assert store.apply([Ack("q", "m1", tombstone=False)]) == [True]
    assert store.load() == []
    assert store.apply([Put("q", m)]) == [True]  # no tombstone: stored again


def test_page_reads_one_queues_live_rows_in_order_from_a_position(store):
    store.apply([Put(f"q{i % 2}", msg(f"m{i}")) for i in range(10)])
    store.apply([Ack("q0", "m2"), Dead("q0", msg("m4"), "bad")])
    first = store.page("q0", 0, limit=2, max_bytes=1 << 20)
    assert [row.message.id for _, row in first.rows] == ["m0", "m6"]
    assert first.more
    after = first.rows[-1][0]
    rest = store.page("q0", after, limit=10, max_bytes=1 << 20)
    assert [row.message.id for _, row in rest.rows] == ["m8"]
    assert not rest.more
    assert store.page("empty", 0, limit=10, max_bytes=1).rows == []
    positions = [p for p, _ in first.rows + rest.rows]
    assert positions == sorted(positions) and positions[-1] <= store.position()


def test_page_stops_at_its_byte_bound_but_returns_at_least_one_row(store):
    store.apply([Put("q", msg(f"m{i}", body=b"x" * 1000)) for i in range(5)])
    one = store.page("q", 0, limit=10, max_bytes=1)
    assert [row.message.id for _, row in one.rows] == ["m0"] and one.more
    some = store.page("q", 0, limit=10, max_bytes=2500)
    assert len(some.rows) == 3 and some.more


def test_page_keeps_a_requeued_rows_place_and_carries_ready_at(store):
    store.apply([Put("q", msg("a")), Put("q", msg("b"))])
    store.apply([Requeue("q", msg("a", attempt=2), T0 + 9)])
    rows = store.page("q", 0, limit=10, max_bytes=1 << 20).rows
    assert [(r.message.id, r.ready_at) for _, r in rows] == [("a", T0 + 9), ("b", 0.0)]


def test_position_grows_with_every_row_written(store):
    assert store.position() == 0
    store.apply([Put("q", msg("a"))])
    first = store.position()
    store.apply([Put("q", msg("b"))])
    assert store.position() > first
