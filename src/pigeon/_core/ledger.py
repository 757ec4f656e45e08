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
Rule 3: only ack forgets a message; every other exit keeps it.
Rule 4: a settle for a lease the consumer no longer holds (expired, or
already settled) changes nothing and is counted as stale.
Rule 5: a message whose ``attempt`` would pass ``max_attempts`` (workers that
keep dying on it) is dead-lettered instead of delivered again.

The ledger does no I/O and reads no clock: callers pass ``now``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from ..errors import LocalProtocolError
from ..message import Message

DEAD_SUFFIX = ".dead"


def dead_letter_queue(queue: str) -> str:
    """The name of the queue that receives ``queue``'s dead letters."""
    return queue + DEAD_SUFFIX


@dataclass(slots=True)
class Lease:
    message: Message
    consumer: Hashable
    expires_at: float


@dataclass(slots=True)
class _Consumer:
    prefetch: int
    unsettled: int = 0

    @property
    def credit(self) -> int:
        return self.prefetch - self.unsettled


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
    consumers_lost: int = 0
    stale_settles: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(slots=True)
class QueueLedger:
    """The state of one queue on its host.

    Args:
        name: queue name.
        lease_ttl: seconds a delivery may stay unsettled before it is redelivered.
        max_attempts: deliveries after which a message is dead-lettered
            (None: no limit from the host; workers still apply their policy).
        dedupe_size: how many recently seen ids are remembered to drop resends.
    """

    name: str
    lease_ttl: float = 30.0
    max_attempts: int | None = None
    dedupe_size: int = 100_000
    stats: QueueStats = field(default_factory=QueueStats)
    _ready: deque[Message] = field(default_factory=deque)
    _delayed: list[tuple[float, int, Message]] = field(default_factory=list)
    _leases: dict[str, Lease] = field(default_factory=dict)
    _consumers: dict[Hashable, _Consumer] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    # -- producers -------------------------------------------------------

    def put(self, message: Message) -> bool:
        """Enqueue a new message; False (and nothing changes) for a known id."""
        if not self.remember(message.id):
            self.stats.duplicates += 1
            return False
        self.stats.received += 1
        self._ready.append(message)
        return True

    def remember(self, message_id: str) -> bool:
        """Record an id as seen; False when it already was (a resend)."""
        seen = self._seen
        if message_id in seen:
            return False
        seen[message_id] = None
        if len(seen) > self.dedupe_size:
            seen.popitem(last=False)
        return True

    def restore(self, message: Message, ready_at: float = 0.0) -> None:
        """Reload a message from the store after a restart.

        It may have been delivered before the crash, so it is marked
        redelivered (Rule 2 must hold across restarts).
        """
        self.remember(message.id)
        message.redelivered = True
        if ready_at > 0.0:
            heapq.heappush(self._delayed, (ready_at, next(self._seq), message))
        else:
            self._ready.append(message)

    # -- consumers -------------------------------------------------------

    def add_consumer(self, consumer: Hashable, prefetch: int) -> None:
        if prefetch < 1:
            raise LocalProtocolError(f"prefetch must be >= 1, not {prefetch}")
        existing = self._consumers.get(consumer)
        if existing is not None:
            existing.prefetch = prefetch
        else:
            self._consumers[consumer] = _Consumer(prefetch)

    def remove_consumer(self, consumer: Hashable, *, lost: bool = False) -> int:
        """Drop a consumer; its unsettled deliveries go back to the front.

        Returns how many deliveries were returned.
        """
        if self._consumers.pop(consumer, None) is None:
            return 0
        if lost:
            self.stats.consumers_lost += 1
        returned = [mid for mid, lease in self._leases.items() if lease.consumer == consumer]
        for mid in reversed(returned):
            self._ready.appendleft(self._leases.pop(mid).message)
        return len(returned)

    @property
    def consumer_count(self) -> int:
        return len(self._consumers)

    # -- dispatch --------------------------------------------------------

    def dispatch(self, now: float, *, chunk: int = 256) -> tuple[
        list[tuple[Hashable, list[Message]]], list[Message]
    ]:
        """Hand ready messages to consumers with credit.

        Consumers are served round-robin, up to ``chunk`` messages each per
        round, so each gets a fair share and a batch per frame.

        Returns:
            ``(batches, dead)``: per consumer the messages it now holds a lease
            on, and messages dead-lettered under Rule 5.
        """
        self._promote_due(now)
        batches: dict[Hashable, list[Message]] = {}
        dead: list[Message] = []
        ready = self._ready
        if not ready:
            return [], dead
        expires_at = now + self.lease_ttl
        while ready:
            hungry = [(cid, c) for cid, c in self._consumers.items() if c.credit > 0]
            if not hungry:
                break
            share = max(1, min(chunk, -(-len(ready) // len(hungry))))
            for cid, consumer in hungry:
                take = min(share, consumer.credit, len(ready))
                if take == 0:
                    break
                out = batches.setdefault(cid, [])
                for _ in range(take):
                    message = ready.popleft()
                    if self.max_attempts is not None and message.attempt >= self.max_attempts:
                        dead.append(self._mark_dead(message, self._limit_reason(message)))
                        continue
                    message.attempt += 1
                    if message.attempt > 1:
                        message.redelivered = True
                    if message.redelivered:
                        self.stats.redelivered += 1
                    self._leases[message.id] = Lease(message, cid, expires_at)
                    consumer.unsettled += 1
                    out.append(message)
                # Rotate: the consumer just served goes to the back of the
                # line, so the next message starts with someone else.
                self._consumers[cid] = self._consumers.pop(cid)
        self.stats.delivered += sum(len(b) for b in batches.values())
        return [(cid, msgs) for cid, msgs in batches.items() if msgs], dead

    def _limit_reason(self, message: Message) -> str:
        return f"delivered {message.attempt} times, the limit for queue {self.name!r}"

    def _promote_due(self, now: float) -> None:
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            self._ready.append(heapq.heappop(delayed)[2])

    # -- settling --------------------------------------------------------

    def _release(self, message_id: str, consumer: Hashable) -> Lease | None:
        lease = self._leases.get(message_id)
        if lease is None or lease.consumer != consumer:
            self.stats.stale_settles += 1
            return None
        del self._leases[message_id]
        owner = self._consumers.get(consumer)
        if owner is not None:
            owner.unsettled -= 1
        return lease

    def ack(self, message_id: str, consumer: Hashable) -> bool:
        """Settle a delivery as done; the message is forgotten (Rule 3)."""
        if self._release(message_id, consumer) is None:
            return False
        self.stats.acked += 1
        return True

    def nack(
        self, message_id: str, consumer: Hashable, now: float, *, delay: float = 0.0,
        reason: str | None = None,
    ) -> Message | None:
        """Settle a delivery as not done: ready again now, or after ``delay``."""
        lease = self._release(message_id, consumer)
        if lease is None:
            return None
        self.stats.nacked += 1
        message = lease.message
        message.redelivered = True
        if reason:
            message.headers = {**message.headers, "x-pigeon-last-error": reason}
        if delay > 0:
            heapq.heappush(self._delayed, (now + delay, next(self._seq), message))
        else:
            self._ready.appendleft(message)
        return message

    def reject(self, message_id: str, consumer: Hashable, reason: str) -> Message | None:
        """Settle a delivery as failed for good: returns the dead letter."""
        lease = self._release(message_id, consumer)
        if lease is None:
            return None
        return self._mark_dead(lease.message, reason)

    def _mark_dead(self, message: Message, reason: str) -> Message:
        self.stats.dead_lettered += 1
        message.headers = {
            **message.headers,
            "x-pigeon-dead-reason": reason,
            "x-pigeon-dead-queue": self.name,
            "x-pigeon-attempts": str(message.attempt),
        }
        return message

    def extend(self, message_id: str, consumer: Hashable, now: float) -> bool:
        """Renew a lease for another ``lease_ttl``."""
        lease = self._leases.get(message_id)
        if lease is None or lease.consumer != consumer:
            self.stats.stale_settles += 1
            return False
        # Leases share one ttl, so keeping the dict in expiry order (re-insert
        # at the end) lets expire() and next_wakeup() look only at the front.
        del self._leases[message_id]
        lease.expires_at = now + self.lease_ttl
        self._leases[message_id] = lease
        return True

    def expire(self, now: float) -> int:
        """Return expired leases to the front of the queue; returns how many."""
        leases = self._leases
        expired: list[Lease] = []
        for mid in leases:
            if leases[mid].expires_at > now:
                break
            expired.append(leases[mid])
        for lease in reversed(expired):
            del leases[lease.message.id]
            owner = self._consumers.get(lease.consumer)
            if owner is not None:
                owner.unsettled -= 1
            self._ready.appendleft(lease.message)
        self.stats.expired += len(expired)
        return len(expired)

    # -- inspection ------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """The earliest time a lease expires or a delayed message is due."""
        times = [next(iter(self._leases.values())).expires_at] if self._leases else []
        if self._delayed:
            times.append(self._delayed[0][0])
        return min(times) if times else None

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def delayed_count(self) -> int:
        return len(self._delayed)

    @property
    def in_flight_count(self) -> int:
        return len(self._leases)

    def has_work(self) -> bool:
        return bool(self._ready) or bool(self._delayed)

    def is_dispatchable(self) -> bool:
        return bool(self._ready) and any(c.credit > 0 for c in self._consumers.values())

    def snapshot(self) -> dict[str, int]:
        """Depths and counters, for ``pigeon queues`` and stats."""
        return {
            "ready": len(self._ready),
            "delayed": len(self._delayed),
            "in_flight": len(self._leases),
            "consumers": len(self._consumers),
            **self.stats.as_dict(),
        }
