"""The delivery state machine of one work queue, and its ledger of leases.

A message is in exactly one state::

    READY ──dispatch──▶ IN_FLIGHT ──ack──▶ ACKED (forgotten)
      ▲                   │  │ └─reject / over max_attempts─▶ DEAD
      │                   │  └─nack(delay>0)──▶ DELAYED ──due──▶ READY
      └──nack(0) / lease expired / consumer lost ┘

Rule 1: a message goes only to a consumer with credit; credit is
``prefetch`` minus the consumer's unsettled deliveries.
Rule 2: every delivery bumps ``attempt``; every delivery after the first is
marked ``redelivered``. A delivery without the flag has never been handed out.
A delivery with the flag has ``attempt`` of at least 2: a message restored
after a restart (marked redelivered, its lease lost with the process) counts
the delivery it may have had before the crash.
Rule 3: only ack forgets a message; every other exit keeps it.
Rule 4: a settle for a lease the consumer no longer holds (expired, or
already settled) changes nothing and is counted as stale.
Rule 5: a message whose ``attempt`` would pass ``max_attempts`` (workers that
keep dying on it) is dead-lettered instead of delivered again.
Rule 6: a consumer earns its prefetch by settling. With ``initial_credit``
set, a new consumer may hold that many deliveries at first, and each lease
it settles lets it hold one more, up to its prefetch (the window doubles
every round trip); a lease that expires unsettled sets it back to
``initial_credit``. A consumer that takes and never settles holds only its
first window, not a whole prefetch of the queue.
Rule 7: a message whose deadline has passed (``policy.past_deadline``) is
dead-lettered as ``expired`` when its turn to be handed out comes, unrun.
Rule 8: a draining consumer gets nothing more but keeps its leases, which it
settles as usual (a worker stopping gracefully: it finishes what it runs and
hands back the rest itself).
Rule 9: a message that asks not to be delivered before a time (the
``x-pigeon-not-before`` header, ``pigeon._core.delay``) waits as DELAYED
until then, however it came in (sent, stored, read back after a restart);
it is placed at the next dispatch, which knows the time.

The ledger does no I/O and reads no clock: callers pass ``now``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..errors import LocalProtocolError
from ..message import Message
from . import delay as not_before
from . import headers
from .limits import message_size
from .paging import DiskBacklog, PageRequest, Window
from .policy import (
    EXPIRED_REASON,
    attempt_limit_reason,
    dead_letter_headers,
    over_attempt_limit,
    past_deadline,
)

DEAD_SUFFIX = ".dead"
MAX_DELAY = 86_400.0


def dead_letter_queue(queue: str) -> str:
    """The name of the queue that receives ``queue``'s dead letters."""
    return queue + DEAD_SUFFIX


@dataclass(slots=True)
class Lease:
    """A view of one delivery in flight (built on demand; see ``leases``)."""

    message: Message
    consumer: Hashable
    expires_at: float


@dataclass(slots=True)
class _Consumer:
    """One consumer: its credit limit, lease ttl and the leases it holds.

    ``leases`` maps id → (message, expires_at) and is kept in expiry order:
    every lease of one consumer has the same ttl, new ones go to the end,
    and an extended one is moved to the end.
    """

    prefetch: int
    lease_ttl: float
    window: int  # deliveries it may hold now (Rule 6); at most prefetch
    leases: dict[str, tuple[Message, float]] = field(default_factory=dict)

    @property
    def unsettled(self) -> int:
        return len(self.leases)

    @property
    def credit(self) -> int:
        return self.window - len(self.leases)

    def settled(self, count: int = 1) -> None:
        self.window = min(self.prefetch, self.window + count)


@dataclass(slots=True)
class QueueStats:
    """Counters of one queue; every drop, retry and redelivery shows here."""

    received: int = 0
    duplicates: int = 0
    delivered: int = 0
    redelivered: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    expired: int = 0
    ttl_expired: int = 0  # dead-lettered unrun: their deadline passed (Rule 7)
    consumers_lost: int = 0
    stale_settles: int = 0
    scheduled: int = 0  # came with a not-before time still ahead (Rule 9)
    delay_clamped: int = 0  # ... further ahead than max_delay: held max_delay only
    bad_not_before: int = 0  # ... not a number: delivered at once

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class QueueLedger:
    """The state of one queue on its host.

    Args:
        name: queue name.
        lease_ttl: default seconds a delivery may stay unsettled before it is
            redelivered (a consumer may bring its own).
        max_attempts: deliveries after which a message is dead-lettered
            (None: no limit from the host; workers still apply their policy).
        dedupe_size: how many ids of forgotten (acked) messages are at least
            remembered to drop resends (at most twice as many are); ids still
            held are always recognised.
        max_delay: the longest a message's not-before time holds it (Rule 9).
    """

    name: str
    lease_ttl: float = 30.0
    max_attempts: int | None = None
    dedupe_size: int = 100_000
    initial_credit: int | None = None
    max_delay: float = not_before.DEFAULT_MAX_DELAY
    stats: QueueStats = field(default_factory=QueueStats)
    _ready: deque[Message] = field(default_factory=deque)
    # Messages with a not-before header, until a dispatch places them (Rule 9).
    _unplaced: list[Message] = field(default_factory=list)
    _delayed: list[tuple[float, int, Message]] = field(default_factory=list)
    _consumers: dict[Hashable, _Consumer] = field(default_factory=dict)
    bytes_held: int = 0  # bodies and headers held: ready, delayed and in flight
    _held: set[str] = field(default_factory=set)
    _seen: dict[str, None] = field(default_factory=dict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    window: Window = field(default_factory=Window)
    backlog: DiskBacklog = field(default_factory=DiskBacklog)

    # -- producers -------------------------------------------------------

    def put(self, message: Message, *, fresh: bool = False) -> bool:
        """Enqueue a new message; False (and nothing changes) for a known id.

        A ``fresh`` id (minted by the caller just now) cannot be a resend: it
        is neither checked nor tracked, which saves two set operations.
        """
        if fresh:
            self.stats.received += 1
            self.bytes_held += message_size(message.body, message.headers)
            self._enter(message)
            return True
        if not self.remember(message.id):
            self.stats.duplicates += 1
            return False
        self.stats.received += 1
        self.bytes_held += message_size(message.body, message.headers)
        self._enter(message)
        return True

    def _enter(self, message: Message) -> None:
        # Rule 9: a header check only when there are headers at all.
        if message.headers and headers.NOT_BEFORE in message.headers:
            self._unplaced.append(message)
        else:
            self._ready.append(message)

    def admit(self, message: Message) -> bool:
        """Enqueue a message a durable store has just stored as new.

        The store is the authority on what is new: an id still in the recent
        window (its tombstone expired in the store) is taken again rather
        than left stored but never queued. False only if the id is held.
        """
        if message.id in self._held:
            self.stats.duplicates += 1
            return False
        self._seen.pop(message.id, None)
        self._held.add(message.id)
        self.stats.received += 1
        self.bytes_held += message_size(message.body, message.headers)
        self._enter(message)
        return True

    def stored(self, message: Message) -> bool:
        """A message the store has just committed as new: it joins the
        window, or stays on disk (see :mod:`pigeon._core.paging`).

        Always True: the store is the authority on what is new.
        """
        backlog = self.backlog
        if message.id in self._held:
            # The store answers "new" only for an id it did not hold live, so
            # a held id was read back by a page read that came first (Rule 3).
            self.stats.received += 1
            return True
        if backlog.paging or self._window_full():
            self._seen.pop(message.id, None)
            self.stats.received += 1
            backlog.spill(message_size(message.body, message.headers))
            return True
        return self.admit(message)

    def _window_full(self) -> bool:
        return len(self._ready) >= self.window.messages or self.bytes_held >= self.window.bytes

    def page_request(self) -> PageRequest | None:
        """The backlog read to make now, if any (paging Rule 2)."""
        if not self._consumers:
            return None
        return self.backlog.request(len(self._ready), self.bytes_held, self.window)

    def page_loaded(self, rows: list[tuple[int, Message, float]], more: bool, now: float) -> int:
        """Take rows read back from the store: (position, message, ready_at
        on the caller's clock, 0.0 for now). Returns how many joined."""
        backlog = self.backlog
        held, seen = self._held, self._seen
        taken = size = 0
        last = 0
        for position, message, ready_at in rows:
            last = position
            if message.id in held or message.id in seen:
                continue  # in memory, or settled while the read was on its way
            if position <= backlog.seen_through:
                message.redelivered = True
            held.add(message.id)
            one = message_size(message.body, message.headers)
            self.bytes_held += one
            size += one
            if ready_at > now:
                heapq.heappush(self._delayed, (ready_at, next(self._seq), message))
            else:
                self._enter(message)
            taken += 1
        backlog.loaded(last, taken, size, more)
        return taken

    def put_fresh(self, messages: list[Message], size: int | None = None) -> None:
        """Enqueue messages whose ids were minted just now (see ``put``).

        ``size``: their ``message_size`` together, when the caller knows it
        (copies of one message have one size: it is not summed again)."""
        self.stats.received += len(messages)
        if size is None:
            size = sum(message_size(m.body, m.headers) for m in messages)
        self.bytes_held += size
        self._ready.extend(messages)

    def remember(self, message_id: str) -> bool:
        """Record an id as held; False when it is held or was seen lately."""
        if message_id in self._held or message_id in self._seen:
            return False
        self._held.add(message_id)
        return True

    def _forget(self, message_id: str) -> None:
        # Gone from the queue: keep the id in the window of recent ids, so a
        # late resend of it is still recognised. The window keeps at least
        # dedupe_size ids; it is trimmed by halves, which costs less per id.
        held = self._held
        if message_id not in held:
            return  # a fresh id: nobody will resend it
        held.remove(message_id)
        seen = self._seen
        seen[message_id] = None
        if len(seen) >= 2 * self.dedupe_size:
            self._seen = dict(itertools.islice(seen.items(), len(seen) - self.dedupe_size, None))

    def restore(self, message: Message, ready_at: float = 0.0) -> None:
        """Reload a message from the store after a restart.

        It may have been delivered before the crash, so it is marked
        redelivered (Rule 2 must hold across restarts).
        """
        self._held.add(message.id)
        self.bytes_held += message_size(message.body, message.headers)
        message.redelivered = True
        if ready_at > 0.0:
            heapq.heappush(self._delayed, (ready_at, next(self._seq), message))
        else:
            self._enter(message)

    # -- consumers -------------------------------------------------------

    def add_consumer(
        self, consumer: Hashable, prefetch: int, *, lease_ttl: float | None = None
    ) -> None:
        if prefetch < 1:
            raise LocalProtocolError(f"prefetch must be >= 1, not {prefetch}")
        ttl = self.lease_ttl if lease_ttl is None else lease_ttl
        if not ttl > 0:
            raise LocalProtocolError(f"lease_ttl must be > 0 seconds, not {ttl}")
        existing = self._consumers.get(consumer)
        if existing is not None:
            existing.prefetch = prefetch
            # Asking again keeps what was earned, within the new prefetch.
            earned = prefetch if self.initial_credit is None else existing.window
            existing.window = min(earned, prefetch)
            existing.lease_ttl = ttl
        else:
            self._consumers[consumer] = _Consumer(prefetch, ttl, self._first_window(prefetch))

    def drain_consumer(self, consumer: Hashable) -> bool:
        """Rule 8: give ``consumer`` nothing more; False if it is unknown."""
        existing = self._consumers.get(consumer)
        if existing is None:
            return False
        existing.prefetch = existing.window = 0
        return True

    def remove_consumer(self, consumer: Hashable, *, lost: bool = False) -> int:
        """Drop a consumer; its unsettled deliveries go back to the front.

        Returns how many deliveries were returned.
        """
        gone = self._consumers.pop(consumer, None)
        if gone is None:
            return 0
        if lost:
            self.stats.consumers_lost += 1
        self._ready.extendleft(message for message, _ in reversed(gone.leases.values()))
        return len(gone.leases)

    def _first_window(self, prefetch: int) -> int:
        return prefetch if self.initial_credit is None else min(prefetch, self.initial_credit)

    @property
    def consumer_count(self) -> int:
        return len(self._consumers)

    # -- dispatch --------------------------------------------------------

    def dispatch(
        self, now: float, *, chunk: int = 256, wall: float | None = None
    ) -> tuple[list[tuple[Hashable, list[Message]]], list[Message]]:
        """Hand ready messages to consumers with credit.

        Consumers are served in rounds, each taking at most ``chunk`` and an
        even share of what is ready, so shares differ by at most one and each
        consumer gets a batch per frame.

        ``wall`` is the wall-clock time that messages' deadlines and
        not-before times are read against (Rules 7 and 9); None skips the
        deadline check and hands out messages waiting for a time at once.

        Returns:
            ``(batches, dead)``: per consumer the messages it now holds a lease
            on, and messages dead-lettered under Rules 5 and 7.
        """
        if self._unplaced:
            self._place(now, wall)
        self._promote_due(now)
        dead: list[Message] = []
        ready = self._ready
        if not ready:
            return [], dead
        batches: dict[Hashable, list[Message]] = {}
        limit = self.max_attempts or 0
        stats = self.stats
        while ready:
            hungry = [(cid, c) for cid, c in self._consumers.items() if c.credit > 0]
            if not hungry:
                break
            for index, (cid, consumer) in enumerate(hungry):
                if not ready:
                    break
                even_share = -(-len(ready) // (len(hungry) - index))
                take = min(chunk, consumer.credit, even_share)
                out = batches.setdefault(cid, [])
                leases = consumer.leases
                expires_at = now + consumer.lease_ttl
                for _ in range(take):
                    message = ready.popleft()
                    if wall is not None and past_deadline(message, wall):
                        stats.ttl_expired += 1
                        dead.append(self._mark_dead(message, EXPIRED_REASON))
                        continue
                    if over_attempt_limit(message.attempt + 1, limit):
                        reason = attempt_limit_reason(self.name, message.attempt)
                        dead.append(self._mark_dead(message, reason))
                        continue
                    message.attempt += 1
                    if message.attempt > 1:
                        message.redelivered = True
                    elif message.redelivered:
                        # Restored after a restart (leases are not stored):
                        # it may have been delivered, so this is at least
                        # the second delivery (Rule 2).
                        message.attempt = 2
                    if message.redelivered:
                        stats.redelivered += 1
                    leases[message.id] = (message, expires_at)
                    out.append(message)
                # Rotate: the consumer just served goes to the back of the
                # line, so the next message starts with someone else.
                self._consumers[cid] = self._consumers.pop(cid)
        stats.delivered += sum(len(b) for b in batches.values())
        return [(cid, msgs) for cid, msgs in batches.items() if msgs], dead

    def _place(self, now: float, wall: float | None) -> None:
        """Rule 9: messages with a not-before time join the delayed heap on
        the caller's clock (``now``), or the ready queue if it has passed."""
        unplaced, self._unplaced = self._unplaced, []
        stats = self.stats
        for message in unplaced:
            if wall is None:
                self._ready.append(message)
                continue
            reading, wait = not_before.read(message.headers, wall, self.max_delay)
            if reading is not_before.Reading.BAD:
                stats.bad_not_before += 1
            elif reading is not_before.Reading.CLAMPED:
                stats.delay_clamped += 1
            if wait > 0:
                stats.scheduled += 1
                heapq.heappush(self._delayed, (now + wait, next(self._seq), message))
            else:
                self._ready.append(message)

    def _promote_due(self, now: float) -> None:
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            self._ready.append(heapq.heappop(delayed)[2])

    # -- settling --------------------------------------------------------

    def _release(self, message_id: str, consumer: Hashable) -> Message | None:
        owner = self._consumers.get(consumer)
        lease = owner.leases.pop(message_id, None) if owner is not None else None
        if owner is None or lease is None:
            self.stats.stale_settles += 1
            return None
        owner.settled()
        return lease[0]

    def ack(self, message_id: str, consumer: Hashable) -> bool:
        """Settle a delivery as done; the message is forgotten (Rule 3)."""
        message = self._release(message_id, consumer)
        if message is None:
            return False
        self.bytes_held -= message_size(message.body, message.headers)
        self._forget(message_id)
        self.stats.acked += 1
        return True

    def ack_many(self, message_ids: list[str], consumer: Hashable) -> list[Message]:
        """Ack a batch of deliveries of one consumer; returns the acked messages."""
        owner = self._consumers.get(consumer)
        if owner is None:
            self.stats.stale_settles += len(message_ids)
            return []
        leases = owner.leases
        acked: list[Message] = []
        for message_id in message_ids:
            lease = leases.pop(message_id, None)
            if lease is None:
                self.stats.stale_settles += 1
            else:
                self._forget(message_id)
                acked.append(lease[0])
                self.bytes_held -= message_size(lease[0].body, lease[0].headers)
        owner.settled(len(acked))
        self.stats.acked += len(acked)
        return acked

    def nack(
        self,
        message_id: str,
        consumer: Hashable,
        now: float,
        *,
        delay: float = 0.0,
        reason: str | None = None,
    ) -> Message | None:
        """Settle a delivery as not done: ready again now, or after ``delay``."""
        message = self._release(message_id, consumer)
        if message is None:
            return None
        # Delays come from peers: NaN and negatives mean now, huge ones a day.
        delay = min(delay, MAX_DELAY) if delay > 0 else 0.0
        self.stats.nacked += 1
        message.redelivered = True
        if reason:
            before = message_size(message.body, message.headers)
            message.headers = {**message.headers, headers.LAST_ERROR: reason}
            self.bytes_held += message_size(message.body, message.headers) - before
        if delay > 0:
            heapq.heappush(self._delayed, (now + delay, next(self._seq), message))
        else:
            self._ready.appendleft(message)
        return message

    def reject(self, message_id: str, consumer: Hashable, reason: str) -> Message | None:
        """Settle a delivery as failed for good: returns the dead letter."""
        message = self._release(message_id, consumer)
        if message is None:
            return None
        return self._mark_dead(message, reason)

    def _mark_dead(self, message: Message, reason: str) -> Message:
        self.bytes_held -= message_size(message.body, message.headers)
        self._forget(message.id)
        self.stats.dead_lettered += 1
        # The dead-queue header names the first queue it died in, even when a
        # dead letter dies again: that is where a store keeps its row.
        message.headers = dead_letter_headers(message.headers, self.name, reason, message.attempt)
        return message

    def extend(self, message_id: str, consumer: Hashable, now: float) -> bool:
        """Renew a lease for another lease ttl of its consumer."""
        owner = self._consumers.get(consumer)
        lease = owner.leases.pop(message_id, None) if owner is not None else None
        if owner is None or lease is None:
            self.stats.stale_settles += 1
            return False
        # Re-inserted at the end, so the consumer's leases stay in expiry order.
        owner.leases[message_id] = (lease[0], now + owner.lease_ttl)
        return True

    def expire(self, now: float) -> int:
        """Return expired leases to the front of the queue; returns how many."""
        returned: list[Message] = []
        for owner in self._consumers.values():
            leases = owner.leases
            expired = []
            for message_id, (message, expires_at) in leases.items():
                if expires_at > now:
                    break
                expired.append(message_id)
                returned.append(message)
            for message_id in expired:
                del leases[message_id]
            if expired:
                owner.window = self._first_window(owner.prefetch)
        self._ready.extendleft(reversed(returned))
        self.stats.expired += len(returned)
        return len(returned)

    def take_ready(self, limit: int | None = None) -> list[Message]:
        """Remove up to ``limit`` ready messages (oldest first) and forget them.

        For moving messages elsewhere (replaying dead letters); messages in
        flight or delayed stay.
        """
        count = len(self._ready) if limit is None else min(limit, len(self._ready))
        taken = [self._ready.popleft() for _ in range(count)]
        for message in taken:
            self._held.discard(message.id)
            self.bytes_held -= message_size(message.body, message.headers)
        return taken

    def peek_ready(self, limit: int) -> list[Message]:
        """The oldest ``limit`` ready messages, left in place."""
        return list(itertools.islice(self._ready, limit))

    # -- inspection ------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """The earliest time a lease expires or a delayed message is due."""
        if self._unplaced:
            return float("-inf")  # to be placed by a dispatch now
        times = [
            next(iter(owner.leases.values()))[1]
            for owner in self._consumers.values()
            if owner.leases
        ]
        if self._delayed:
            times.append(self._delayed[0][0])
        return min(times) if times else None

    @property
    def leases(self) -> dict[str, Lease]:
        """Every delivery in flight, by message id (a fresh view)."""
        return {
            message_id: Lease(message, cid, expires_at)
            for cid, owner in self._consumers.items()
            for message_id, (message, expires_at) in owner.leases.items()
        }

    _leases = leases  # the name the model tests read

    @property
    def total_bytes(self) -> int:
        """Bytes the queue holds: in memory (ready, delayed, in flight) and on disk."""
        return self.bytes_held + self.backlog.bytes

    @property
    def ready_count(self) -> int:
        """Ready messages, in memory and on disk."""
        return len(self._ready) + self.backlog.count

    @property
    def delayed_count(self) -> int:
        return len(self._delayed) + len(self._unplaced)

    @property
    def in_flight_count(self) -> int:
        return sum(len(owner.leases) for owner in self._consumers.values())

    def is_idle(self) -> bool:
        """Nothing held and nobody consuming: forgetting the queue loses
        only the ids remembered for de-duplicating resends."""
        return (
            not self._ready
            and not self._delayed
            and not self._unplaced
            and not self._consumers
            and not self.backlog.paging
        )

    def has_work(self) -> bool:
        return bool(self._ready) or bool(self._delayed) or bool(self._unplaced)

    def is_dispatchable(self) -> bool:
        return bool(self._ready) and any(c.credit > 0 for c in self._consumers.values())

    def snapshot(self) -> dict[str, int]:
        """Depths and counters, for ``pigeon queues`` and stats."""
        return {
            "ready": self.ready_count,
            "on_disk": self.backlog.count,
            "delayed": self.delayed_count,
            "in_flight": self.in_flight_count,
            "consumers": len(self._consumers),
            **self.stats.as_dict(),
        }
