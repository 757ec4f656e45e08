"""Publish-subscribe on RabbitMQ: the transport's ``publish_nowait``,
``subscribe`` and ``retain`` (names and arguments in :mod:`.topics`, live
subscriptions in :mod:`.subscribers`, replays in :mod:`.replay`).

Rule 1 (numbering): this transport numbers what it publishes, per topic,
from 1, as one source: its session id, fresh for every transport object
(``pigeon._core.topics`` Rule 2). No number is taken for a publish refused
at once (``Backpressure`` from the outbox, a too large body), and a publish
the broker refuses, or that surely failed, gives its number back: once
every later number on that topic is back too, the next publish (a retry)
reuses it, so the subscriber that refused it sees no gap.
Rule 2 (publishing): to ``pigeon.topics`` with the topic as routing key,
persistent, confirmed, not mandatory: a topic without subscribers is not an
error. A ``basic.nack`` means a subscriber queue with policy ``block`` is
full (or a quorum queue has no quorum): ``Backpressure``. RabbitMQ refuses
it for the full queue only: the subscribers that had room got it, and get
the retry too, with the same number (a repeat to them, counted as such).
Rule 3 (subscribing): a subscription without ``start`` is live
(:mod:`.subscribers`); with ``start`` it replays the retained stream whose
pattern covers it (:mod:`.replay`). A replay is ephemeral, and its policy
is the stream's retention: ``name``, ``block`` or ``disconnect`` with
``start`` are a ConfigurationError that says what to use.
Rule 4 (retaining): ``retain`` declares the stream and binds it; a
pattern retained here is known to this transport's replays. One retained
elsewhere is found if it is the subscription's pattern or a ``>`` prefix of
it (:func:`.topics.retained_candidates`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiormq.exceptions
from aio_pika.abc import AbstractRobustConnection

from ..._core.topics import Numbering, Retention, SlowPolicy, covers, stamp
from ...errors import (
    Backpressure,
    ConfigurationError,
    DeliveryError,
    MessageTooLarge,
    PigeonError,
    TransportError,
)
from ...message import Message
from ..base import DeliverySink, SubscribeOptions
from ..base import Subscription as SubscriptionProtocol
from .envelope import to_amqp
from .errors import map_exceptions
from .publisher import Publisher
from .replay import ReplaySubscription
from .subscribers import EphemeralSubscription, NamedSubscription
from .topics import (
    TOPIC_EXCHANGE,
    binding_key,
    ephemeral_queue,
    named_queue,
    overflow_queue,
    overflows,
    retained_candidates,
    routing_key,
    stream_arguments,
    stream_name,
)
from .topology import Topology, plain_channel, probe

# Always in stats()["topics"], even at 0.
COUNTERS = (
    "published",
    "confirmed",
    "backpressure",
    "failed",
    "delivered",
    "acked",
    "filtered",
    "dropped",
    "disconnected",
    "replayed",
)


class _Numbering(Numbering):
    """The core's per-topic counters, which can also take numbers back.

    A number given back while later ones are on their way is a hole; once
    every number after it is given back too, the count goes back to before
    it. A hole below a number the broker took is a gap for good, forgotten.
    """

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self._holes: dict[str, set[int]] = {}

    def give_back(self, topic: str, seq: int) -> int:
        """Take ``seq`` back; how many numbers ``topic``'s count went back."""
        last = self._last.get(topic)
        if last is None or seq > last:
            return 0  # the topic was forgotten meanwhile
        holes = self._holes.setdefault(topic, set())
        holes.add(seq)
        back = 0
        while last in holes:
            holes.remove(last)
            last -= 1
            back += 1
        self._last[topic] = last
        if not holes:
            del self._holes[topic]
        elif len(self._holes) > self.max_topics:
            del self._holes[next(iter(self._holes))]
        return back

    def taken(self, topic: str, seq: int) -> None:
        """The broker took ``seq``: the holes below it are gaps for good."""
        holes = self._holes.get(topic)
        if holes:
            holes.difference_update([h for h in holes if h < seq])
            if not holes:
                del self._holes[topic]


class SubscriberFull(Backpressure):
    """A subscriber queue with policy ``block`` refused a publish (Rule 2);
    ``limit`` is 0: the publisher does not know that subscriber's buffer."""

    def __init__(self, topic: str, address: str) -> None:
        DeliveryError.__init__(
            self,
            f"publish on topic {topic!r}: the broker at {address} refused it: a subscriber "
            "queue with policy 'block' is full (or a quorum queue has no quorum); subscribers "
            "with room got it",
        )
        self.what = f"a subscriber of topic {topic!r}"
        self.limit = 0


def _refused(exc: BaseException) -> bool:
    """True for a broker's nack (not a return, not a lost link)."""
    cause = exc.__cause__
    return (
        type(exc) is DeliveryError
        and isinstance(cause, aiormq.exceptions.DeliveryError)
        and not isinstance(cause, aiormq.exceptions.PublishError)
    )


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _unknown(exc: BaseException) -> bool:
    """True if the broker may have stored it (the link broke on the way)."""
    return isinstance(exc, TransportError)


class PubSub:
    """The pub-sub side of one AMQP transport.

    Args:
        connection: returns the connection (raises once closed).
        topology: declares exchanges and queues.
        publisher: the confirming publisher.
        address: the broker's address, for errors.
        session: this transport's id: the source of its numbers.
        max_message_size: largest body accepted.
    """

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        topology: Topology,
        publisher: Publisher,
        *,
        address: str,
        session: str,
        max_message_size: int,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.publisher = publisher
        self.address = address
        self.numbering = _Numbering(source=session)
        self.max_message_size = max_message_size
        self.counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.retained: dict[str, Retention] = {}
        self.declared: set[str] = set()  # durable queues made here (for cleanup)
        self._subscriptions: list[SubscriptionProtocol] = []
        self._ephemeral = 0

    # -- publishing (Rules 1 and 2) -------------------------------------------

    def publish(self, topic: str, message: Message) -> asyncio.Future[None]:
        key = routing_key(topic)
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        publisher = self.publisher
        if publisher.unconfirmed >= publisher.outbox_limit:
            raise Backpressure(f"the outbox to {self.address}", publisher.outbox_limit)
        seq = self.numbering.next(key)
        stamped = stamp(message, key, seq, self.numbering.source)
        topology = self.topology
        inner = publisher.publish(
            key,
            lambda resend: to_amqp(stamped, redelivered=resend),
            None
            if topology.exchange_ready(TOPIC_EXCHANGE)
            else (lambda: topology.exchange(TOPIC_EXCHANGE, "topic")),
            exchange=TOPIC_EXCHANGE,
            mandatory=False,
            renew=False,
        )
        self.counts["published"] += 1
        outer: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settled(done: asyncio.Future[None]) -> None:
            # The numbers are settled even if the caller gave up on ``outer``.
            if done.cancelled():
                outer.cancel()
                return
            exc = done.exception()
            if exc is None:
                self.counts["confirmed"] += 1
                self.numbering.taken(key, seq)
                if not outer.done():
                    outer.set_result(None)
            elif _refused(exc):
                self.counts["backpressure"] += 1
                self.counts["numbers_given_back"] += self.numbering.give_back(key, seq)
                full = SubscriberFull(key, self.address)
                full.__cause__ = exc
                _fail(outer, full)
            else:
                self.counts["failed"] += 1
                if not _unknown(exc):  # surely not stored: nobody got the number
                    self.counts["numbers_given_back"] += self.numbering.give_back(key, seq)
                _fail(outer, exc)

        inner.add_done_callback(settled)
        return outer

    # -- subscribing (Rule 3) -------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> SubscriptionProtocol:
        key = binding_key(pattern)
        subscription: Any
        if options.start.replays:
            stream = await self._replayable(pattern, options)
            subscription = ReplaySubscription(
                self.connection,
                self.topology,
                self.publisher,
                self.counts,
                address=self.address,
                stream=stream,
                pattern=pattern,
                sink=sink,
                options=options,
            )
        else:
            kind: Any = EphemeralSubscription
            if options.name is not None:
                queue = named_queue(options.name)
                kind = NamedSubscription
                self.declared.update(
                    (queue, overflow_queue(queue)) if overflows(options.policy) else (queue,)
                )
            else:
                self._ephemeral += 1
                queue = ephemeral_queue(self.numbering.source, self._ephemeral)
            subscription = kind(
                self.connection,
                self.topology,
                self.publisher,
                self.counts,
                address=self.address,
                queue=queue,
                pattern=pattern,
                key=key,
                sink=sink,
                options=options,
                on_disconnect=on_disconnect,
            )
        # Those cancelled by their subscriber (or cut off) are done with.
        self._subscriptions = [
            s for s in self._subscriptions if not getattr(s, "_cancelled", False)
        ]
        self._subscriptions.append(subscription)
        try:
            await subscription.start()
        except BaseException:
            self._subscriptions.remove(subscription)
            await subscription.cancel()
            raise
        return subscription  # type: ignore[no-any-return]

    async def _replayable(self, pattern: str, options: SubscribeOptions) -> str:
        """The stream a replay of ``pattern`` reads.

        Raises:
            ConfigurationError: the options cannot replay on RabbitMQ, or no
                retained pattern covers ``pattern``.
        """
        if options.name is not None:
            raise ConfigurationError(
                f"subscribe({pattern!r}): on RabbitMQ a replay (start=...) reads a retained "
                "stream and is ephemeral; a named subscription resumes from its own queue. "
                "Give name or start, not both"
            )
        if options.policy is not SlowPolicy.DROP_OLDEST:
            raise ConfigurationError(
                f"subscribe({pattern!r}): a replay on RabbitMQ reads the retained stream, which "
                f"neither holds publishers back nor drops for one reader, so policy "
                f"{options.policy.value!r} cannot apply: use policy 'drop-oldest' (the "
                "retention bounds how far behind it may fall), or subscribe without start"
            )
        for retained in self.retained:
            if covers(retained, pattern):
                return stream_name(retained)
        for candidate in retained_candidates(pattern):
            name = stream_name(candidate)
            if await self._exists(name):
                return name
        raise ConfigurationError(
            f"subscribe({pattern!r}, start=...): no retained history covers {pattern!r}: "
            f"call retain({pattern!r}, Retention(...)) first (on RabbitMQ history is a stream "
            "that retain() declares)"
        )

    async def _exists(self, queue: str) -> bool:
        return await probe(self.connection(), queue, self.address) is not None

    # -- retaining (Rule 4) ----------------------------------------------------

    async def retain(self, pattern: str, retention: Retention) -> None:
        key = binding_key(pattern)
        arguments = stream_arguments(pattern, retention)
        name = stream_name(pattern)
        await self.topology.exchange(TOPIC_EXCHANGE, "topic")
        async with plain_channel(self.connection(), self.address) as channel:
            with map_exceptions(f"retain {pattern!r}", address=self.address):
                queue = await channel.declare_queue(name, durable=True, arguments=arguments)
                await queue.bind(TOPIC_EXCHANGE, key)
        self.retained[pattern] = retention
        self.declared.add(name)

    # -- the rest ----------------------------------------------------------------

    def forget(self, subscription: SubscriptionProtocol) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    async def close(self) -> None:
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            try:
                await subscription.cancel()
            except PigeonError:
                pass

    def stats(self) -> dict[str, int]:
        counts = dict(self.counts)
        counts["numbering_forgotten"] = self.numbering.forgotten
        return counts
