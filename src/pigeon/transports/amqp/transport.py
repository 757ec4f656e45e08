"""The ``amqp://`` transport object: lifecycle and the Transport verbs.

Its options are checked in :mod:`.options`; queues are declared by
:mod:`.topology`, sends confirmed by :mod:`.publisher`, work queues consumed
by :mod:`.consumer`, services called and served by :mod:`.rpc`, topics
published, subscribed and retained by :mod:`.pubsub` and ``request_all``
asked by :mod:`.broadcast`. Each of those gets only the collaborators it
uses, never the transport.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection

from ... import _clock
from ..._core import delay
from ..._core.topics import Retention
from ...errors import (
    AuthenticationError,
    ClosedError,
    ConfigurationError,
    MessageTooLarge,
    NotStartedError,
    TransportError,
)
from ...message import Message, new_id
from ..base import ConsumeOptions, DeliverySink, ServiceHandler, SubscribeOptions
from ..base import Subscription as SubscriptionProtocol
from . import failover
from .broadcast import Broadcaster
from .consumer import Subscription
from .envelope import to_amqp
from .errors import map_exceptions
from .options import MAX_PREFETCH
from .options import parse as parse_options
from .publisher import Publisher
from .pubsub import PubSub
from .rpc import Requester, ServiceRegistration
from .security import LOST_AFTER_HANDSHAKE, connection_lost, tls_problem
from .topology import Topology
from .topology import delay_queue as delay_queue_name

log = logging.getLogger("pigeon.amqp")


class AmqpTransport:
    """pigeon on RabbitMQ through aio-pika's robust connection.

    Args:
        url: ``amqp://user:password@host:port/vhost``, or ``amqps://`` for
            TLS; several nodes of a cluster as ``host1:port1,host2:port2``
            (a lost connection reconnects to the next); with RabbitMQ's TLS
            query parameters if wanted
            (``cacertfile``, ``certfile``, ``keyfile``, ``verify``,
            ``server_name_indication``; aiormq's ``cafile`` and
            ``no_verify_ssl`` too). Other query parameters go to aiormq.
        user, password: the login, instead of in the URL.
        ca_file: CA file (PEM) the broker's certificate must chain to
            (``amqps://`` only; default: the system's CAs).
        cert_file, key_file: client certificate and key (PEM), for brokers
            that verify clients.
        server_hostname: the name the broker's certificate must carry, when
            it is not the URL's host.
        verify: False skips checking the broker's certificate (tests only).
        ssl_context: a ready :class:`ssl.SSLContext` instead of the files.
        max_message_size: largest body accepted, in bytes (16 MiB, which is
            also RabbitMQ 4.x's default limit).
        queue_type: ``quorum`` (default) or ``classic`` for work queues.
        reconnect_interval: seconds between reconnect attempts.
        heartbeat: AMQP heartbeat in seconds (None: the broker's choice).
        connect_timeout: seconds to wait for the first connection.
        outbox_limit: unconfirmed sends before ``send_nowait`` raises
            :class:`~pigeon.errors.Backpressure`.
        service_prefetch: requests one server handles at once per service.

    Raises:
        ConfigurationError: an unknown option, one this transport cannot
            honour, or a value that cannot work.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.options, self._client_urls = parse_options(url, options)
        self.address = self.options.address  # for messages and errors: never the password
        self.url = self.address
        tls = self.options.tls
        # Read the TLS files now: a bad one is a ConfigurationError here.
        self._ssl_context = tls.ssl_context() if tls is not None else None
        self.max_message_size = self.options.max_message_size
        self.counts: Counter[str] = Counter()
        # The source of this transport's topic numbers (see .pubsub).
        self.session = new_id()
        self._connection: AbstractRobustConnection | None = None
        self._topology: Topology | None = None
        self._publisher: Publisher | None = None
        self._requester: Requester | None = None
        self._broadcaster: Broadcaster | None = None
        self._pubsub: PubSub | None = None
        self._subscriptions: list[Subscription] = []
        self._services: list[ServiceRegistration] = []
        self._closed = False

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Connect to the broker.

        Raises:
            TransportError: the broker cannot be reached or refused the login.
        """
        if self._closed:
            raise ClosedError(f"transport {self.address} is closed")
        settings = self.options
        options: dict[str, Any] = {"reconnect_interval": settings.reconnect_interval}
        if settings.heartbeat is not None:
            options["heartbeat"] = settings.heartbeat
        if settings.tls is not None:
            if not settings.tls.verify:
                log.warning(
                    "%s: the broker's TLS certificate is not checked (verify is off): "
                    "anyone in the middle can read and change the traffic",
                    self.address,
                )
            options["ssl_context"] = self._ssl_context
        try:
            with map_exceptions(f"connect to {self.address}", address=self.address):
                if len(self._client_urls) == 1:
                    connection = await aio_pika.connect_robust(
                        self._client_urls[0],
                        timeout=settings.connect_timeout,
                        client_properties={"connection_name": "pigeon"},
                        **options,
                    )
                else:  # nodes of a cluster: reconnects go to the next
                    connection = await failover.connect(
                        self._client_urls,
                        timeout=settings.connect_timeout,
                        client_properties={"connection_name": "pigeon"},
                        **options,
                    )
        except AuthenticationError:
            raise
        except TransportError as exc:
            # With TLS 1.3 a refused client certificate often shows here as
            # a plain reset, the broker's TLS alert lost on the way.
            if settings.tls is None or tls_problem(exc) or not connection_lost(exc):
                raise
            raise TransportError(
                f"connect to {self.address}: {LOST_AFTER_HANDSHAKE}", address=self.address
            ) from exc.__cause__
        connection.reconnect_callbacks.add(self._on_reconnect)
        publisher = Publisher(
            connection,
            self.address,
            settings.outbox_limit,
            retry_pause=min(0.2, settings.reconnect_interval),
        )
        try:
            await publisher.open()
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._topology = Topology(
            connection, settings.queue_type, self.address, self.counts, self._open_side
        )
        self._publisher = publisher
        self._requester = Requester(self._live_connection, self.address, self.counts)
        self._broadcaster = Broadcaster(self._live_connection, self.address, self.counts)
        self._pubsub = PubSub(
            self._live_connection,
            self._topology,
            publisher,
            address=self.address,
            session=self.session,
            max_message_size=self.max_message_size,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._connection else "not started"
        return f"<AmqpTransport {self.address} {state}>"

    async def _open_side(self) -> AbstractConnection:
        """A plain connection of its own, for the inventory (which must not
        share the fate of the app's connection: ``inventory`` Rule 4).

        Raises:
            TransportError: no broker address took it.
        """
        settings = self.options
        options: dict[str, Any] = {}
        if settings.tls is not None:
            options["ssl_context"] = self._ssl_context
        failed: TransportError | None = None
        for url in self._client_urls:
            try:
                with map_exceptions(f"connect to {self.address}", address=self.address):
                    side: AbstractConnection = await aio_pika.connect(
                        url,
                        timeout=settings.connect_timeout,
                        client_properties={"connection_name": "pigeon inventory"},
                        **options,
                    )
                    return side
            except TransportError as exc:
                failed = exc
        assert failed is not None  # there is at least one address
        raise failed

    def _on_reconnect(self, *_: Any) -> None:
        self.counts["reconnects"] += 1

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self.address} is closed")
        if self._connection is None:
            raise NotStartedError(
                f"transport {self.address} is not started: await its start() first "
                "(pigeon.connect() starts the transports it makes)"
            )

    def _live_connection(self) -> AbstractRobustConnection:
        """The connection, for the helpers that open channels on it.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
        """
        self._check_open()
        assert self._connection is not None
        return self._connection

    def _live(self) -> tuple[Topology, Publisher]:
        self._check_open()
        assert self._topology is not None and self._publisher is not None
        return self._topology, self._publisher

    # -- work queues -----------------------------------------------------

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        """Publish persistently to ``queue``; the future resolves on the confirm.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over ``max_message_size``.
            Backpressure: ``outbox_limit`` sends are unconfirmed.
        """
        topology, publisher = self._live()
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        self.counts["sent"] += 1
        if message.headers and delay.NOT_BEFORE in message.headers:
            wait = delay.read(message.headers, _clock.wall(), delay.DEFAULT_MAX_DELAY)[1]
            if wait > 0:
                return self._send_later(queue, message, wait)
        return publisher.publish(
            queue,
            lambda resend: to_amqp(message, redelivered=resend),
            None if topology.ready(queue) else (lambda: topology.work_queue(queue)),
        )

    def _send_later(self, queue: str, message: Message, wait: float) -> asyncio.Future[None]:
        """Publish to the delay queue of ``queue`` whose TTL is ``wait``
        rounded up (``topology.delay_step_ms``): the broker moves it into
        ``queue`` once the TTL runs out, so it is never early."""
        topology, publisher = self._live()

        async def prepare() -> None:
            # The queue first: a delay queue dead-letters into it.
            await topology.work_queue(queue)
            await topology.delay_queue(queue, wait)

        self.counts["sent_delayed"] += 1
        return publisher.publish(
            delay_queue_name(queue, wait),
            lambda resend: to_amqp(message, redelivered=resend),
            prepare,
        )

    async def flush(self, timeout: float) -> None:
        """Wait for the broker to confirm every send so far.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            Timeout: some are unconfirmed after ``timeout`` seconds.
        """
        _topology, publisher = self._live()
        await publisher.flush(timeout)

    async def consume(
        self, queue: str, sink: DeliverySink, options: ConsumeOptions
    ) -> SubscriptionProtocol:
        """Consume ``queue`` with ``options.prefetch`` as the channel's prefetch.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            ConfigurationError: prefetch over 65535, or the queue exists
                with other arguments.
            TransportError: the broker cannot be reached.
        """
        topology, publisher = self._live()
        if options.prefetch > MAX_PREFETCH:
            raise ConfigurationError(
                f"prefetch must be <= {MAX_PREFETCH} on AMQP, not {options.prefetch}"
            )
        subscription = Subscription(
            self._live_connection,
            topology,
            publisher,
            self.counts,
            address=self.address,
            queue=queue,
            sink=sink,
            options=options,
        )
        self._subscriptions.append(subscription)
        try:
            await subscription.start()
        except BaseException:
            self._subscriptions.remove(subscription)
            await subscription.cancel()
            raise
        return subscription

    # -- request-reply ---------------------------------------------------

    async def request(self, service: str, message: Message, *, timeout: float) -> Message:
        """Call ``service``; see :class:`~pigeon.transports.amqp.rpc.Requester`.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            NoResponders: no server consumes the service queue.
            Timeout: no reply within ``timeout`` seconds.
            Rejected: the server's handler raised.
            MessageTooLarge: the body is over ``max_message_size``.
            TransportError: the broker cannot be reached.
        """
        self._check_open()
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        assert self._requester is not None
        self.counts["requests"] += 1
        return await self._requester.call(service, message, timeout)

    async def serve(self, service: str, handler: ServiceHandler) -> SubscriptionProtocol:
        """Answer requests for ``service`` with ``handler``.

        Raises:
            NotStartedError: the transport was not started.
            ClosedError: the transport is closed.
            TransportError: the broker cannot be reached.
        """
        self._check_open()
        registration = ServiceRegistration(
            self._live_connection,
            self.counts,
            address=self.address,
            prefetch=self.options.service_prefetch,
            service=service,
            handler=handler,
        )
        self._services.append(registration)
        try:
            await registration.start()
        except BaseException:
            self._services.remove(registration)
            await registration.cancel()
            raise
        return registration

    # -- publish-subscribe -----------------------------------------------

    def _live_pubsub(self) -> PubSub:
        self._check_open()
        assert self._pubsub is not None
        return self._pubsub

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        """Publish on ``topic``, numbered; see :mod:`.pubsub`.

        Raises (or fails the future with):
            NotStartedError, ClosedError: not started, or closed.
            ConfigurationError: not a valid topic, or over 255 bytes.
            MessageTooLarge: the body is over ``max_message_size``.
            Backpressure: ``outbox_limit`` sends are unconfirmed, or a
                subscriber queue with policy ``block`` is full.
        """
        return self._live_pubsub().publish(topic, message)

    async def subscribe(
        self,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> SubscriptionProtocol:
        """Deliver topics matching ``pattern`` into ``sink``; see :mod:`.pubsub`.

        Raises:
            NotStartedError, ClosedError: not started, or closed.
            ConfigurationError: a pattern or option RabbitMQ cannot express,
                or a replay of a pattern no retained stream covers.
            ReplayTrimmed: ``from_seq`` is no longer retained.
            TransportError: the broker cannot be reached.
        """
        if options.consume.prefetch > MAX_PREFETCH:
            raise ConfigurationError(
                f"prefetch must be <= {MAX_PREFETCH} on AMQP, not {options.consume.prefetch}"
            )
        return await self._live_pubsub().subscribe(pattern, sink, options, on_disconnect)

    async def retain(self, pattern: str, retention: Retention) -> None:
        """Keep the history of ``pattern`` in a stream; see :mod:`.topics`.

        Raises:
            NotStartedError, ClosedError: not started, or closed.
            ConfigurationError: ``max_count`` (streams trim by bytes and
                age), or the stream exists with other arguments.
            TransportError: the broker cannot be reached.
        """
        await self._live_pubsub().retain(pattern, retention)

    async def request_all(
        self, service: str, message: Message, *, timeout: float, min_replies: int
    ) -> list[Message]:
        """Ask every live server of ``service``; see :mod:`.broadcast`.

        Raises:
            NotStartedError, ClosedError: not started, or closed.
            NoResponders: no server.
            Timeout: fewer than ``min_replies`` replies in time (a server
                whose handler failed gives none).
            MessageTooLarge: the body is over ``max_message_size``.
            TransportError: the broker cannot be reached.
        """
        self._check_open()
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        assert self._broadcaster is not None
        return await self._broadcaster.call(service, message, timeout, min_replies)

    # -- closing ---------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for unconfirmed sends (those left fail with
        TransportError, counted in ``unconfirmed_at_close``), then close."""
        if self._closed:
            return
        self._closed = True
        connection = self._connection
        if connection is None:
            return
        if self._publisher is not None:
            await self._publisher.close(timeout)
        for subscription in self._subscriptions:
            await subscription.cancel()
        if self._pubsub is not None:
            await self._pubsub.close()
        for registration in self._services:
            await registration.cancel()
        if self._requester is not None:
            await self._requester.close()
        if self._broadcaster is not None:
            await self._broadcaster.close()
        if self._topology is not None:
            try:
                with map_exceptions("close", address=self.address):
                    await self._topology.close()
            except TransportError:
                pass
        try:
            with map_exceptions("close", address=self.address):
                await connection.close()
        except TransportError:
            pass

    def stats(self) -> dict[str, Any]:
        publisher = self._publisher
        return {
            **self.counts,
            **(publisher.counts if publisher else {}),
            "unconfirmed": publisher.unconfirmed if publisher else 0,
            "connected": bool(
                self._connection
                and not self._connection.is_closed
                and self._connection.connected.is_set()
            ),
            "declared": sorted(
                {
                    *(self._topology.declared if self._topology else ()),
                    *(self._pubsub.declared if self._pubsub else ()),
                }
            ),
            "topics": self._pubsub.stats() if self._pubsub else {},
        }
