"""The queue host: runs the ledgers of the queues a node hosts on an event loop.

Everything that decides lives in :mod:`pigeon._core.ledger`; this adapter
only schedules dispatch passes and timers and hands batches to consumer
sinks. Dispatch is coalesced: any number of puts and settles in one loop
iteration lead to one dispatch pass, so batches form from what is already
queued and nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from .. import _clock
from .._core import persistence, policy
from .._core.ledger import QueueLedger, dead_letter_queue
from .._core.limits import QueuePolicy, message_size
from .._core.paging import Window
from .._core.queue_policies import QueuePolicies
from ..errors import PigeonError, StoreError
from ..message import Message
from ..store import GroupCommitter, Op, Page, Store
from .queue_table import DEFAULT_MAX_MEMORY, QueueTable

BACKLOG_RETRY = 1.0  # seconds before a failed backlog read is tried again

# A sink takes (queue, messages leased to that consumer).
BatchSink = Callable[[str, list[Message]], None]


class QueueHost:
    """Hosts named queues and dispatches them to consumers.

    Args:
        lease_ttl: default seconds a delivery stays leased.
        policy: the host's rules for consumers (prefetch and lease bounds,
            attempt limit); ``lease_ttl`` is its default lease.
        max_length: ready messages a queue may hold; a put beyond it is
            refused (``put`` returns None for it) instead of growing forever.
        policies: the policy of each queue (defaults and overrides by name,
            see ``pigeon._core.queue_policies``); when given, ``policy``,
            ``lease_ttl`` and ``max_length`` are its defaults' instead.
        store: where messages are kept until acked; with one, a put is
            confirmed only once it is committed (see ``put_many``), and a
            queue's backlog past ``page_window`` stays on disk until
            consumers reach it (see ``pigeon._core.paging``).
    """

    def __init__(
        self,
        *,
        lease_ttl: float = 30.0,
        max_length: int | None = None,
        store: Store | None = None,
        policy: QueuePolicy | None = None,
        max_queues: int = 10_000,
        max_memory: int | None = DEFAULT_MAX_MEMORY,
        page_window: Window | None = None,
        policies: QueuePolicies | None = None,
    ) -> None:
        if policies is None:
            default = dataclasses.replace(
                policy or QueuePolicy(), lease_ttl=lease_ttl, max_length=max_length
            )
            policies = QueuePolicies(default)
        self.policies = policies
        self.policy = policies.default
        self.lease_ttl = self.policy.lease_ttl
        self.max_length = self.policy.max_length
        self.table = QueueTable(
            policy_for=policies.for_queue,
            max_queues=max_queues,
            max_memory=max_memory,
            window=page_window or Window(),
            initial_credit=self.policy.initial_credit,
        )
        self.store = store
        self.committer = GroupCommitter(store) if store is not None else None
        self.store_errors = 0
        # Settles naming a queue this host does not hold (see ``settle``).
        self.unknown_queue_settles = 0
        self._writes: set[asyncio.Future[list[bool]]] = set()
        self.queues = self.table.queues  # read-only outside the table
        self._sinks: dict[Hashable, BatchSink] = {}
        self._subscriptions: dict[Hashable, set[str]] = {}
        self._dirty: set[str] = set()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refused = 0
        self.backlog_errors = 0
        self.purged = 0  # messages removed by ``purge`` (an operator's decision)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def ledger(self, queue: str, *, over_cap: bool = False) -> QueueLedger:
        """The ledger of ``queue``, made if new (see ``QueueTable.ledger``).

        Raises:
            Backpressure: at the node's queue cap.
        """
        return self.table.ledger(queue, over_cap=over_cap)

    def bytes_held(self) -> int:
        return self.table.bytes_held()

    # -- producers -------------------------------------------------------

    def put(self, queue: str, message: Message, *, fresh: bool = False) -> bool | None:
        """Enqueue; True if new, False if a known id (a resend), None if refused.

        ``fresh``: the id was minted in this process just now, so it cannot be
        a resend and is not tracked for de-duplication.
        """
        ledger = self.queues.get(queue) or self.table.new_ledger(queue)
        if ledger is None:
            self.refused += 1
            return None
        if not self._room(queue, ledger, [message]):
            return None
        added = ledger.put(message, fresh=fresh)
        self.table.added(len(message.body) if added else 0)
        if added and not self._scheduled:
            self._mark(queue)
        elif added:
            self._dirty.add(queue)
        return added

    def put_batch(self, queue: str, messages: list[Message]) -> list[bool | None]:
        """``put`` for many messages of one queue (a non-durable host): one
        room check and one dispatch for the batch; per message as ``put``
        answers."""
        ledger = self.queues.get(queue) or self.table.new_ledger(queue)
        if ledger is None:
            self.refused += len(messages)
            return [None] * len(messages)
        room = self._room(queue, ledger, messages)
        put = ledger.put
        results: list[bool | None] = [put(m) for m in messages[:room]]
        if room:
            self.table.added(sum(len(m.body) for m in messages[:room]))
            self._mark(queue)
        return results + [None] * (len(messages) - room)

    def put_fresh(self, queue: str, messages: list[Message]) -> int:
        """Enqueue fresh messages (ids just minted here) of a non-durable
        queue, as many as ``max_length`` allows; returns how many."""
        ledger = self.queues.get(queue) or self.table.new_ledger(queue)
        if ledger is None:
            self.refused += len(messages)
            return 0
        messages = messages[: self._room(queue, ledger, messages)]
        if messages:
            ledger.put_fresh(messages)
            self.table.added(sum(len(m.body) for m in messages))
            self._mark(queue)
        return len(messages)

    def takes_all(self, queue: str, bodies: int) -> bool:
        """Whether fresh puts into ``queue`` of messages with ``bodies``
        bytes of bodies in all would each be taken now, one after the
        other: the node stays below its memory limit and the queue has no
        ``max_length`` or ``max_bytes``. False says nothing more: put them
        with ``put``, which checks each. See ``took``."""
        rules = self.policies.for_queue(queue)
        if rules.max_length is not None or rules.max_bytes is not None:
            return False
        return self.table.below_limit(bodies)

    def took(self, queue: str, bodies: int) -> None:
        """Messages were put straight into ``queue``'s ledger after
        ``takes_all`` said yes: counted against the memory alarm as ``put``
        counts them, and dispatched."""
        self.table.added(bodies)
        self._mark(queue)

    async def put_many(self, queue: str, messages: list[Message]) -> list[bool | None]:
        """Store (when durable) and enqueue; per message as ``put`` answers.

        The messages are committed in one group commit before any is enqueued,
        so a True means "on disk" as well as "queued".

        Raises:
            StoreError: the store failed; nothing of this batch is confirmed.
        """
        ledger = self.queues.get(queue) or self.table.new_ledger(queue)
        if ledger is None:
            self.refused += len(messages)
            return [None] * len(messages)
        room = self._room(queue, ledger, messages)
        accepted = messages[:room]
        self.table.added(sum(len(m.body) for m in accepted))
        results: list[bool | None]
        if self.committer is None or not accepted:
            results = [ledger.admit(m) for m in accepted]
            self._mark(queue)
            return results + [None] * (len(messages) - room)
        answer: asyncio.Future[list[bool]] = self._get_loop().create_future()
        try:
            committed = self.committer.enqueue([persistence.put_op(queue, m) for m in accepted])
            # Queued in the store's order, taken in on its answer even if the
            # caller gave up waiting: a committed message is never left unqueued.
            committed.add_done_callback(lambda done: self._committed(queue, accepted, done, answer))
            stored = await answer
        except StoreError:
            self.store_errors += 1  # a refused send counts, like a failed write behind
            raise
        # A duplicate of a stored id is confirmed again, not enqueued again.
        results = list(stored)
        return results + [None] * (len(messages) - room)

    def _committed(
        self,
        queue: str,
        messages: list[Message],
        done: asyncio.Future[list[bool]],
        answer: asyncio.Future[list[bool]],
    ) -> None:
        error = StoreError("store write was cancelled") if done.cancelled() else done.exception()
        if error is not None:
            if not answer.done():
                answer.set_exception(error)
            return
        # The queue may have been forgotten while idle: take the one there is now.
        ledger = self.ledger(queue, over_cap=True)
        results = [
            ledger.stored(m) if new else False
            for m, new in zip(messages, done.result(), strict=True)
        ]
        self._mark(queue)
        if not answer.done():
            answer.set_result(results)

    def _room(self, queue: str, ledger: QueueLedger, messages: list[Message]) -> int:
        """How many of ``messages`` the queue takes now (the node's memory
        alarm, then the queue's ``max_length`` and ``max_bytes``); the rest
        are counted as refused."""
        if len(messages) == 1:
            room = 0 if self.table.memory_full(ledger) else 1
        else:
            room = self.table.memory_room(ledger, [len(m.body) for m in messages])
        if room:
            sizes = (message_size(m.body, m.headers) for m in messages)
            rules = self.policies.for_queue(queue)
            room = rules.room(ledger.ready_count, ledger.total_bytes, room, sizes)
        self.refused += len(messages) - room
        return room

    def declare(self, pattern: str, fields: Mapping[str, object]) -> QueuePolicy:
        """Set the policy override of a queue name or pattern (for the node's
        operator: configuration or an admin peer); the queues it matches now
        follow it. Returns the policy it makes.

        Raises:
            TypeError, ValueError: a bad pattern or field; nothing changed.
        """
        made = self.policies.declare(pattern, fields)
        for name, ledger in self.queues.items():
            rules = self.policies.for_queue(name)
            ledger.max_attempts = rules.max_attempts or None
            ledger.lease_ttl = rules.lease_ttl
            ledger.max_delay = rules.max_delay
        return made

    def restore(self, skip: frozenset[str] = frozenset()) -> int:
        """Take up the stored backlog after a (re)start, but for the queues
        in ``skip`` (kept by others, e.g. a topic host); returns how many
        messages the store holds.

        Live messages stay on disk and are read back as consumers take
        them, marked redelivered (they may have been seen); dead letters
        come back in their ``.dead`` queues.
        """
        if self.store is None:
            return 0
        through = self.store.position()
        count = 0
        for queue, depth in self.store.counts().items():
            if depth["ready"] and queue not in skip:
                self.ledger(queue, over_cap=True).backlog.restored(depth["ready"], through)
                self._dirty.add(queue)
                count += depth["ready"]
        for letter in self.store.dead_letters():
            name = dead_letter_queue(letter.queue)
            self.ledger(name, over_cap=True).restore(letter.message)
            self._dirty.add(name)
            count += 1
        return count

    def _write(self, ops: list[Op | None]) -> None:
        """Commit ops in the background; a failure is counted, never silent.

        Losing such a write cannot lose a message: an ack or requeue that did
        not reach the disk only means the message comes back after a restart.
        """
        if self.committer is None:
            return
        real = [op for op in ops if op is not None]
        if not real:
            return
        # Queued now, not from a task: a backlog read queued later must see it.
        future = self.committer.enqueue(real)
        self._writes.add(future)
        future.add_done_callback(self._write_done)

    def forget_stored(self, queue: str, messages: list[Message]) -> None:
        """Delete from the store messages taken out of ``queue`` unacked
        (a subscription dropping its oldest): written behind, like acks."""
        self._write([*persistence.ack_ops(queue, messages)])

    def _write_done(self, future: asyncio.Future[list[bool]]) -> None:
        self._writes.discard(future)
        if not future.cancelled() and isinstance(future.exception(), StoreError):
            self.store_errors += 1

    # -- consumers -------------------------------------------------------

    def subscribe(
        self,
        queue: str,
        consumer: Hashable,
        sink: BatchSink,
        *,
        prefetch: int,
        lease_ttl: float | None = None,
    ) -> tuple[int, float]:
        """Deliver ``queue`` to ``consumer`` through ``sink``.

        The consumer asks; the host's policy decides (``QueuePolicy``).
        Returns the prefetch and lease ttl it got.
        """
        ledger = self.ledger(queue)
        rules = self.policies.for_queue(queue)
        prefetch = rules.prefetch(prefetch)
        lease = rules.lease(lease_ttl)
        ledger.add_consumer(consumer, prefetch, lease_ttl=lease)
        self._sinks[consumer] = sink
        self._subscriptions.setdefault(consumer, set()).add(queue)
        self._mark(queue)
        return prefetch, lease

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

    def drain(self, queue: str, consumer: Hashable) -> None:
        """Deliver nothing more of ``queue`` to ``consumer``; it keeps what it
        holds and settles it as usual (``unsubscribe`` when it is done)."""
        ledger = self.queues.get(queue)
        if ledger is not None:
            ledger.drain_consumer(consumer)

    def consumer_lost(self, consumer: Hashable) -> None:
        """A consumer died: every delivery it held is redelivered elsewhere."""
        for queue in list(self._subscriptions.get(consumer, ())):
            self.unsubscribe(queue, consumer, lost=True)

    def settle(
        self,
        queue: str,
        consumer: Hashable,
        *,
        acks: list[str] = (),  # type: ignore[assignment]
        nacks: list[tuple[str, float, str]] = (),  # type: ignore[assignment]
        rejects: list[tuple[str, str]] = (),  # type: ignore[assignment]
        extends: list[str] = (),  # type: ignore[assignment]
    ) -> list[str]:
        """Settle deliveries of ``consumer``; returns the ids it settled
        that it holds no lease on (expired, settled already, or never
        delivered to it), which change nothing (the ledger's Rule 4)."""
        ledger = self.queues.get(queue)
        if ledger is None:
            self.unknown_queue_settles += len(acks) + len(nacks) + len(rejects) + len(extends)
            return [*acks, *(n[0] for n in nacks), *(r[0] for r in rejects), *extends]
        now = self._get_loop().time()
        durable = self.committer is not None
        ops: list[Op | None] = []
        stale: list[str] = []
        if acks:
            acked = ledger.ack_many(acks, consumer)
            if durable:
                ops += persistence.ack_ops(queue, acked)
            if len(acked) < len(acks):
                done = {m.id for m in acked}
                stale += [mid for mid in acks if mid not in done]
        for mid, delay, reason in nacks:
            message = ledger.nack(mid, consumer, now, delay=delay, reason=reason or None)
            if message is None:
                stale.append(mid)
            elif durable and delay > 0:
                ops.append(persistence.requeue_op(queue, message, _clock.wall() + delay))
        for mid, reason in rejects:
            dead = ledger.reject(mid, consumer, reason)
            if dead is not None:
                self._bury(queue, [dead])
            else:
                stale.append(mid)
        for mid in extends:
            if not ledger.extend(mid, consumer, now):
                stale.append(mid)
        self._write(ops)
        self._mark(queue)
        return stale

    def _bury(self, queue: str, dead: list[Message]) -> None:
        if self.committer is not None:
            self._write(
                [persistence.dead_op(queue, m, policy.dead_reason(m.headers)) for m in dead]
            )
        target = self.ledger(dead_letter_queue(queue), over_cap=True)
        for message in dead:
            # A dead letter starts a new life in its own queue: fresh attempts,
            # but it keeps the redelivered mark, since it was seen.
            message.attempt = 0
            target.put(message)
        self._mark(target.name)

    def replay_dead(self, queue: str, limit: int | None = None) -> int:
        """Move dead letters of ``queue`` back into it: ready at once, attempt
        0, dead-letter headers removed. Returns how many moved."""
        dead = self.queues.get(dead_letter_queue(queue))
        if dead is None:
            return 0
        messages = dead.take_ready(limit)
        target = self.ledger(queue)
        for message in messages:
            message.headers = policy.without_dead_letter_headers(message.headers)
            message.attempt = 0
            target.restore(message)  # seen before, so it stays marked redelivered
        self._write([op for m in messages for op in persistence.replay_ops(queue, m)])
        self._mark(queue)
        return len(messages)

    def purge(self, queue: str) -> int:
        """Remove the ready messages of ``queue`` held in memory (of a dead
        letter queue: its dead letters), and their stored rows. Messages in
        flight or delayed stay; a durable queue's backlog still on disk is
        left (``ready_count`` says how much). Returns how many went."""
        ledger = self.queues.get(queue)
        if ledger is None:
            return 0
        messages = ledger.take_ready()
        self.purged += len(messages)
        # Stored rows go as an ack would take them (a dead letter's row with it).
        self._write([*persistence.ack_ops(queue, messages)])
        return len(messages)

    # -- scheduling ------------------------------------------------------

    def _mark(self, queue: str) -> None:
        self._dirty.add(queue)
        if not self._scheduled:
            self._scheduled = True
            self._get_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        # The loop's clock and _clock.wall: the two a test clock moves.
        now, wall = self._get_loop().time(), _clock.wall()
        dirty, self._dirty = self._dirty, set()
        for queue in dirty:
            ledger = self.queues.get(queue)
            if ledger is None:
                continue
            batches, dead = ledger.dispatch(now, wall=wall)
            for consumer, messages in batches:
                self._sinks[consumer](queue, messages)
            if dead:
                self._bury(queue, dead)
            if ledger.backlog.paging:
                self._read_backlog(queue, ledger)
        self._arm_timer()

    def _read_backlog(self, queue: str, ledger: QueueLedger) -> None:
        """Read a durable queue's next rows back from disk (see ``_core.paging``)."""
        request = ledger.page_request()
        if request is None or self.store is None or self.committer is None:
            return
        try:
            read = self.committer.read(
                lambda store: store.page(
                    queue, request.after, limit=request.limit, max_bytes=request.max_bytes
                )
            )
        except PigeonError:
            ledger.backlog.failed()  # closing
            return
        read.add_done_callback(lambda done: self._backlog_read(queue, ledger, done))

    def _backlog_read(self, queue: str, ledger: QueueLedger, done: asyncio.Future[Page]) -> None:
        if done.cancelled():  # the loop is closing: nobody reads on
            ledger.backlog.failed()
            return
        error = done.exception()
        if error is not None:
            self.store_errors += 1
            self.backlog_errors += 1
            ledger.backlog.failed()
            # Try again after a pause, not in a tight loop of failing reads.
            self._get_loop().call_later(BACKLOG_RETRY, self._mark, queue)
            return
        page = done.result()
        wall, mono = _clock.wall(), self._get_loop().time()
        rows = [
            (position, row.message, mono + (row.ready_at - wall) if row.ready_at > wall else 0.0)
            for position, row in page.rows
        ]
        if ledger.page_loaded(rows, page.more, mono):
            self._mark(queue)
        elif ledger.backlog.paging:
            self._mark(queue)  # only skipped rows: read on

    def _arm_timer(self) -> None:
        wakeups = [w for ledger in self.queues.values() if (w := ledger.next_wakeup()) is not None]
        if not wakeups:
            return
        at = min(wakeups)
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        # Ledger times are on the loop's clock (see _dispatch).
        self._timer_at = at
        self._timer = self._get_loop().call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._get_loop().time()
        for name, ledger in self.queues.items():
            ledger.expire(now)
            if ledger.has_work():
                self._dirty.add(name)
        self._dispatch()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop timers; commit pending writes and close the store."""
        self.close()
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout)
        if self.committer is not None:
            await asyncio.to_thread(self.committer.close, timeout=timeout)
        if self.store is not None:
            self.store.close()

    def stats(self) -> dict[str, Any]:
        return {name: ledger.snapshot() for name, ledger in self.queues.items()}
