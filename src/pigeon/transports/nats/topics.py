"""Publish-subscribe on NATS: what the transport's ``publish_nowait``,
``subscribe``, ``retain`` and ``stats()["topics"]`` do.

Rule 1: topic ``a.b`` is the core NATS subject ``<prefix>.t.a.b``; a
pattern maps the same way, since NATS's ``*`` and ``>`` mean what pigeon's
do. Queues (``<prefix>.q.``) and services (``<prefix>.svc.``) never
overlap topics.
Rule 2: a retained topic is numbered by its stream, its host: SEQ counts
the topic's messages from 1 whoever publishes, SOURCE is the stream's name,
and ``from_seq`` counts those numbers (storing.py, positions.py). Any other
topic is numbered by the publisher: SEQ per topic, SOURCE this transport's
session id (outbox.py). Gap detection runs per (source, topic) either way,
so a subscriber whose filter skips other topics of a stream sees no false
gap.
Rule 3: a subscription without a name or a start is plain: core NATS, a
local buffer with the slow-subscriber policy (plain.py). One with a name
(durable, shared) or a start (replay) is a JetStream consumer on the stream
holding its pattern (replay.py): a retained one, or for a name on topics
nothing retains, a subscription stream made for it (history.py Rule 2). A
replay of topics not retained is a ConfigurationError saying to
``retain()`` them first.
Rule 4: ``block`` cannot hold back a core NATS publisher: refused
(ConfigurationError) unless the subscription is durable, whose stream then
discards new messages at its limits, so publishes are refused with
Backpressure (history.py Rule 5).
Rule 5: everything is counted in ``stats()["topics"]``; nats-py's slow
consumer reports on topic subjects are counted as ``slow_consumer``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from ..._core.topics import (
    Retention,
    SlowPolicy,
    check_buffer,
    check_pattern,
    check_policy,
)
from ...errors import ConfigurationError, Timeout
from ...message import Message, new_id
from ..base import DeliverySink, SubscribeOptions, Subscription
from . import envelope
from .deadletter import DeadLetters
from .history import TopicStreams
from .options import NatsOptions
from .outbox import TopicOutbox
from .plain import PlainSubscription, TopicCounts
from .replay import TopicConsumer, durable_name

log = logging.getLogger("pigeon.nats")

# Always in stats()["topics"], 0 until something happens.
_COUNTED = (
    "published",
    "confirmed",
    "stored",
    "refused",
    "publish_failures",
    "publish_retries",
    "received",
    "delivered",
    "redelivered",
    "acked",
    "nacked",
    "rejected",
    "dead_lettered",
    "dropped",
    "discarded",
    "disconnected",
    "slow_consumer",
    "bad_numbering",
    "replays_trimmed",
)


def _limit(policy: SlowPolicy, options: SubscribeOptions) -> int:
    """``max_msgs`` of a subscription stream (history.py Rule 2). Policy
    ``disconnect`` is checked on deliveries (replay.py Rule 5), so its
    stream keeps twice the buffer: a subscriber that falls ``buffer``
    behind is still there to be cut off, rather than trimmed."""
    if policy == SlowPolicy.DISCONNECT:
        return 2 * options.buffer + options.consume.prefetch
    return options.buffer + options.consume.prefetch


class Topics:
    """The topics of one NATS connection.

    Args:
        nc: the connection.
        js: its JetStream context.
        options: the transport's options.
        dead_letters: where durable subscriptions' rejects go.
        max_message_size: the largest body published.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        options: NatsOptions,
        dead_letters: DeadLetters,
        max_message_size: int,
    ) -> None:
        self.nc = nc
        self.options = options
        self.dead_letters = dead_letters
        self.counts = TopicCounts()
        self.session = new_id()  # SOURCE of every message published here
        self.streams = TopicStreams(nc, js, options, self.counts)
        self.outbox = TopicOutbox(
            nc, js, options, self.counts, self.streams, self.session, max_message_size
        )
        self.subscriptions: list[PlainSubscription | TopicConsumer] = []

    # -- publishing ------------------------------------------------------

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        return self.outbox.publish_nowait(topic, message)

    # -- subscribing -----------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> Subscription:
        """Start a plain or a JetStream-backed subscription (Rule 3).

        Raises:
            ConfigurationError: a bad pattern or option, ``block`` without a
                name, history asked of topics not retained, a name used for
                another pattern.
            ReplayTrimmed: ``from_seq`` is no longer retained.
            TransportError, Timeout: the server did not answer.
        """
        try:
            check_pattern(pattern)
            policy = check_policy(options.policy)
            check_buffer(options.buffer)
            options.start.check()
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from None
        durable = options.name is not None
        if policy == SlowPolicy.BLOCK and not durable:
            raise ConfigurationError(
                "policy 'block' cannot hold back a core NATS publisher: use a durable "
                "subscription (name=...), on a retained topic or not: its JetStream "
                "stream then refuses publishes at its limits (Backpressure)"
            )
        subscription: PlainSubscription | TopicConsumer
        if not durable and not options.start.replays:
            subscription = PlainSubscription(
                self.nc,
                self.counts,
                pattern=pattern,
                root=self.streams.root,
                sink=sink,
                options=options,
                on_disconnect=on_disconnect,
                on_cancel=self._forget,
            )
        else:
            if options.name is not None:
                # Its dead letters go to the queue <name>.dead: the name must fit a subject.
                envelope.subject(self.options.prefix, "q", options.name)
            why = (
                f"durable subscription {options.name!r}"
                if durable
                else f"a replay of {pattern!r} (start={options.start})"
            )
            stream = await self.streams.for_subscription(
                pattern,
                why=why,
                history=options.start.replays,
                block=policy == SlowPolicy.BLOCK,
                limit=_limit(policy, options),
                durable=None if options.name is None else durable_name(options.name),
            )
            subscription = TopicConsumer(
                self.nc,
                self.streams,
                stream,
                self.dead_letters,
                self.counts,
                pattern=pattern,
                sink=sink,
                options=options,
                on_disconnect=on_disconnect,
                pull_expires=self.options.pull_expires,
                max_ack_pending=self.options.max_ack_pending,
                on_cancel=self._forget,
            )
        await subscription.start()
        self.subscriptions.append(subscription)
        self.counts["subscriptions_started"] += 1
        return subscription

    def _forget(self, subscription: Any) -> None:
        if subscription in self.subscriptions:
            self.subscriptions.remove(subscription)

    def wake(self) -> None:
        """After a reconnect: pull loops ask again at once."""
        for subscription in self.subscriptions:
            if isinstance(subscription, TopicConsumer):
                subscription.wake(reconnected=True)

    def on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError) and exc.subject.startswith(
            self.streams.root
        ):
            self.counts["slow_consumer"] += 1

    # -- retaining -------------------------------------------------------

    async def retain(self, pattern: str, retention: Retention) -> None:
        """Create or update the stream of ``pattern`` (history.py Rule 1).

        Raises:
            ConfigurationError: a bad pattern or retention, or one
                overlapping another retained pattern.
            TransportError, Timeout: JetStream did not answer.
        """
        await self.streams.retain(pattern, retention)

    # -- flushing, closing, stats ----------------------------------------

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109
        await self.outbox.flush(timeout)

    async def close(self, url: str, timeout: float) -> None:  # noqa: ASYNC109
        try:
            await self.outbox.flush(timeout)
        except Timeout:
            pass  # those left are failed and counted by close
        await self.outbox.close(url)
        for subscription in list(self.subscriptions):
            await subscription.cancel()
        await self.streams.close()

    def stats(self) -> dict[str, Any]:
        return {
            **dict.fromkeys(_COUNTED, 0),
            **self.counts,
            "last_rejected": self.counts.last_rejected,
            "unconfirmed": self.outbox.unconfirmed,
            "subscriptions": len(self.subscriptions),
            "retained": sorted(s.pattern for s in self.streams.streams.values() if s.retained),
            "held_for_durable": sorted(
                s.pattern for s in self.streams.streams.values() if not s.retained
            ),
            "source": self.session,
        }
