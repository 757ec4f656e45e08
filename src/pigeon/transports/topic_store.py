"""What a durable node keeps of its topics across restarts, in its store.

Rule 1: a retained topic's history is stored (in the hidden queue
``pigeon.retained``) before the publish is confirmed, and deleted from the
store as it is trimmed.
Rule 2: a durable subscription (its name, pattern, policy and buffer) is
stored (in ``pigeon.subscriptions``) before it is granted, and deleted when
it is removed; its queue is a durable queue of the host, so what waits in
it is stored before the publish is confirmed. After a restart the
subscriptions are bound again before the node serves anyone, so nothing
published then misses them.
Rule 3: a subscriber's own subscription (``pigeon.tmp.…``) lives in memory:
it ends with its subscriber anyway.
Rule 4: after a restart, a retained topic's numbers go on from the last one
kept (with the new run's source, so a subscriber sees no false gap).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import msgspec

from .._core.ops import Ack, Op, Put
from ..message import Message, new_id
from ..store import GroupCommitter, Store

RETAINED_QUEUE = "pigeon.retained"
SUBSCRIPTIONS_QUEUE = "pigeon.subscriptions"
HIDDEN = frozenset({RETAINED_QUEUE, SUBSCRIPTIONS_QUEUE})
_PAGE = 1000


class SubscriptionRecord(msgspec.Struct, frozen=True):
    """A durable subscription as it is stored (Rule 2)."""

    queue: str
    pattern: str
    policy: str
    buffer: int


@dataclass(slots=True)
class Restored:
    retained: list[Message]
    subscriptions: list[tuple[str, SubscriptionRecord]]  # (row id, record)


def load(store: Store) -> Restored:
    """Read what the topics kept (blocking: run it in a thread at start)."""
    return Restored(
        retained=_read(store, RETAINED_QUEUE),
        subscriptions=[
            (m.id, msgspec.msgpack.decode(m.body, type=SubscriptionRecord))
            for m in _read(store, SUBSCRIPTIONS_QUEUE)
        ],
    )


def _read(store: Store, queue: str) -> list[Message]:
    messages: list[Message] = []
    after = 0
    while True:
        page = store.page(queue, after, limit=_PAGE, max_bytes=64 << 20)
        messages += [row.message for _, row in page.rows]
        if not page.more or not page.rows:
            return messages
        after = page.rows[-1][0]


class TopicStore:
    """Writes of one durable node's topics (Rules 1 and 2)."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer
        self.write_errors = 0

    def _commit(self, ops: list[Op]) -> asyncio.Future[list[bool]]:
        written = self.committer.enqueue(ops)
        written.add_done_callback(self._done)
        return written

    def _done(self, future: asyncio.Future[list[bool]]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.write_errors += 1

    def keep(self, message: Message) -> asyncio.Future[list[bool]]:
        """Rule 1: store a retained message."""
        return self._commit([Put(RETAINED_QUEUE, message)])

    def forget(self, messages: list[Message]) -> None:
        """Rule 1: trimmed messages leave the store (written behind: one
        that stays only comes back to be trimmed again)."""
        if messages:
            self._commit([Ack(RETAINED_QUEUE, m.id, tombstone=False) for m in messages])

    def bind(self, record: SubscriptionRecord) -> tuple[str, asyncio.Future[list[bool]]]:
        """Rule 2: store a durable subscription; its row id and the write."""
        row = Message(id=new_id(), body=msgspec.msgpack.encode(record))
        return row.id, self._commit([Put(SUBSCRIPTIONS_QUEUE, row)])

    def unbind(self, row_id: str) -> None:
        self._commit([Ack(SUBSCRIPTIONS_QUEUE, row_id, tombstone=False)])
