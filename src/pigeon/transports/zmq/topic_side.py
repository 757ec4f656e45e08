"""Topics on a node's bind addresses: what the router does with a peer's
publishes (Sends to ``pigeon.publish.TOPIC``) and subscriptions (a
Subscribe, then a Consume of the subscription's queue).

Rule 1: publishing is sending to the topic: the ACL's ``send`` grant is
checked against the topic. Subscribing, and consuming a subscription's
queue, is consuming: its ``consume`` grant against the pattern.
Rule 2: a refused Subscribe is answered by the Verdict of the Consume that
follows it, with the reason (and, for a trimmed replay, the topic and the
first number retained); nothing else is sent for it.
Rule 3: a Consume of a subscription's queue that this node does not hold
(its node restarted, or it expired, or it was cut off) is refused, never
turned into a plain queue that nothing publishes to.
Rule 4: a subscription cut off by its policy is a Verdict withdrawing the
grant, sent to each of its consumers, with the reason.
Rule 5: a peer's publishes are taken in ``SLICE`` at a time, the loop
running between slices, so dispatch to subscribers and every other peer's
frames get turns while a big Send frame (up to ``MAX_FRAME_ITEMS``
publishes) comes in. Each slice is answered once published (confirmed, or
refused). A peer's frames are taken in the order they came, a Subscribe of
that peer after what it sent before; and past ``PEER_WAITING`` publishes
(or ``PEER_WAITING_BYTES`` of bodies) waiting for one peer, or
``ALL_WAITING`` (``ALL_WAITING_BYTES``) for all, all of that peer's are
taken at once (memory stays bounded, a flood costs its own sender time).
Rule 6: a peer may make at most ``MAX_QUEUES_PER_PEER`` subscriptions that
still stand, so the node's own cap (``topic_host.MAX_SUBSCRIPTIONS``) keeps
room for others; the refusals kept for a Consume still to come are bounded
too (``MAX_WAITING_REFUSALS``).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..._core import frames
from ..._core.acl import Verb
from ..._core.limits import MAX_QUEUES_PER_PEER
from ..._core.policy import PUBLISH_PREFIX, RefusalReason
from ..._core.topics import StartAt, check_policy
from ...errors import ConfigurationError, ReplayTrimmed
from ...message import Message
from ..topic_host import TopicHost, is_subscription
from .security import Guard

Send = Callable[[bytes, frames.Frame], None]
Refusal = tuple[str, RefusalReason, str]

MAX_WAITING_REFUSALS = 10_000  # refused Subscribes whose Consume has not come (Rule 6)
SLICE = 100  # publishes taken in per loop step (Rule 5): measured best of 50-1000
# Publishes of one peer waiting their turn, at most: a connection's own
# bound on its unconfirmed sends (``outbox_limit``), or 16 MiB of bodies.
PEER_WAITING, PEER_WAITING_BYTES = 100_000, 16 << 20
ALL_WAITING, ALL_WAITING_BYTES = 200_000, 64 << 20  # ... of all peers together


@dataclass(slots=True)
class _Waiting:
    """A Send frame of publishes, taken in from ``at`` on (``size``: the
    bytes of their bodies)."""

    topic: str
    messages: list[Message]
    allowed: bool
    size: int
    at: int = 0


def publish_queue(topic: str) -> str:
    """The queue name a connecting node sends ``topic``'s publishes to."""
    return PUBLISH_PREFIX + topic


class RouterTopics:
    """The router's topic frames; see the module docstring."""

    def __init__(self, topics: TopicHost, send: Send, guard: Guard | None) -> None:
        self.topics = topics
        self._send = send
        self.guard = guard
        self._refused: dict[tuple[bytes, str], frames.Verdict] = {}  # Rule 2
        self._made: dict[bytes, set[str]] = {}  # subscriptions each peer made (Rule 6)
        topics.on_disconnect = self.cut  # Rule 4
        self._waiting: dict[bytes, deque[_Waiting]] = {}  # Rule 5, by peer
        self._peer_counts: dict[bytes, tuple[int, int]] = {}  # waiting: (publishes, bytes)
        self._all_count = self._all_bytes = 0
        self._scheduled: set[bytes] = set()  # peers whose next slice is due
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def publish(self, identity: bytes, user: str, queue: str, messages: list[Message]) -> None:
        """Publish a peer's Send to ``pigeon.publish.TOPIC``, and answer it:
        confirmed once published (and, on a durable node, stored), or
        refused; ``SLICE`` at a time (Rule 5)."""
        topic = queue.removeprefix(PUBLISH_PREFIX)
        allowed = self.guard is None or self.guard.allows(user, Verb.SEND, topic)
        waiting = self._waiting.get(identity)
        if waiting is None:
            if len(messages) <= SLICE:
                self._publish(identity, topic, messages, allowed)
                return
            self._publish(identity, topic, messages[:SLICE], allowed)
            waiting = self._waiting[identity] = deque()
            if identity not in self._scheduled:
                self._scheduled.add(identity)
                self._get_loop().call_soon(self._next_slice, identity)
            at = SLICE
        else:
            at = 0
        frame = _Waiting(topic, messages, allowed, sum(len(m.body) for m in messages), at)
        waiting.append(frame)
        self._count(identity, len(messages) - at, frame.size)
        count, size = self._peer_counts[identity]
        if (
            count > PEER_WAITING
            or size > PEER_WAITING_BYTES
            or self._all_count > ALL_WAITING
            or self._all_bytes > ALL_WAITING_BYTES
        ):
            self._catch_up(identity)

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _count(self, identity: bytes, count: int, size: int) -> None:
        held, held_bytes = self._peer_counts.get(identity, (0, 0))
        self._peer_counts[identity] = (held + count, held_bytes + size)
        self._all_count += count
        self._all_bytes += size

    def _next_slice(self, identity: bytes) -> None:
        self._scheduled.discard(identity)
        if self._closed or identity not in self._waiting:
            return  # (taken in at once meanwhile: _catch_up)
        self._take(identity, SLICE)
        if identity in self._waiting:
            self._scheduled.add(identity)
            self._get_loop().call_soon(self._next_slice, identity)

    def _catch_up(self, identity: bytes) -> None:
        """Take in all that waits of ``identity``'s publishes, now."""
        if identity in self._waiting:
            self._take(identity, self._peer_counts[identity][0])

    def _take(self, identity: bytes, budget: int) -> None:
        # Up to ``budget`` of the peer's waiting publishes, in order.
        waiting = self._waiting[identity]
        while budget > 0 and waiting:
            head = waiting[0]
            part = head.messages[head.at : head.at + budget]
            head.at += len(part)
            budget -= len(part)
            if head.at >= len(head.messages):
                waiting.popleft()
                self._count(identity, -len(part), -head.size)  # (counted whole)
            else:
                self._count(identity, -len(part), 0)
            self._publish(identity, head.topic, part, head.allowed)
        if not waiting:
            del self._waiting[identity]
            del self._peer_counts[identity]

    def _publish(self, identity: bytes, topic: str, messages: list[Message], allowed: bool) -> None:
        if not allowed:
            denied = [(m.id, RefusalReason.FORBIDDEN, topic) for m in messages]
            self._send(identity, frames.Refuse(denied))
            return
        confirmed: list[str] = []
        refused: list[Refusal] = []
        for message, published in zip(
            messages, self.topics.publish_many(topic, messages), strict=True
        ):
            if published.result is None:
                why = f"a 'block' subscriber of topic {topic!r} has no room"
                refused.append((message.id, RefusalReason.FULL, why))
            elif published.stored is not None:
                published.stored.add_done_callback(
                    functools.partial(self._stored, identity, message.id)
                )
            else:
                confirmed.append(message.id)
        if confirmed:
            self._send(identity, frames.Confirm(confirmed))
        if refused:
            self._send(identity, frames.Refuse(refused))

    def close(self) -> None:
        """Take in nothing more (what waits is never confirmed: resent)."""
        self._closed = True
        self._waiting.clear()
        self._peer_counts.clear()
        self._all_count = self._all_bytes = 0

    def _stored(self, identity: bytes, message_id: str, done: asyncio.Future[None]) -> None:
        error = None if done.cancelled() else done.exception()
        if done.cancelled() or error is not None:
            why = str(error) if error is not None else "the store write was cancelled"
            refusal = frames.Refuse([(message_id, RefusalReason.STORE_FAILED, why)])
            self._send(identity, refusal)
        else:
            self._send(identity, frames.Confirm([message_id]))

    def subscribe(self, identity: bytes, user: str, frame: frames.Subscribe) -> None:
        self._catch_up(identity)  # after what the peer published before (Rule 5)
        key = (identity, frame.queue)
        self._refused.pop(key, None)
        verdict = frames.Verdict(Verb.CONSUME.value, frame.queue, False)
        if self.guard is not None and not self.guard.allows(user, Verb.CONSUME, frame.pattern):
            self._refuse(key, verdict)
            return
        if frame.queue not in self.topics.subscriptions and not self._room_for(identity):
            why = f"a peer makes at most {MAX_QUEUES_PER_PEER} subscriptions here"
            self._refuse(key, frames.Verdict(Verb.CONSUME.value, frame.queue, False, reason=why))
            return
        durable = frame.queue.startswith("pigeon.sub.")
        try:
            self.topics.subscribe(
                frame.pattern,
                name=frame.queue.removeprefix("pigeon.sub.") if durable else None,
                queue=None if durable else frame.queue,
                policy=check_policy(frame.policy),
                buffer=frame.buffer,
                start=StartAt(
                    frame.from_seq, frame.from_time, frame.last, frame.last_per_subject
                ).check(),
            )
        except ReplayTrimmed as exc:
            trimmed = frames.Verdict(
                Verb.CONSUME.value,
                frame.queue,
                False,
                reason=str(exc),
                trimmed_topic=exc.topic,
                first_retained=exc.first_retained,
            )
            self._refuse(key, trimmed)
            return
        except (ConfigurationError, ValueError) as exc:
            verdict = frames.Verdict(Verb.CONSUME.value, frame.queue, False, reason=str(exc))
            self._refuse(key, verdict)
            return
        self._made.setdefault(identity, set()).add(frame.queue)

    def _room_for(self, identity: bytes) -> bool:
        """Rule 6: a peer may make at most MAX_QUEUES_PER_PEER subscriptions
        that still stand (the node's own cap keeps room for the others)."""
        made = self._made.get(identity)
        if not made:
            return True
        made.intersection_update(self.topics.subscriptions)
        return len(made) < MAX_QUEUES_PER_PEER

    def _refuse(self, key: tuple[bytes, str], verdict: frames.Verdict) -> None:
        # Kept for the Consume that follows; bounded, since a peer may send
        # Subscribes and never that Consume.
        self._refused[key] = verdict
        if len(self._refused) > MAX_WAITING_REFUSALS:
            del self._refused[next(iter(self._refused))]

    def peer_lost(self, identity: bytes) -> None:
        """Forget a lost peer: what it had waiting is dropped unconfirmed (it
        resends what it still wants; a resend is published once, Rule 4 of
        the topic host)."""
        self._made.pop(identity, None)
        if self._waiting.pop(identity, None) is not None:
            count, size = self._peer_counts.pop(identity)
            self._all_count -= count
            self._all_bytes -= size
        for key in [key for key in self._refused if key[0] == identity]:
            del self._refused[key]

    def consume_refusal(self, identity: bytes, user: str, queue: str) -> frames.Verdict | None:
        """Why a Consume of ``queue`` is refused, if it is a subscription's
        (Rules 1 to 3); None: go on as for any queue (a plain queue is
        checked by the router itself)."""
        refused = self._refused.pop((identity, queue), None)
        if refused is not None:
            return refused
        if not is_subscription(queue):
            return None
        sub = self.topics.subscriptions.get(queue)
        if sub is None:
            why = "no such subscription here (its node restarted, or it expired or was cut off)"
            return frames.Verdict(Verb.CONSUME.value, queue, False, reason=why)
        if self.guard is not None and not self.guard.allows(user, Verb.CONSUME, sub.pattern):
            return frames.Verdict(Verb.CONSUME.value, queue, False)
        return None

    def grant_name(self, queue: str) -> str:
        """The name the ACL's consume grant is checked against for ``queue``."""
        sub = self.topics.subscriptions.get(queue)
        return sub.pattern if sub is not None else queue

    def consumed(self, queue: str, consumer: Hashable) -> None:
        self.topics.consumed(queue, consumer)

    def left(self, queue: str, consumer: Hashable, *, lost: bool) -> None:
        if is_subscription(queue):
            self.topics.left(queue, consumer, lost=lost)

    def cut(self, queue: str, reason: str, consumers: list[Hashable]) -> None:
        """Rule 4: tell each consumer of a subscription cut off."""
        for consumer in consumers:
            if isinstance(consumer, tuple) and isinstance(consumer[0], bytes):
                verdict = frames.Verdict(Verb.CONSUME.value, queue, False, reason=reason)
                self._send(consumer[0], verdict)
