"""What a durable host writes for each ledger event (pure mapping)."""

from __future__ import annotations

from pigeon._core import persistence
from pigeon._core.ledger import QueueLedger, dead_letter_queue
from pigeon.message import make_message
from pigeon.store import Ack, Dead, Put, Replay, Requeue


def test_plain_events_map_one_to_one() -> None:
    m = make_message(b"x", message_id="from-another-producer")
    assert persistence.put_op("q", m) == Put("q", m)
    assert persistence.ack_ops("q", [m]) == [Ack("q", m.id)]  # tombstone kept
    assert persistence.requeue_op("q", m, 5.0) == Requeue("q", m, 5.0)


def test_ids_minted_here_need_no_tombstone() -> None:
    m = make_message(b"x")  # its id carries this process's tag
    assert persistence.ack_ops("q", [m]) == [Ack("q", m.id, tombstone=False)]


def test_a_dead_letter_lives_in_its_origin_row() -> None:
    led = QueueLedger("q")
    led.add_consumer("A", 1)
    led.put(make_message(b"x"))
    [(_, [m])], _ = led.dispatch(0.0)
    dead = led.reject(m.id, "A", "bad")
    assert persistence.dead_op("q", dead, "bad") == Dead("q", dead, "bad")
    served_from = dead_letter_queue("q")
    # Acked from "q.dead": the origin row is replayed then acked, atomically.
    assert persistence.ack_ops(served_from, [dead]) == [Replay("q", m.id), Ack("q", m.id)]
    # A nack there changes nothing stored; dying again keeps the one dead row.
    assert persistence.requeue_op(served_from, dead, 1.0) is None
    assert persistence.dead_op(served_from, dead, "again") is None


def test_a_user_queue_named_like_a_dead_queue_is_a_plain_queue() -> None:
    m = make_message(b"x", message_id="by-a-user")  # no dead-letter headers
    assert persistence.ack_ops("q.dead", [m]) == [Ack("q.dead", m.id)]


def test_replay_rewrites_the_stored_copy() -> None:
    m = make_message(b"x")
    assert persistence.replay_ops("q", m) == [Replay("q", m.id), Requeue("q", m, 0.0)]


def test_admit_queues_what_the_store_calls_new_even_if_recently_seen() -> None:
    led = QueueLedger("q", dedupe_size=10)
    led.add_consumer("A", 1)
    m = make_message(b"x", message_id="same")
    led.put(m)
    led.dispatch(0.0)
    led.ack("same", "A")
    assert not led.put(make_message(b"x", message_id="same"))  # the window says: resend
    assert led.admit(make_message(b"x", message_id="same"))  # the store says: new
    assert led.ready_count == 1
    assert not led.admit(make_message(b"x", message_id="same"))  # now held
