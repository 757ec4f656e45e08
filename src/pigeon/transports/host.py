"""The queue host: runs the ledgers of the queues a node hosts on an event loop.

Everything that decides lives in :mod:`pigeon._core.ledger`; this adapter
only schedules dispatch passes and timers and hands batches to consumer
sinks. Dispatch is coalesced: any number of puts and settles in one loop
iteration lead to one dispatch pass, so batches form from what is already
queued and nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Any

from .._core.ledger import QueueLedger, dead_letter_queue
from ..message import Message

# A sink takes (queue, messages leased to that consumer).
BatchSink = Callable[[str, list[Message]], None]


class QueueHost:
    """Hosts named queues and dispatches them to consumers.

    Args:
        lease_ttl: default seconds a delivery stays leased.
        max_length: ready messages a queue may hold; a put beyond it is
            refused (``put`` returns None for it) instead of growing forever.
    """

    def __init__(self, *, lease_ttl: float = 30.0, max_length: int | None = None) -> None:
        self.lease_ttl = lease_ttl
        self.max_length = max_length
        self.queues: dict[str, QueueLedger] = {}
        self._sinks: dict[Hashable, BatchSink] = {}
        self._subscriptions: dict[Hashable, set[str]] = {}
        self._dirty: set[str] = set()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refused = 0

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def ledger(self, queue: str) -> QueueLedger:
        ledger = self.queues.get(queue)
        if ledger is None:
            ledger = self.queues[queue] = QueueLedger(queue, lease_ttl=self.lease_ttl)
        return ledger

    # -- producers -------------------------------------------------------

    def put(self, queue: str, message: Message) -> bool | None:
        """Enqueue; True if new, False if a known id (a resend), None if refused."""
        ledger = self.queues.get(queue) or self.ledger(queue)
        if self.max_length is not None and ledger.ready_count >= self.max_length:
            self.refused += 1
            return None
        added = ledger.put(message)
        if added and not self._scheduled:
            self._mark(queue)
        elif added:
            self._dirty.add(queue)
        return added

    # -- consumers -------------------------------------------------------

    def subscribe(
        self, queue: str, consumer: Hashable, sink: BatchSink, *, prefetch: int,
        lease_ttl: float | None = None, max_attempts: int = 0,
    ) -> None:
        ledger = self.ledger(queue)
        if max_attempts:
            ledger.max_attempts = max_attempts
        ledger.add_consumer(consumer, prefetch, lease_ttl=lease_ttl)
        self._sinks[consumer] = sink
        self._subscriptions.setdefault(consumer, set()).add(queue)
        self._mark(queue)

    def unsubscribe(self, queue: str, consumer: Hashable, *, lost: bool = False) -> None:
        ledger = self.queues.get(queue)
        if ledger is not None and ledger.remove_consumer(consumer, lost=lost):
            self._mark(queue)
        queues = self._subscriptions.get(consumer)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscriptions[consumer]
                self._sinks.pop(consumer, None)

    def consumer_lost(self, consumer: Hashable) -> None:
        """A consumer died: every delivery it held is redelivered elsewhere."""
        for queue in list(self._subscriptions.get(consumer, ())):
            self.unsubscribe(queue, consumer, lost=True)

    def settle(
        self, queue: str, consumer: Hashable, *, acks: list[str] = (),  # type: ignore[assignment]
        nacks: list[tuple[str, float, str]] = (),  # type: ignore[assignment]
        rejects: list[tuple[str, str]] = (),  # type: ignore[assignment]
        extends: list[str] = (),  # type: ignore[assignment]
    ) -> None:
        ledger = self.queues.get(queue)
        if ledger is None:
            return
        now = time.monotonic()
        if acks:
            ledger.ack_many(acks, consumer)
        for mid, delay, reason in nacks:
            ledger.nack(mid, consumer, now, delay=delay, reason=reason or None)
        for mid, reason in rejects:
            dead = ledger.reject(mid, consumer, reason)
            if dead is not None:
                self._bury(queue, [dead])
        for mid in extends:
            ledger.extend(mid, consumer, now)
        self._mark(queue)

    def _bury(self, queue: str, dead: list[Message]) -> None:
        target = self.ledger(dead_letter_queue(queue))
        for message in dead:
            # A dead letter starts a new life in its own queue: fresh attempts,
            # but it keeps the redelivered mark, since it was seen.
            message.attempt = 0
            target.put(message)
        self._mark(target.name)

    # -- scheduling ------------------------------------------------------

    def _mark(self, queue: str) -> None:
        self._dirty.add(queue)
        if not self._scheduled:
            self._scheduled = True
            self._get_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        now = time.monotonic()
        dirty, self._dirty = self._dirty, set()
        for queue in dirty:
            ledger = self.queues.get(queue)
            if ledger is None:
                continue
            batches, dead = ledger.dispatch(now)
            for consumer, messages in batches:
                self._sinks[consumer](queue, messages)
            if dead:
                self._bury(queue, dead)
        self._arm_timer()

    def _arm_timer(self) -> None:
        wakeups = [w for ledger in self.queues.values() if (w := ledger.next_wakeup()) is not None]
        if not wakeups:
            return
        at = min(wakeups)
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        loop = self._get_loop()
        # Map monotonic time onto the loop's clock, which may differ.
        self._timer_at = at
        self._timer = loop.call_at(loop.time() + max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        for name, ledger in self.queues.items():
            ledger.expire(now)
            if ledger.has_work():
                self._dirty.add(name)
        self._dispatch()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stats(self) -> dict[str, Any]:
        return {name: ledger.snapshot() for name, ledger in self.queues.items()}
