"""``nats://HOST:PORT``: work queues on JetStream, request-reply and
publish-subscribe on core NATS, retained topics on JetStream.

Queues live in one work-queue stream (``PIGEON_Q`` on ``pigeon.q.>`` unless
configured), created when missing (:mod:`.stream`). Each queue has one durable
pull consumer shared by all of its workers (:mod:`.pull`); JetStream keeps the
leases (ack wait), counts deliveries and redelivers. Sends are pipelined and
resent until confirmed (:mod:`.publisher`); dead letters go to ``<queue>.dead``
in the same stream (:mod:`.deadletter`). Services are core NATS subjects
answered by a queue group (:mod:`.service`), and every server also listens
on the service's "all" subject for ``request_all``. Topics are core NATS
subjects ``<prefix>.t.<topic>``, numbered by the publisher; a retained
pattern (or one held for durable subscriptions) is a stream of its own, and
durable or replaying subscriptions are JetStream consumers on it
(:mod:`.topics`). Options may also be given in the
URL's query string, e.g. ``nats://127.0.0.1:4222?stream=JOBS&prefix=jobs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client

from ..._core.topics import Retention
from ...errors import (
    ClosedError,
    ConfigurationError,
    MessageTooLarge,
    NotStartedError,
    Timeout,
)
from ...message import Message
from ..base import (
    ConsumeOptions,
    DeliverySink,
    ServiceHandler,
    SubscribeOptions,
    Subscription,
)
from . import client, envelope, service
from .deadletter import DeadLetters
from .options import parse as parse_options
from .publisher import Publisher
from .pull import PullConsumer
from .security import redact
from .stream import Stream
from .topics import Topics

log = logging.getLogger("pigeon.nats")


@dataclass(slots=True)
class _Connected:
    """What a started transport works with."""

    nc: Client
    stream: Stream
    publisher: Publisher
    dead_letters: DeadLetters
    topics: Topics


class NatsTransport:
    """The NATS transport; see the module docstring.

    Args:
        url: ``nats://HOST:PORT`` or ``tls://HOST:PORT`` (several servers
            separated by commas), with ``user:password@`` or ``token@`` if
            the server asks, and options in the query string if wanted.
        options: see :class:`~pigeon.transports.nats.options.NatsOptions`.

    Raises:
        ConfigurationError: an option is unknown or cannot work (nats-py
            missing is reported by the package's stand-in).
    """

    def __init__(self, url: str, **options: Any) -> None:
        # ``url`` is what messages, logs and repr show: credentials masked.
        self.url = redact(url)
        self._servers, self.options = parse_options(url, options)
        self._tls = self.options.ssl_context()  # read now: a bad file is a ConfigurationError
        self.max_message_size = self.options.max_message_size or (1 << 20)
        self.counts: Counter[str] = Counter()
        self._connected: _Connected | None = None
        self._consumers: list[PullConsumer] = []
        self._services: list[service.ServiceRegistration] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Connect, check the payload limit, and create the stream if missing.

        Raises:
            TransportError: no server reachable, or JetStream unavailable.
            ConfigurationError: ``max_message_size`` is above the server's
                ``max_payload``, or the stream exists but does not fit.
        """
        options = self.options
        nc = await client.connect(
            self.url,
            self._servers,
            options,
            tls=self._tls,
            on_error=self._on_error,
            on_disconnected=self._on_disconnected,
            on_reconnected=self._on_reconnected,
        )
        try:
            self._check_payload_limit(nc.max_payload)
            js = nc.jetstream(timeout=options.ack_timeout)
            stream = Stream(js, options)
            await stream.ensure()
        except BaseException:
            await nc.close()
            raise
        dead_letters = DeadLetters(js, options.stream, options.prefix, options.ack_timeout)
        topics = Topics(nc, js, options, dead_letters, self.max_message_size)
        self._connected = _Connected(
            nc=nc,
            stream=stream,
            publisher=Publisher(nc, js, options, self.counts),
            dead_letters=dead_letters,
            topics=topics,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._connected else "not started"
        return f"<NatsTransport {self.url} {state}>"

    def _check_payload_limit(self, limit: int) -> None:
        if self.max_message_size > limit:
            if self.options.max_message_size is not None:
                raise ConfigurationError(
                    f"max_message_size {self.max_message_size} is above the server's "
                    f"max_payload of {limit} bytes"
                )
            self.max_message_size = limit

    def _live(self) -> _Connected:
        if self._closed:
            raise ClosedError(f"transport {self.url} is closed")
        if self._connected is None:
            raise NotStartedError(
                f"transport {self.url} is not started: await its start() first "
                "(pigeon.connect() starts the transports it makes)"
            )
        return self._connected

    async def _on_error(self, exc: Exception) -> None:
        self.counts["connection_errors"] += 1
        if self._connected is not None:
            self._connected.topics.on_error(exc)
        log.debug("nats: %r", exc)

    async def _on_disconnected(self) -> None:
        self.counts["disconnects"] += 1

    async def _on_reconnected(self) -> None:
        self.counts["reconnects"] += 1
        for consumer in self._consumers:
            consumer.wake(reconnected=True)
        if self._connected is not None:
            self._connected.topics.wake()

    # -- work queues -----------------------------------------------------

    def _check_size(self, message: Message) -> None:
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        """Publish to JetStream; the future resolves on the pub ack.

        Sends run concurrently (pipelined). One that is not acknowledged (a
        timeout, a reconnect) is published again with the same
        ``Nats-Msg-Id`` until ``send_timeout``, then fails with
        TransportError.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over ``max_message_size``.
            Backpressure: ``outbox_limit`` sends are awaiting their pub ack.
            ConfigurationError: the queue name or a header cannot travel over NATS.
        """
        live = self._live()
        self._check_size(message)
        return live.publisher.send_nowait(queue, message)

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until every send so far has its pub ack (or has failed).

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            Timeout: some are still unconfirmed after ``timeout`` seconds.
        """
        live = self._live()
        ends = time.monotonic() + timeout
        await live.publisher.flush(timeout)
        await live.topics.flush(max(ends - time.monotonic(), 0.0))

    async def consume(
        self, queue: str, sink: DeliverySink, options: ConsumeOptions
    ) -> Subscription:
        """Start a pull loop for one worker on the queue's shared consumer.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            ConfigurationError: the queue name cannot be a subject, or
                JetStream refused the consumer.
            TransportError: JetStream is unreachable.
        """
        live = self._live()
        consumer = PullConsumer(
            live.nc,
            live.stream,
            live.dead_letters,
            self.counts,
            queue=queue,
            subject=envelope.subject(self.options.prefix, "q", queue),
            sink=sink,
            options=options,
            pull_expires=self.options.pull_expires,
            on_cancel=self._forget_consumer,
        )
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    def _forget_consumer(self, consumer: PullConsumer) -> None:
        if consumer in self._consumers:  # cancelled: no more wake-ups on reconnect
            self._consumers.remove(consumer)

    def _forget_service(self, registration: service.ServiceRegistration) -> None:
        if registration in self._services:
            self._services.remove(registration)

    # -- request-reply ---------------------------------------------------

    async def request(
        self,
        service_name: str,
        message: Message,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Message:
        """Call a service over core NATS; the deadline travels with the call.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over ``max_message_size``.
            NoResponders: nobody serves it (nats-py's no-responders status).
            Timeout: no reply within ``timeout`` seconds.
            Rejected: the server's handler failed.
        """
        nc = self._live().nc
        self._check_size(message)
        subject = envelope.subject(self.options.prefix, "svc", service_name)
        return await service.call(nc, self.counts, subject, service_name, message, timeout)

    async def serve(self, service_name: str, handler: ServiceHandler) -> Subscription:
        """Answer ``service_name`` in the shared queue group.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            ConfigurationError: the name cannot be a subject.
            TransportError: the subscription cannot be made.
        """
        nc = self._live().nc
        registration = service.ServiceRegistration(
            nc,
            self.counts,
            service=service_name,
            subject=envelope.subject(self.options.prefix, "svc", service_name),
            all_subject=envelope.subject(self.options.prefix, "all", service_name),
            handler=handler,
            on_cancel=self._forget_service,
        )
        await registration.start()
        self._services.append(registration)
        return registration

    async def request_all(
        self,
        service_name: str,
        message: Message,
        *,
        timeout: float,  # noqa: ASYNC109
        min_replies: int,
    ) -> list[Message]:
        """Ask every live server of ``service_name``; see ``service.call_all``
        (it always waits ``timeout``: NATS cannot tell how many servers there are).

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over ``max_message_size``.
            NoResponders: no server listens (at once).
            Timeout: fewer than ``min_replies`` replies came within ``timeout``.
        """
        nc = self._live().nc
        self._check_size(message)
        subject = envelope.subject(self.options.prefix, "all", service_name)
        return await service.call_all(
            nc, self.counts, subject, service_name, message, timeout, min_replies
        )

    # -- publish-subscribe (see .topics) ---------------------------------

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        """Number ``message`` and publish it on ``topic``: core NATS, or
        JetStream for a retained topic (see :mod:`.outbox`).

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            ConfigurationError: a bad topic, or a header NATS cannot carry.
            MessageTooLarge: the body is over ``max_message_size``.
            Backpressure: ``outbox_limit`` publishes await confirmation (the
                future fails with it when a discard-new stream is full).
        """
        return self._live().topics.publish_nowait(topic, message)

    async def subscribe(
        self,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> Subscription:
        """Deliver topics matching ``pattern`` into ``sink`` (see :mod:`.topics`).

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            ConfigurationError: ``block`` without a name, history of topics
                not retained, or another option NATS cannot honour.
            ReplayTrimmed: ``from_seq`` is no longer retained.
            TransportError, Timeout: the server did not answer.
        """
        return await self._live().topics.subscribe(pattern, sink, options, on_disconnect)

    async def retain(self, pattern: str, retention: Retention) -> None:
        """Keep history of the topics matching ``pattern`` in a stream of its own.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            ConfigurationError: a bad pattern or retention, or one that
                overlaps another retained pattern.
            TransportError, Timeout: JetStream did not answer.
        """
        await self._live().topics.retain(pattern, retention)

    # -- closing ---------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait up to ``timeout`` for pub acks, then stop everything.

        Sends still unconfirmed then fail with TransportError (counted in
        ``stats()["unconfirmed_at_close"]``); they may still have been
        stored, and a resend with the same id would be dropped as a duplicate.
        """
        live = self._connected
        if self._closed or live is None:
            self._closed = True
            return
        ends = time.monotonic() + timeout
        with contextlib.suppress(Timeout):  # those left are failed and counted below
            await live.publisher.flush(timeout)
        self._closed = True
        await live.publisher.close(self.url)
        await live.topics.close(self.url, max(ends - time.monotonic(), 0.0))
        subscriptions: list[Subscription] = [*self._consumers, *self._services]
        for subscription in subscriptions:
            await subscription.cancel()
        self._connected = None
        await client.close(live.nc, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: sent, confirmed, send_retries, send_failures, delivered,
        redelivered, acked, nacked, dead_lettered, settle_failures,
        requests, replies, disconnects, reconnects, request_all..., and
        ``topics`` (see :meth:`.topics.Topics.stats`)."""
        live = self._connected
        return {
            **self.counts,
            "unconfirmed": live.publisher.unconfirmed if live else 0,
            "connected": bool(live is not None and live.nc.is_connected),
            "stream": self.options.stream,
            "consumers": len(self._consumers),
            "topics": live.topics.stats() if live else {},
        }
