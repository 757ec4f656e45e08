"""Live topic subscriptions: one queue bound to the topic exchange.

Rule 1: a named subscription is a consumer of its durable queue
``pigeon.sub.<name>``, settled on the broker exactly like a work queue
(:mod:`.consumer`: delay queues, ``<queue>.dead``, leases, attempts).
Subscribers sharing the name compete for its messages; the queue keeps them
while none runs.
Rule 2: an ephemeral subscription is a consumer of its exclusive,
auto-delete queue, settled on the client (:mod:`.leases`); cancelling it
deletes its queues, so nothing is left on the broker.
Rule 3: every delivery is matched against the pigeon pattern (the binding
key may let more through, see :mod:`.topics` Rule 2); what does not match
is acked and counted ``filtered``. Its topic is the routing key it was
published with (``headers.TOPIC`` once a copy went through a delay or
dead-letter queue, whose routing key is a queue name).
Rule 4: with policy ``drop-oldest`` or ``disconnect`` the broker
dead-letters what it drops into ``<queue>.overflow``; the subscriber reads
it and counts each ``dropped``. With ``disconnect`` the first one ends the
subscription: it is counted ``disconnected``, cancelled, and
``on_disconnect(reason)`` is called once. Drops of a named subscription
while none of its subscribers ran are counted ``dropped_offline`` when the
next one starts, and do not disconnect it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from ..._core import headers
from ..._core.ledger import dead_letter_queue
from ..._core.topics import SlowPolicy, matches
from ...errors import PigeonError
from ...message import Message
from ..base import DeliverySink, SubscribeOptions
from .consumer import Subscription, _Lease
from .envelope import _text, from_amqp
from .errors import map_exceptions
from .leases import ClientLeases
from .publisher import Publisher
from .topics import (
    TOPIC_EXCHANGE,
    overflow_arguments,
    overflow_queue,
    overflows,
    subscription_arguments,
)
from .topology import Topology

OnDisconnect = Callable[[str], None]


def topic_of(incoming: AbstractIncomingMessage) -> str:
    """The topic a delivery was published on (Rule 3)."""
    if incoming.exchange == TOPIC_EXCHANGE and incoming.routing_key:
        return incoming.routing_key
    return _text((incoming.headers or {}).get(headers.TOPIC)) or incoming.routing_key or ""


def with_topic(message: Message, topic: str) -> Message:
    """``message`` carrying its topic (a plain AMQP publisher sets none)."""
    if headers.TOPIC not in message.headers:
        message.headers = {**message.headers, headers.TOPIC: topic}
    return message


class OverflowWatch:
    """Reads a subscription's overflow queue (Rule 4).

    Args:
        queue: the subscription's queue (its overflow queue is derived).
        options: the subscription's policy and buffer.
        durable: a named subscription's (kept while none runs).
        queue_type: the overflow queue's type when durable.
        counts: the topic counters.
        on_overflow: called with the number of drops seen so far, on each
            drop.
    """

    def __init__(
        self,
        queue: str,
        options: SubscribeOptions,
        *,
        durable: bool,
        queue_type: str,
        counts: Counter[str],
        on_overflow: Callable[[int], None],
    ) -> None:
        self.name = overflow_queue(queue)
        self.options = options
        self.durable = durable
        self.queue_type = queue_type if durable else "classic"
        self.counts = counts
        self.on_overflow = on_overflow
        self.seen = 0
        self.consumer: tuple[AbstractQueue, str] | None = None

    async def start(self, channel: AbstractRobustChannel) -> None:
        """Declare the overflow queue and read it (inside map_exceptions);
        declared before the subscription queue, so no drop is lost."""
        queue = await channel.declare_queue(
            self.name,
            durable=self.durable,
            exclusive=not self.durable,
            auto_delete=not self.durable,
            arguments=overflow_arguments(self.options.buffer, self.queue_type),
        )
        result = queue.declaration_result
        offline = result.message_count if result is not None else 0
        if self.durable and offline:
            # Dropped while no subscriber of this name ran: counted, but no
            # reason to cut off the one starting now.
            self.counts["dropped_offline"] += offline
            await queue.purge()
        self.consumer = (queue, await queue.consume(self._on_drop, no_ack=True))

    async def _on_drop(self, incoming: AbstractIncomingMessage) -> None:
        reason = _text((incoming.headers or {}).get("x-first-death-reason")) or "maxlen"
        if reason == "maxlen":
            self.counts["dropped"] += 1
        else:  # the broker dropped it for another reason (a delivery limit)
            self.counts[f"broker_dropped_{reason}"] += 1
        self.seen += 1
        self.on_overflow(self.seen)


class _Disconnects:
    """Ends a ``disconnect`` subscription once (Rule 4)."""

    def __init__(
        self,
        pattern: str,
        options: SubscribeOptions,
        counts: Counter[str],
        on_disconnect: OnDisconnect,
    ) -> None:
        self.pattern = pattern
        self.options = options
        self.counts = counts
        self.on_disconnect = on_disconnect
        self.task: asyncio.Task[None] | None = None

    def overflowed(self, cancel: Callable[[], Any], seen: int) -> None:
        if self.options.policy is not SlowPolicy.DISCONNECT or self.task is not None:
            return
        self.counts["disconnected"] += 1
        reason = (
            f"the subscriber fell behind: more than {self.options.buffer} messages waited for "
            f"it (policy disconnect), and RabbitMQ dropped the oldest"
        )

        async def end() -> None:
            with contextlib.suppress(PigeonError):
                await cancel()
            self.on_disconnect(reason)

        self.task = asyncio.get_running_loop().create_task(end())


class NamedSubscription(Subscription):
    """A durable named subscription (Rule 1): :class:`.consumer.Subscription`
    on ``pigeon.sub.<name>``, bound to the topic exchange."""

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        topology: Topology,
        publisher: Publisher,
        counts: Counter[str],
        *,
        address: str,
        queue: str,
        pattern: str,
        key: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: OnDisconnect,
    ) -> None:
        super().__init__(
            connection,
            topology,
            publisher,
            counts,
            address=address,
            queue=queue,
            sink=sink,
            options=options.consume,
        )
        self.pattern = pattern
        self.key = key
        self.subscribe_options = options
        self._disconnects = _Disconnects(pattern, options, counts, on_disconnect)
        self.overflow: OverflowWatch | None = None

    async def _prepare(self) -> None:
        await self.topology.exchange(TOPIC_EXCHANGE, "topic")
        if not overflows(self.subscribe_options.policy):
            await self.topology.work_queue(dead_letter_queue(self.queue))

    async def _declare(self, channel: AbstractRobustChannel) -> AbstractQueue:
        options = self.subscribe_options
        if overflows(options.policy):
            self.overflow = OverflowWatch(
                self.queue,
                options,
                durable=True,
                queue_type=self.topology.queue_type,
                counts=self.counts,
                on_overflow=lambda seen: self._disconnects.overflowed(self.cancel, seen),
            )
            await self.overflow.start(channel)
        queue = await channel.declare_queue(
            self.queue,
            durable=True,
            arguments=subscription_arguments(self.queue, options, self.topology.queue_type),
        )
        await queue.bind(TOPIC_EXCHANGE, self.key)
        return queue

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        if not self._cancelled and not matches(self.pattern, topic_of(incoming)):
            self.counts["filtered"] += 1
            self._spawn(self._basic(_Lease(incoming), requeue=False))
            return
        await super()._on_message(incoming)


class EphemeralSubscription(ClientLeases):
    """A subscription of one subscriber (Rule 2), on its exclusive queue."""

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        topology: Topology,
        publisher: Publisher,
        counts: Counter[str],
        *,
        address: str,
        queue: str,
        pattern: str,
        key: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: OnDisconnect,
    ) -> None:
        super().__init__(
            label=queue,
            sink=sink,
            options=options.consume,
            counts=counts,
            publisher=publisher,
            topology=topology,
            address=address,
        )
        self.connection = connection
        self.queue = queue
        self.pattern = pattern
        self.key = key
        self.subscribe_options = options
        self.channel: AbstractRobustChannel | None = None
        # Not "watch": workers take a settler's watch() for a host-loss hook.
        self.overflow: OverflowWatch | None = None
        self._disconnects = _Disconnects(pattern, options, counts, on_disconnect)
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._cancelled = False

    async def start(self) -> None:
        """Declare the queue (and its overflow queue), bind it, consume it.

        Raises:
            TransportError: the broker cannot be reached.
        """
        options = self.subscribe_options
        await self.topology.exchange(TOPIC_EXCHANGE, "topic")
        with map_exceptions(f"subscribe {self.pattern!r}", address=self.address):
            self.channel = channel = await self.connection().channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=options.consume.prefetch)
            if overflows(options.policy):
                self.overflow = OverflowWatch(
                    self.queue,
                    options,
                    durable=False,
                    queue_type="classic",
                    counts=self.counts,
                    on_overflow=lambda seen: self._disconnects.overflowed(self.cancel, seen),
                )
                await self.overflow.start(channel)
            # Exclusive queues must be classic (a quorum queue is replicated
            # and cannot belong to one connection).
            queue = await channel.declare_queue(
                self.queue,
                exclusive=True,
                auto_delete=True,
                arguments=subscription_arguments(self.queue, options, "classic"),
            )
            await queue.bind(TOPIC_EXCHANGE, self.key)
            self._consumers.append((queue, await queue.consume(self._on_message)))

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        # aio-pika runs this as one task per delivery, in order: no await
        # before the hand-over.
        topic = topic_of(incoming)
        if self._cancelled:
            return  # the queue goes with the channel; nothing to settle
        if not matches(self.pattern, topic):
            self.counts["filtered"] += 1
            self._spawn(self._ack(incoming))
            return
        self.offer(with_topic(from_amqp(incoming), topic), incoming)

    async def cancel(self) -> None:
        """Stop; the queues are deleted with what they held."""
        if self._cancelled:
            return
        self._cancelled = True
        await self.end_leases()
        channel, self.channel = self.channel, None
        if channel is None or channel.is_closed:
            return
        if self.overflow is not None and self.overflow.consumer is not None:
            self._consumers.append(self.overflow.consumer)
        with contextlib.suppress(PigeonError):
            with map_exceptions(f"unsubscribe {self.pattern!r}", address=self.address):
                # Consumers first: a queue deleted under its consumer makes
                # the broker cancel it, which aio-pika reports as a fault.
                for queue, tag in self._consumers:
                    await queue.cancel(tag)
                await channel.queue_delete(self.queue)
                if self.overflow is not None:
                    await channel.queue_delete(self.overflow.name)
        with contextlib.suppress(PigeonError):
            with map_exceptions(f"unsubscribe {self.pattern!r}", address=self.address):
                await channel.close()
