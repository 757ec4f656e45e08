"""A plain subscription: core NATS, this subscriber's alone, no history.

Rule 1: the pattern is the subject ``<prefix>.t.<pattern>``: NATS's ``*``
and ``>`` mean what pigeon's do (one segment; one or more, last only).
Rule 2: messages wait in a local buffer of ``buffer`` messages between
nats-py and the sink, which never holds more than ``prefetch`` unsettled.
When one more arrives with the buffer full (the core's Rule 4):
``drop-oldest`` drops the oldest waiting (counted ``dropped``);
``disconnect`` unsubscribes, counts ``disconnected`` (and what waited as
``discarded``) and calls ``on_disconnect(reason)`` once. ``block`` cannot
hold a core NATS publisher back, so subscribe refuses it (see topics.py).
Rule 3: nats-py's own pending limits are set far above ``buffer`` (our
callback only moves a message into the buffer), so nats-py drops nothing
unless the event loop stalls; if it does, it reports a slow consumer,
which the transport counts as ``slow_consumer``.
Rule 4: no server holds these messages, so settling is local: ``ack``
forgets the message; ``nack(delay)`` delivers it here again after
``delay`` (attempt + 1, redelivered), through the buffer (its policy
applies); ``reject`` cannot dead-letter (nothing stored it): it is counted
``rejected`` and the latest reason is kept in stats (``last_rejected``);
``extend`` does nothing: there is no lease, a delivery is held until it is
settled. A nack past ``max_attempts`` is counted ``rejected`` too, with the
attempt limit as reason.
Rule 5: what arrives is checked, not trusted: a TOPIC header naming another
topic than the subject's loses its numbering (TOPIC, SEQ, SOURCE; counted
``bad_numbering``), so the API layer counts it unnumbered rather than
tracking a number under the wrong topic. A message without numbering (a
plain NATS publisher) is delivered as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import (
    DEFAULT_SUB_PENDING_BYTES_LIMIT,
    DEFAULT_SUB_PENDING_MSGS_LIMIT,
    Subscription,
)

from ..._core import headers as pigeon_headers
from ..._core import policy
from ..._core.topics import SlowPolicy
from ...errors import PigeonError
from ...message import Message, new_id
from ..base import Delivery, DeliverySink, SubscribeOptions
from . import envelope
from .errors import map_exceptions

log = logging.getLogger("pigeon.nats")

_NUMBERING = (pigeon_headers.TOPIC, pigeon_headers.SEQ, pigeon_headers.SOURCE)


class TopicCounts(Counter[str]):
    """The topic counters, and the latest reject's reason (Rule 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_rejected = ""


def checked(message: Message, topic: str, counts: Counter[str]) -> Message:
    """``message`` as received on ``topic``, its numbering removed if it
    names another topic (Rule 5)."""
    named = message.headers.get(pigeon_headers.TOPIC)
    if named is None or named == topic:
        return message
    counts["bad_numbering"] += 1
    kept = {k: v for k, v in message.headers.items() if k not in _NUMBERING}
    return msgspec.structs.replace(message, headers=kept)


class PlainSubscription:
    """One core NATS subscription, its buffer and its local settling (a Settler).

    Args:
        nc: the connection.
        counts: the topic counters.
        pattern: the pigeon pattern, subscribed as ``subject``.
        root: the subject prefix of topics (``<prefix>.t.``).
        sink: where deliveries go.
        options: policy, buffer and prefetch.
        on_disconnect: told once why, if policy ``disconnect`` cuts it off.
        on_cancel: told once it has stopped.
    """

    def __init__(
        self,
        nc: Client,
        counts: TopicCounts,
        *,
        pattern: str,
        root: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
        on_cancel: Callable[[Any], None],
    ) -> None:
        self.nc = nc
        self.counts = counts
        self.pattern = pattern
        self.root = root
        self.subject = root + pattern
        self.sink = sink
        self.options = options
        self.on_disconnect = on_disconnect
        self.on_cancel = on_cancel
        self.prefetch = options.consume.prefetch
        self.held = 0  # in the sink, unsettled
        self.waiting: deque[tuple[str, Message]] = deque()  # the buffer: (topic, message)
        self.closed = False
        self._sub: Subscription | None = None
        self._timers: set[asyncio.TimerHandle] = set()  # nacked, to come again
        self._ending: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe, and make sure the server has it before returning.

        Raises:
            TransportError: the subscription cannot be made.
        """
        with map_exceptions(f"subscribe to {self.pattern!r}"):
            self._sub = await self.nc.subscribe(
                self.subject,
                cb=self._on_msg,
                pending_msgs_limit=max(DEFAULT_SUB_PENDING_MSGS_LIMIT, 4 * self.options.buffer),
                pending_bytes_limit=4 * DEFAULT_SUB_PENDING_BYTES_LIMIT,
            )
            # A PING round trip: what is published after subscribe() returns
            # reaches this subscriber.
            await self.nc.flush()

    async def _on_msg(self, msg: Msg) -> None:
        if self.closed:
            return
        topic = msg.subject[len(self.root) :]
        message = envelope.from_headers(msg.data, msg.headers, fallback_id=new_id(), attempt=1)
        self.counts["received"] += 1
        self._arrive(topic, checked(message, topic, self.counts))

    def _arrive(self, topic: str, message: Message) -> None:
        self.waiting.append((topic, message))
        self._pump()
        if len(self.waiting) <= self.options.buffer:
            return
        if self.options.policy == SlowPolicy.DISCONNECT:
            self._disconnect()
        else:  # drop-oldest (block was refused at subscribe)
            self.waiting.popleft()
            self.counts["dropped"] += 1

    def _pump(self) -> None:
        batch: list[Delivery] = []
        while self.waiting and self.held < self.prefetch and not self.closed:
            topic, message = self.waiting.popleft()
            batch.append(Delivery(topic, message, self))
            self.held += 1
        if batch:
            self.counts["delivered"] += len(batch)
            self.sink(batch)

    def _disconnect(self) -> None:
        reason = (
            f"more than {self.options.buffer} messages waited for this subscriber "
            f"(policy disconnect)"
        )
        self.counts["disconnected"] += 1
        log.warning("subscription to %r disconnected: %s", self.pattern, reason)
        self._ending = asyncio.get_running_loop().create_task(self.cancel())
        self.closed = True  # now: nothing more is delivered or buffered
        try:
            self.on_disconnect(reason)
        except Exception:  # the subscriber's callback; its failure is not ours
            log.exception("on_disconnect for %r failed", self.pattern)

    # -- settling (the Settler protocol, Rule 4) -------------------------

    def _release(self) -> None:
        self.held -= 1
        self._pump()

    def ack(self, delivery: Delivery) -> None:
        self.counts["acked"] += 1
        self._release()

    def nack(self, delivery: Delivery, delay: float, reason: str) -> None:
        self.counts["nacked"] += 1
        self._release()
        if self.closed:  # it ended: nothing comes again
            self.counts["discarded"] += 1
            return
        message = delivery.message
        attempt = message.attempt + 1
        if policy.over_attempt_limit(attempt, self.options.consume.max_attempts):
            self._rejected(delivery, policy.attempt_limit_reason(delivery.queue, message.attempt))
            return
        again = msgspec.structs.replace(message, attempt=attempt, redelivered=True)
        handle: asyncio.TimerHandle | None = None

        def redeliver() -> None:
            if handle is not None:
                self._timers.discard(handle)
            if self.closed:
                self.counts["discarded"] += 1
                return
            self.counts["redelivered"] += 1
            self._arrive(delivery.queue, again)

        handle = asyncio.get_running_loop().call_later(delay, redeliver)
        self._timers.add(handle)

    def reject(self, delivery: Delivery, reason: str) -> None:
        self._release()
        self._rejected(delivery, reason)

    def _rejected(self, delivery: Delivery, reason: str) -> None:
        self.counts["rejected"] += 1
        self.counts.last_rejected = (
            f"{delivery.queue}: message {delivery.message.id}: {envelope.single_line(reason)}"
        )

    def extend(self, delivery: Delivery) -> None:
        return None  # no lease to renew

    # -- stopping --------------------------------------------------------

    async def cancel(self) -> None:
        """Unsubscribe; what waits in the buffer or for a nack's delay is
        discarded (counted); deliveries held stay the subscriber's to settle."""
        self.closed = True
        sub, self._sub = self._sub, None
        if sub is None:
            return
        for handle in self._timers:
            handle.cancel()
        self.counts["discarded"] += len(self.waiting) + len(self._timers)
        self._timers.clear()
        self.waiting.clear()
        try:
            with map_exceptions(f"unsubscribe from {self.pattern!r}"):
                await sub.unsubscribe()
        except PigeonError:
            pass  # the connection is gone, and the subscription with it
        self.on_cancel(self)
