"""What a durable queue host writes to its store for each ledger event.

Rule 1: a message is stored before it is confirmed; only an ack deletes it.
Rule 2: leases are not stored. After a restart every stored message comes
back marked redelivered, since it may have been delivered before the crash.
Rule 3: a dead letter stays in its origin queue's row, marked dead; in
memory it is served from the queue ``<origin>.dead``. Acking it there deletes
the dead row (replay to live, then ack, in one transaction).
Rule 4: a nack without delay writes nothing: the message is still stored,
and a restart brings it back anyway.
Rule 5: see ``ack_ops``.
"""

from __future__ import annotations

from ..message import Message, minted_here
from . import headers
from .ops import Ack, Dead, Op, Put, Replay, Requeue


def dead_origin(queue: str, message: Message) -> str | None:
    """The origin queue if ``message`` is a stored dead letter served from ``queue``."""
    origin = message.headers.get(headers.DEAD_QUEUE)
    if origin is not None and queue.startswith(origin + ".dead"):
        return origin
    return None


def put_op(queue: str, message: Message) -> Op:
    return Put(queue, message)


def ack_ops(queue: str, messages: list[Message]) -> list[Op]:
    """Rule 5: an id minted by this process needs no tombstone (nobody else
    can resend it); every other acked id keeps one for the dedupe window."""
    ops: list[Op] = []
    for message in messages:
        origin = dead_origin(queue, message)
        if origin is None:
            ops.append(Ack(queue, message.id, tombstone=not minted_here(message.id)))
        else:
            ops += (Replay(origin, message.id), Ack(origin, message.id))
    return ops


def requeue_op(queue: str, message: Message, ready_at: float) -> Op | None:
    """A nack with a delay; ``ready_at`` is wall-clock seconds."""
    if dead_origin(queue, message) is not None:
        return None
    return Requeue(queue, message, ready_at)


def dead_op(queue: str, message: Message, reason: str) -> Op | None:
    """A message dead-lettered out of ``queue`` (already marked by the ledger)."""
    if dead_origin(queue, message) is not None:
        return None  # a dead letter of a dead letter: its row is dead already
    return Dead(queue, message, reason)


def replay_ops(queue: str, message: Message) -> list[Op]:
    """A dead letter of ``queue`` moved back into it, its stored copy
    rewritten too (so a restart does not bring back the dead headers)."""
    return [Replay(queue, message.id), Requeue(queue, message, 0.0)]
