"""The ``amqp://`` transport object: options, lifecycle and the Transport verbs."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from ...errors import ClosedError, ConfigurationError, MessageTooLarge, TransportError
from ...message import Message
from ..base import ConsumeOptions, DeliverySink, ServiceHandler
from ..base import Subscription as SubscriptionProtocol
from .consumer import Subscription
from .envelope import to_amqp
from .errors import map_exceptions
from .publisher import Publisher
from .rpc import Requester, ServiceRegistration
from .topology import QUEUE_TYPES, Topology

DEFAULT_MAX_MESSAGE_SIZE = 16 << 20  # RabbitMQ 4.x's own default max_message_size
MAX_PREFETCH = 65535  # basic.qos prefetch-count is a 16-bit field

# Options other pigeon transports take that have no meaning here.
_NOT_HONOURED = {
    "max_length": "set a queue length limit with a RabbitMQ policy (max-length) instead",
    "lease_ttl": "pass lease_ttl to consume(); the broker has no transport-wide lease",
    "heartbeat_misses": "AMQP heartbeats are negotiated with the broker; use heartbeat",
    "connect_grace": "the broker knows its consumers; there is no handshake to wait for",
}


class AmqpTransport:
    """pigeon on RabbitMQ through aio-pika's robust connection.

    Args:
        url: ``amqp://user:password@host:port/vhost`` (``amqps://`` is not
            a pigeon scheme; give TLS settings in the URL query instead).
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
        ConfigurationError: an unknown option, or one this transport cannot honour.
    """

    def __init__(
        self,
        url: str,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        queue_type: str = "quorum",
        reconnect_interval: float = 1.0,
        heartbeat: float | None = None,
        connect_timeout: float = 5.0,
        outbox_limit: int = 100_000,
        service_prefetch: int = 64,
        **unknown: Any,
    ) -> None:
        for name in unknown:
            why = _NOT_HONOURED.get(
                name,
                "it is not an option of this transport; known: "
                "max_message_size, queue_type, reconnect_interval, "
                "heartbeat, connect_timeout, outbox_limit, service_prefetch",
            )
            raise ConfigurationError(f"amqp transport cannot honour {name}=: {why}")
        if queue_type not in QUEUE_TYPES:
            raise ConfigurationError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
        for name, value in (
            ("max_message_size", max_message_size),
            ("outbox_limit", outbox_limit),
            ("service_prefetch", service_prefetch),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")
        if service_prefetch > MAX_PREFETCH:
            raise ConfigurationError(f"service_prefetch must be <= {MAX_PREFETCH}")
        for name, number in (
            ("reconnect_interval", reconnect_interval),
            ("connect_timeout", connect_timeout),
        ):
            if not isinstance(number, (int, float)) or number <= 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        try:
            parsed = URL(url)
        except ValueError as exc:
            raise ConfigurationError(f"{url!r} is not a valid amqp:// URL: {exc}") from exc
        if parsed.scheme != "amqp" or not parsed.host:
            raise ConfigurationError(f"{url!r} is not an amqp://HOST URL")
        self.url = url
        # For messages and errors: never the password.
        self.address = str(parsed.with_user(None).with_password(None))
        self.max_message_size = max_message_size
        self.queue_type = queue_type
        self.reconnect_interval = float(reconnect_interval)
        self.heartbeat = heartbeat
        self.connect_timeout = float(connect_timeout)
        self.outbox_limit = outbox_limit
        self.service_prefetch = service_prefetch
        self.counts: Counter[str] = Counter()
        self._connection: AbstractRobustConnection | None = None
        self._topology: Topology | None = None
        self._publisher: Publisher | None = None
        self._requester: Requester | None = None
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
        options: dict[str, Any] = {"reconnect_interval": self.reconnect_interval}
        if self.heartbeat is not None:
            options["heartbeat"] = self.heartbeat
        with map_exceptions(f"connect to {self.address}", address=self.address):
            self._connection = await aio_pika.connect_robust(
                self.url,
                timeout=self.connect_timeout,
                client_properties={"connection_name": "pigeon"},
                **options,
            )
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        self._topology = Topology(self._connection, self.queue_type, self.address)
        self._publisher = Publisher(
            self._connection,
            self.address,
            self.outbox_limit,
            retry_pause=min(0.2, self.reconnect_interval),
        )
        try:
            await self._publisher.open()
        except BaseException:
            await self._connection.close()
            raise
        self._requester = Requester(self)

    def _on_reconnect(self, *_: Any) -> None:
        self.counts["reconnects"] += 1

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"transport {self.address} is closed")
        if self._connection is None:
            raise ClosedError(f"transport {self.address} is not started")

    @property
    def connection(self) -> AbstractRobustConnection:
        self._check_open()
        assert self._connection is not None
        return self._connection

    @property
    def topology(self) -> Topology:
        assert self._topology is not None
        return self._topology

    @property
    def publisher(self) -> Publisher:
        assert self._publisher is not None
        return self._publisher

    # -- work queues -----------------------------------------------------

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        """Publish persistently to ``queue``; the future resolves on the confirm.

        Raises:
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over ``max_message_size``.
            Backpressure: ``outbox_limit`` sends are unconfirmed.
        """
        self._check_open()
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        topology = self.topology
        self.counts["sent"] += 1
        return self.publisher.publish(
            queue,
            lambda resend: to_amqp(message, redelivered=resend),
            None if topology.ready(queue) else (lambda: topology.work_queue(queue)),
        )

    async def flush(self, timeout: float) -> None:
        """Wait for the broker to confirm every send so far.

        Raises:
            Timeout: some are unconfirmed after ``timeout`` seconds.
        """
        self._check_open()
        await self.publisher.flush(timeout)

    async def consume(
        self, queue: str, sink: DeliverySink, options: ConsumeOptions
    ) -> SubscriptionProtocol:
        """Consume ``queue`` with ``options.prefetch`` as the channel's prefetch.

        Raises:
            ConfigurationError: prefetch over 65535, or the queue exists
                with other arguments.
            TransportError: the broker cannot be reached.
        """
        self._check_open()
        if options.prefetch > MAX_PREFETCH:
            raise ConfigurationError(
                f"prefetch must be <= {MAX_PREFETCH} on AMQP, not {options.prefetch}"
            )
        subscription = Subscription(self, queue, sink, options)
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
            TransportError: the broker cannot be reached.
        """
        self._check_open()
        registration = ServiceRegistration(self, service, handler)
        self._services.append(registration)
        try:
            await registration.start()
        except BaseException:
            self._services.remove(registration)
            await registration.cancel()
            raise
        return registration

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
        for registration in self._services:
            await registration.cancel()
        if self._requester is not None:
            await self._requester.close()
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
            "declared": sorted(self._topology.declared) if self._topology else [],
        }
