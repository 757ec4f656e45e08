"""The topic host: publish-subscribe on a node's :class:`QueueHost`.

Each subscription is a queue of the host (``pigeon.sub.NAME`` for a durable
one, ``pigeon.tmp.ID`` for one subscriber's own), bound to a pattern. A
publish numbers the message for its topic, keeps it if the topic is
retained, and puts a copy into every bound subscription's queue, applying
the subscription's slow-subscriber policy at its buffer. From there the
queue machinery delivers: credit, leases, acks, retries and dead letters
work for subscribers as they do for workers.

The rules are those of :mod:`pigeon._core.topics`; this adapter adds:

Rule 1: a subscription with replay gets its history put into its queue and
is bound in the same synchronous step, so no publish falls between them.
Rule 2: a durable subscription keeps its queue while no subscriber runs (up
to its buffer, then its policy); a second subscriber with the same name
shares it. Asking for an existing name with another pattern is refused.
Rule 3: a subscriber's own subscription outlives a lost subscriber for
``orphan_grace`` seconds, so a subscriber whose link blinked resumes where
it was; after that it is removed (counted in ``expired``).
Rule 4: a resent publish (an id seen in the last ``DEDUPE`` publishes) is
confirmed again but not published twice.
Rule 5: each subscription holds its own copy of a message. What it drops
(its oldest, at its buffer) or the node refuses it (memory, queue bounds)
is counted here and told to its subscribers in the next message they get,
in the header ``headers.MISSED``: exact whatever the pattern, however late
the subscriber joined, and however many share the subscription.
Rule 6: a ``drop-oldest`` subscription takes the copies of many publishes
(``publish_many``) in one go: the oldest it would drop one by one are
dropped together, counted each, and told in the next message exactly as
one by one. When a bound of the node (memory, a queue's ``max_length`` or
``max_bytes``) could refuse one of them, they go one by one, so each
refusal is counted and told where it happened.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from .. import _clock
from .._core import headers
from .._core.limits import message_size
from .._core.topics import (
    Numbering,
    RetainedLog,
    Retention,
    SlowPolicy,
    StartAt,
    check_pattern,
    matches,
    numbered,
    stamp,
)
from ..errors import ConfigurationError
from ..message import Message, new_id
from .host import QueueHost
from .topic_store import Restored, SubscriptionRecord, TopicStore

DURABLE_PREFIX = "pigeon.sub."
OWN_PREFIX = "pigeon.tmp."
DEDUPE = 100_000  # publish ids remembered to drop resends (Rule 4)
MAX_SUBSCRIPTIONS = 10_000
ORPHAN_GRACE = 30.0  # seconds (Rule 3)

# Told (subscription queue, reason, its consumers) when a subscription is cut off.
Disconnected = Callable[[str, str, list[Hashable]], None]


class Published(NamedTuple):
    result: bool | None
    stored: asyncio.Future[None] | None = None
    full: TopicSubscription | None = None  # the ``block`` subscriber that refused it


def _copy(message: Message) -> Message:
    return msgspec.structs.replace(message, headers=dict(message.headers))


def _missed(message: Message) -> int:
    value = message.headers.get(headers.MISSED, "0")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else 0


def _add_missed(message: Message, count: int) -> int:
    """Add ``count`` to the message's missed header; returns how much its
    ``message_size`` grew (a queue holding it counts its bytes)."""
    # Only ever on this subscription's own copy (see _copy).
    held = message.headers
    before = held.get(headers.MISSED)
    after = held[headers.MISSED] = str(_missed(message) + count)
    if before is None:
        return len(headers.MISSED) + len(after)
    return len(after) - len(before)


def _missed_in(messages: list[Message]) -> int:
    """The missed headers of ``messages`` together."""
    told = 0
    for message in messages:
        value = message.headers.get(headers.MISSED)
        if value is not None and value != "0":
            told += _missed(message)
    return told


_PUBLISHED = Published(True)
# Bytes a missed header may add to what a subscription's queue holds in one
# go (Rule 6): two of them, each up to 18 digits.
_TOLD_BYTES = 2 * (len(headers.MISSED) + 18)
_RESENT = Published(False)


async def _all_written(writes: list[Awaitable[Any]]) -> None:
    await asyncio.gather(*writes)


def is_subscription(queue: str) -> bool:
    return queue.startswith(DURABLE_PREFIX) or queue.startswith(OWN_PREFIX)


@dataclass(slots=True)
class TopicSubscription:
    queue: str
    pattern: str
    policy: SlowPolicy
    buffer: int
    durable: bool
    dropped: int = 0
    refused: int = 0  # copies the node's memory or queue bounds refused
    orphaned_at: float | None = None  # when its last consumer left (own ones)
    owners: set[Hashable] = field(default_factory=set)
    record_id: str | None = None  # its record in a durable host's store
    unmarked: int = 0  # copies refused since its last delivery, not yet told (Rule 5)

    def row(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "policy": self.policy.value,
            "buffer": self.buffer,
            "durable": self.durable,
            "dropped": self.dropped,
            "refused": self.refused,
        }


class TopicHost:
    """Topics of one node; see the module docstring.

    Args:
        host: the node's queues (subscriptions live there).
        source: this host's numbering source (unique per run).
        on_disconnect: told (queue, reason) when a subscription is cut off.
    """

    def __init__(
        self,
        host: QueueHost,
        source: str,
        *,
        on_disconnect: Disconnected | None = None,
        clock: Callable[[], float] = _clock.wall,
        orphan_grace: float = ORPHAN_GRACE,
    ) -> None:
        self.host = host
        self.numbering = Numbering(source)
        self.history = RetainedLog()
        # A durable host keeps history and durable subscriptions in its store.
        self.store = TopicStore(host.committer) if host.committer is not None else None
        if self.store is not None:
            self.history.on_trim = self.store.forget
        self.subscriptions: dict[str, TopicSubscription] = {}
        self._routes: dict[str, list[TopicSubscription]] = {}  # topic -> bound (cache)
        self._recent: OrderedDict[str, None] = OrderedDict()
        self.on_disconnect = on_disconnect
        self._listeners: dict[str, list[Callable[[str], None]]] = {}  # told of a cut
        self.clock = clock
        self.orphan_grace = orphan_grace
        self.counts = {
            "published": 0,
            "duplicates": 0,
            "blocked": 0,
            "dropped": 0,
            "disconnected": 0,
            "refused": 0,
            "expired": 0,
            "unrouted": 0,
        }

    # -- publishing --------------------------------------------------------

    def _route(self, topic: str) -> list[TopicSubscription]:
        bound = self._routes.get(topic)
        if bound is None:
            bound = [s for s in self.subscriptions.values() if matches(s.pattern, topic)]
            if len(self._routes) >= 10_000:
                self._routes.clear()
            self._routes[topic] = bound
        return bound

    def _waiting(self, sub: TopicSubscription) -> int:
        ledger = self.host.queues.get(sub.queue)
        return ledger.ready_count if ledger is not None else 0

    def publish(self, topic: str, message: Message, *, fresh: bool = False) -> Published:
        """Publish on ``topic`` (already checked): ``result`` is True if
        published, False for a resend already published (Rule 4), None if
        refused because a ``block`` subscriber has no room (nothing was
        published); ``stored`` is set on a durable host when something was
        written for it: confirm the publish once it is done."""
        if not fresh:
            if message.id in self._recent:
                self.counts["duplicates"] += 1
                return Published(False)
        bound = self._route(topic)
        for sub in bound:
            if sub.policy is SlowPolicy.BLOCK and self._waiting(sub) >= sub.buffer:
                self.counts["blocked"] += 1
                return Published(None, full=sub)
        if not fresh:
            self._recent[message.id] = None
            if len(self._recent) > DEDUPE:
                self._recent.popitem(last=False)
        seq = self.numbering.next(topic)
        stamped = stamp(message, topic, seq, self.numbering.source, counts_drops=True)
        writes: list[Awaitable[Any]] = []
        if self.history.add(topic, seq, stamped, self.clock()) and self.store is not None:
            writes.append(self.store.keep(stamped))
        self.counts["published"] += 1
        if not bound:
            self.counts["unrouted"] += 1
        one, sizes = [stamped], [message_size(stamped.body, stamped.headers) if bound else 0]
        for sub in list(bound):
            if self._in_bulk(sub) and self._deliver_many(sub, one, sizes, len(stamped.body)):
                continue
            written = self._deliver(sub, stamped)
            if written is not None:
                writes.append(written)
        if not writes:
            return _PUBLISHED
        return Published(True, asyncio.ensure_future(_all_written(writes)))

    def publish_many(self, topic: str, messages: list[Message]) -> list[Published]:
        """``publish`` each of ``messages`` on ``topic`` (already checked),
        in order; answers as those calls one by one would. When every
        subscription bound to the topic drops its oldest, each gets the
        copies in one go (Rule 6)."""
        bound = self._route(topic)
        if not all(self._in_bulk(sub) for sub in bound):
            return [self.publish(topic, message) for message in messages]
        recent, numbering, history, counts = self._recent, self.numbering, self.history, self.counts
        source, store, now = numbering.source, self.store, self.clock()
        results: list[Published] = []
        stamped: list[Message] = []
        for message in messages:
            if message.id in recent:
                counts["duplicates"] += 1
                results.append(_RESENT)
                continue
            recent[message.id] = None
            if len(recent) > DEDUPE:
                recent.popitem(last=False)
            seq = numbering.next(topic)
            marked = stamp(message, topic, seq, source, counts_drops=True)
            stamped.append(marked)
            if history.add(topic, seq, marked, now) and store is not None:
                kept = asyncio.ensure_future(_all_written([store.keep(marked)]))
                results.append(Published(True, kept))
            else:
                results.append(_PUBLISHED)
        counts["published"] += len(stamped)
        if not bound:
            counts["unrouted"] += len(stamped)
        if not stamped or not bound:
            return results
        sizes = [message_size(m.body, m.headers) for m in stamped]
        if self._take_all(bound, sum(sizes)):
            bodies = sum(len(m.body) for m in stamped)
            for sub in list(bound):
                if not self._deliver_many(sub, stamped, sizes, bodies):
                    for marked in stamped:
                        self._deliver(sub, marked)  # (no writes: _in_bulk)
        else:
            # A bound of the node may refuse some: one by one, publish after
            # publish, so each refusal falls where it would (the node's
            # memory is shared by every subscription).
            for marked in stamped:
                for sub in list(bound):
                    self._deliver(sub, marked)
        return results

    def _take_all(self, bound: list[TopicSubscription], size: int) -> bool:
        # Every copy of messages of ``size`` bytes in all would be taken.
        host = self.host
        for sub in bound:
            if sub.queue not in host.queues or not host.takes_all(sub.queue, 0):
                return False
        return host.table.below_limit(len(bound) * (size + _TOLD_BYTES))

    def _in_bulk(self, sub: TopicSubscription) -> bool:
        # Copies of many publishes go into its queue in one go (Rule 6).
        return sub.policy is SlowPolicy.DROP_OLDEST and not (sub.durable and self.store is not None)

    def _deliver_many(
        self, sub: TopicSubscription, stamped: list[Message], sizes: list[int], bodies: int
    ) -> bool:
        """Rule 6: put a copy of each of ``stamped`` (``sizes`` their
        ``message_size``, ``bodies`` their bodies' bytes) into the queue of
        ``sub``, a ``drop-oldest`` one, as ``_deliver`` would one by one.
        False, having done nothing, when a bound of the node could refuse a
        copy: then ``_deliver`` each, which tells each refusal."""
        host = self.host
        ledger = host.queues.get(sub.queue)
        size = sum(sizes)
        if ledger is None or not host.takes_all(sub.queue, size + _TOLD_BYTES):
            return False
        count = len(stamped)
        waiting = ledger.ready_count
        # One by one, each copy that finds ``buffer`` or more waiting drops
        # the oldest, so the oldest ``drops`` of what waits followed by the
        # copies go: what waited first, then the first copies ("lost").
        drops = max(0, count - max(0, sub.buffer - waiting))
        old = min(drops, waiting)
        lost = drops - old
        told = 0  # missed, for whoever is next after the dropped ones
        if drops:
            dropped = ledger.take_ready(old) if old else []
            told = drops + _missed_in(dropped)
            sub.dropped += drops
            self.counts["dropped"] += drops
            ledger.stats.received += lost  # (each was put, then dropped)
        replace = msgspec.structs.replace
        copies = [replace(m, headers=dict(m.headers)) for m in stamped[lost:]]
        if lost:
            size -= sum(sizes[:lost])
        if told and old < waiting:  # the next is one that waited
            ledger.bytes_held += _add_missed(ledger.peek_ready(1)[0], told)
            told = 0
        told += sub.unmarked  # refused before (the first copy carries it, dropped or not)
        sub.unmarked = 0
        if told:
            size += _add_missed(copies[0], told)
        ledger.put_fresh(copies, size)
        host.took(sub.queue, bodies)
        return True

    def _deliver(self, sub: TopicSubscription, message: Message) -> Awaitable[Any] | None:
        # Each subscription gets its own copy: its queue counts attempts and
        # marks redeliveries on the message itself (Rule 5).
        copy = _copy(message)
        if self._waiting(sub) >= sub.buffer:
            if sub.policy is SlowPolicy.DISCONNECT:
                self.disconnect(sub.queue, f"it fell {sub.buffer} messages behind")
                return None
            self._drop_oldest(sub, copy)  # (a BLOCK one was checked before numbering)
        if sub.unmarked:
            _add_missed(copy, sub.unmarked)
            sub.unmarked = 0
        if sub.durable and self.store is not None:
            return self._put_durable(sub, copy)
        if self.host.put(sub.queue, copy, fresh=True) is None:
            self._refused(sub, 1 + _missed(copy))
        return None

    def _drop_oldest(self, sub: TopicSubscription, incoming: Message) -> None:
        """Rule 5: drop the oldest waiting message, and tell whoever gets the
        next one (the new oldest, or ``incoming`` if none waits)."""
        ledger = self.host.queues.get(sub.queue)
        dropped = ledger.take_ready(1) if ledger is not None else []
        if not dropped:
            return
        sub.dropped += 1
        self.counts["dropped"] += 1
        if sub.durable:
            self.host.forget_stored(sub.queue, dropped)
        assert ledger is not None
        head = ledger.peek_ready(1)
        if head:
            ledger.bytes_held += _add_missed(head[0], 1 + _missed(dropped[0]))
        else:
            _add_missed(incoming, 1 + _missed(dropped[0]))

    def _refused(self, sub: TopicSubscription, count: int) -> None:
        # A copy the node's bounds refused: counted, and told with the next.
        sub.refused += 1
        self.counts["refused"] += 1
        sub.unmarked += count

    async def _put_durable(self, sub: TopicSubscription, message: Message) -> None:
        # Stored before the publish is confirmed (topic_store Rule 2).
        (result,) = await self.host.put_many(sub.queue, [message])
        if result is None:
            self._refused(sub, 1 + _missed(message))

    # -- subscriptions -------------------------------------------------------

    def subscribe(
        self,
        pattern: str,
        *,
        name: str | None,
        policy: SlowPolicy,
        buffer: int,
        start: StartAt,
        queue: str | None = None,
    ) -> str:
        """Make (or join, for a durable ``name``) a subscription; returns the
        queue its subscribers consume. A remote subscriber names its own
        subscription's ``queue`` (``OWN_PREFIX`` + something unique), so it
        can ask again after its link blinked and find it as it left it.

        Raises:
            ConfigurationError: a bad pattern, or ``name`` exists with another
                pattern, or too many subscriptions.
            ReplayTrimmed: ``start.from_seq`` is no longer retained.
        """
        try:
            check_pattern(pattern)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if name is not None:
            queue = DURABLE_PREFIX + name
            held = self.subscriptions.get(queue)
            if held is not None:
                if held.pattern != pattern:
                    raise ConfigurationError(
                        f"subscription {name!r} exists for pattern {held.pattern!r}; use another "
                        "name, or the same pattern to share it"
                    )
                return queue  # joined: its position is kept, start applies only to a new one
        elif queue is not None:
            if not queue.startswith(OWN_PREFIX):
                raise ConfigurationError(f"a subscription's own queue starts {OWN_PREFIX!r}")
            held = self.subscriptions.get(queue)
            if held is not None:
                if held.pattern != pattern:
                    raise ConfigurationError(f"subscription {queue!r} is for another pattern")
                return queue
        else:
            queue = OWN_PREFIX + new_id()
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            raise ConfigurationError(
                f"this node holds {MAX_SUBSCRIPTIONS} subscriptions, its limit"
            )
        backlog = self.history.select(pattern, start, self.clock())  # may raise ReplayTrimmed
        sub = TopicSubscription(queue, pattern, policy, buffer, durable=name is not None)
        if sub.durable and self.store is not None:
            # Written behind: granted at once, on disk a group commit later.
            record = SubscriptionRecord(queue, pattern, policy.value, buffer)
            sub.record_id, _ = self.store.bind(record)
        # Rule 1: history in, then bound, with no await between.
        if backlog:
            self.host.put_fresh(queue, [_copy(m) for m in backlog])
        else:
            self.host.ledger(queue)
        self.subscriptions[queue] = sub
        self._routes.clear()
        if name is None:
            sub.orphaned_at = self.clock()
        return queue

    def listen(self, queue: str, told: Callable[[str], None]) -> None:
        """Tell ``told(reason)`` if the subscription behind ``queue`` is cut off."""
        self._listeners.setdefault(queue, []).append(told)

    def unlisten(self, queue: str, told: Callable[[str], None]) -> None:
        listeners = self._listeners.get(queue, [])
        if told in listeners:
            listeners.remove(told)

    def consumed(self, queue: str, consumer: Hashable) -> None:
        sub = self.subscriptions.get(queue)
        if sub is not None:
            sub.owners.add(consumer)
            sub.orphaned_at = None

    def left(self, queue: str, consumer: Hashable, *, lost: bool) -> None:
        """A consumer of ``queue`` left: cancelled (``lost`` False) or lost.
        A subscriber's own subscription goes when it cancels, and after
        ``orphan_grace`` when it is lost (Rule 3)."""
        sub = self.subscriptions.get(queue)
        if sub is None:
            return
        sub.owners.discard(consumer)
        if sub.durable or sub.owners:
            return
        if lost:
            sub.orphaned_at = self.clock()
        else:
            self.remove(queue)

    def expire_orphans(self) -> None:
        cutoff = self.clock() - self.orphan_grace
        for sub in list(self.subscriptions.values()):
            if sub.orphaned_at is not None and sub.orphaned_at < cutoff:
                self.counts["expired"] += 1
                self.remove(sub.queue)
        self.history.expire(self.clock())

    def remove(self, queue: str) -> bool:
        """Unbind and drop a subscription and what waits in it."""
        sub = self.subscriptions.pop(queue, None)
        if sub is None:
            return False
        if sub.record_id is not None and self.store is not None:
            self.store.unbind(sub.record_id)
        self._routes.clear()
        self._listeners.pop(queue, None)
        for consumer in sub.owners:  # (their leases come back, and go with the rest)
            self.host.unsubscribe(queue, consumer)
        ledger = self.host.queues.get(queue)
        if ledger is not None:
            ledger.take_ready()
            self.host.table.forget(queue)  # (unless something delayed is left)
        return True

    def disconnect(self, queue: str, reason: str) -> None:
        """Cut a subscription off (its policy is ``disconnect``): removed,
        counted, and its subscribers told."""
        listeners = self._listeners.get(queue, [])
        sub = self.subscriptions.get(queue)
        owners = list(sub.owners) if sub is not None else []
        if not self.remove(queue):
            return
        self.counts["disconnected"] += 1
        for told in listeners:
            told(reason)
        if self.on_disconnect is not None:
            self.on_disconnect(queue, reason, owners)

    def restore(self, restored: Restored) -> None:
        """Take up what a durable host's store kept (topic_store Rules 2
        and 4): bound again before anyone is served. The retention rules
        are the node's configuration, declared again at each start; history
        of a topic no rule covers then goes at the next expiry pass."""
        for row, record in restored.subscriptions:
            sub = TopicSubscription(
                record.queue, record.pattern, SlowPolicy(record.policy), record.buffer, True
            )
            sub.record_id = row
            self.subscriptions[record.queue] = sub
            self.host.ledger(record.queue, over_cap=True)
        self._routes.clear()
        for message in restored.retained:
            mark = numbered(message)
            if mark is not None:
                self.history.restore(mark[1], mark[2], message, message.created_at)
        for topic, seq in self.history.last_seqs().items():
            self.numbering.set_last(topic, seq)

    # -- history ---------------------------------------------------------------

    def retain(self, pattern: str, retention: Retention) -> None:
        """Keep history of the topics matching ``pattern``.

        Raises:
            ConfigurationError: a bad pattern or retention.
        """
        try:
            self.history.retain(pattern, retention)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    def stats(self) -> dict[str, Any]:
        return {
            **self.counts,
            **self.history.stats(),
            "subscriptions": {q: s.row() for q, s in sorted(self.subscriptions.items())},
        }
