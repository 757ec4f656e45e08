"""The seam between pigeon's API and its transports.

A transport moves messages for one URL scheme. It is small on purpose: the
API layer (workers running handlers, retry policy, codecs) is shared by all
of them, so a transport only stores, delivers, settles and correlates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .._core.topics import DEFAULT_BUFFER, Retention, SlowPolicy, StartAt
from ..errors import ConfigurationError, LocalProtocolError, NoResponders, Rejected
from ..message import Message


@dataclass(frozen=True, slots=True)
class ConsumeOptions:
    """What a worker asks of the queue it consumes.

    Attributes:
        prefetch: deliveries the worker may hold unsettled (its credit).
        lease_ttl: seconds an unsettled delivery is kept before redelivery.
        max_attempts: deliveries after which the queue dead-letters a message
            (0: no host-side limit).
    """

    prefetch: int = 64
    lease_ttl: float = 30.0
    max_attempts: int = 0


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """What a subscriber asks of the topics it subscribes to.

    Attributes:
        name: a durable subscription's name: it keeps its position while no
            subscriber runs, and subscribers with the same name share its
            messages as competing consumers. None: a subscription of this
            subscriber alone, gone when it stops.
        policy: what the host does when ``buffer`` messages wait for this
            subscriber (``pigeon._core.topics`` Rule 4).
        buffer: messages that may wait for this subscriber.
        start: where it starts (Rule 5); default new messages only.
        consume: prefetch, lease and attempt limit, as for a queue.
    """

    name: str | None = None
    policy: SlowPolicy = SlowPolicy.DROP_OLDEST
    buffer: int = DEFAULT_BUFFER
    start: StartAt = StartAt()
    consume: ConsumeOptions = ConsumeOptions()


class Settler(Protocol):
    """How a transport settles one of its deliveries."""

    def ack(self, delivery: Delivery) -> Awaitable[None] | None: ...
    def nack(self, delivery: Delivery, delay: float, reason: str) -> Awaitable[None] | None: ...
    def reject(self, delivery: Delivery, reason: str) -> Awaitable[None] | None: ...
    def extend(self, delivery: Delivery) -> Awaitable[None] | None: ...


class Delivery:
    """One message handed to a worker, to be settled exactly once.

    ``ack`` removes it from the queue; ``nack`` puts it back (after ``delay``
    seconds); ``reject`` dead-letters it with a reason; ``extend`` keeps the
    lease alive for a slow handler. A second settle raises
    :class:`~pigeon.errors.LocalProtocolError`.
    """

    __slots__ = ("message", "queue", "settled", "_settler", "tag")

    def __init__(self, queue: str, message: Message, settler: Settler, tag: Any = None) -> None:
        self.queue = queue
        self.message = message
        self.settled = False
        self._settler = settler
        self.tag = tag  # transport-specific handle (e.g. a broker's delivery)

    @property
    def body(self) -> bytes:
        return self.message.body

    def decode(self, type: Any = None) -> Any:
        """Decode the body (see :meth:`pigeon.Message.decode`)."""
        return self.message.decode(type)

    def _settle(self) -> None:
        if self.settled:
            raise LocalProtocolError(f"message {self.message.id} was already settled")
        self.settled = True

    async def ack(self) -> None:
        """Settle as done: the queue forgets the message."""
        self._settle()
        result = self._settler.ack(self)
        if result is not None:
            await result

    async def nack(self, delay: float = 0.0, reason: str = "") -> None:
        """Settle as not done: deliver it again, after ``delay`` seconds."""
        if delay < 0:
            raise ConfigurationError(f"delay must be >= 0 seconds, not {delay!r}")
        self._settle()
        result = self._settler.nack(self, float(delay), reason)
        if result is not None:
            await result

    async def reject(self, reason: str = "rejected by handler") -> None:
        """Settle as failed for good: dead-letter it with ``reason``."""
        self._settle()
        result = self._settler.reject(self, reason)
        if result is not None:
            await result

    async def extend(self) -> None:
        """Ask for more time: the lease is renewed for another ``lease_ttl``."""
        if self.settled:
            raise LocalProtocolError(f"message {self.message.id} was already settled")
        result = self._settler.extend(self)
        if result is not None:
            await result


DeliverySink = Callable[[list[Delivery]], None]
ServiceHandler = Callable[[Message], Awaitable[Message]]


class ServerStopping(NoResponders):
    """A draining server cut a request short when its grace ran out: like a
    server lost, the caller may try another one."""


@dataclass(slots=True)
class HandlerOutcome:
    """How one run of a service handler ended (see ``run_service_handler``).

    Attributes:
        reply: the handler's reply, when it returned one.
        error: why it failed, for the caller's ``Rejected`` ("" if it did not).
        expired: the request's deadline passed first: the caller has given
            up, so nothing is sent back.
        stopped: its server was draining and cut it short (``ServerStopping``).
    """

    reply: Message | None = None
    error: str = ""
    expired: bool = False
    stopped: bool = False


async def run_service_handler(
    handler: ServiceHandler, message: Message, remaining: float | None
) -> HandlerOutcome:
    """Run ``handler`` on a request with ``remaining`` seconds until its
    deadline (None: no deadline), cancelling it when the deadline passes.

    Every transport answers requests through this one function, so a
    handler's failure, timeout and expiry mean the same everywhere.
    """
    if remaining is not None and remaining <= 0:
        return HandlerOutcome(expired=True)
    try:
        if remaining is None:  # the caller enforces the deadline itself
            return HandlerOutcome(reply=await handler(message))
        async with asyncio.timeout(remaining) as scope:
            return HandlerOutcome(reply=await handler(message))
    except TimeoutError:
        if remaining is not None and scope.expired():
            return HandlerOutcome(expired=True)
        return HandlerOutcome(error="TimeoutError: the handler timed out")
    except ServerStopping as exc:
        return HandlerOutcome(error=str(exc), stopped=True)
    except Rejected as exc:
        return HandlerOutcome(error=exc.reason)
    except Exception as exc:  # the handler's failure becomes the caller's Rejected
        return HandlerOutcome(error=f"{type(exc).__name__}: {exc}")


class Subscription(Protocol):
    """A running consumer or server registration; ``cancel`` stops it."""

    async def cancel(self) -> None: ...


class Transport(Protocol):
    """What every transport provides. Methods raise only pigeon errors."""

    url: str

    async def start(self) -> None:
        """Connect or bind.

        Raises:
            TransportError: the address cannot be used or reached.
        """

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        """Queue a message for ``queue``; the future resolves once the host
        confirms it is stored. ``fresh`` says the id was minted just now, so
        it cannot be a resend (a host may skip de-duplicating it).

        Raises:
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over the configured limit.
        """
        ...

    async def flush(self, timeout: float) -> None:
        """Wait until every send so far is confirmed.

        Raises:
            Timeout: some are still unconfirmed after ``timeout`` seconds.
        """

    async def consume(
        self, queue: str, sink: DeliverySink, options: ConsumeOptions
    ) -> Subscription:
        """Start delivering ``queue`` into ``sink`` (called on the loop with
        batches of deliveries, never more than ``prefetch`` unsettled).

        Raises:
            ConfigurationError: an option the transport cannot honour.
        """
        ...

    async def request(self, service: str, message: Message, *, timeout: float) -> Message:
        """Call ``service`` and return its reply.

        Raises:
            NoResponders: no live server offers the service.
            Timeout: no reply within ``timeout`` seconds.
            Rejected: the server's handler raised.
        """
        ...

    async def serve(self, service: str, handler: ServiceHandler) -> Subscription:
        """Answer requests for ``service`` with ``handler``."""
        ...

    # -- publish-subscribe (see pigeon._core.topics for the rules) ----------

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        """Publish ``message`` on ``topic``; the future resolves once the
        topic's host (or broker) took it.

        The message reaches every subscriber numbered (headers TOPIC, SEQ and
        SOURCE), by the host or, where nothing hosts topics, by this
        publisher.

        Raises (or fails the future with):
            Backpressure: a subscriber with policy ``block`` has no room.
            ClosedError, MessageTooLarge: as for ``send_nowait``.
        """
        ...

    async def subscribe(
        self,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> Subscription:
        """Deliver messages on topics matching ``pattern`` into ``sink`` (as
        ``consume`` does; settling works the same). The history asked for in
        ``options.start`` comes first, then live messages, with no gap.
        ``on_disconnect(reason)`` is called once if the host cuts this
        subscriber off (policy ``disconnect``).

        Raises:
            ConfigurationError: a pattern or option this transport cannot
                express (the message says what to use instead).
            ReplayTrimmed: ``from_seq`` is no longer retained.
        """
        ...

    async def retain(self, pattern: str, retention: Retention) -> None:
        """Keep history of the topics matching ``pattern``.

        Raises:
            ConfigurationError: this transport cannot keep history.
        """

    async def request_all(
        self, service: str, message: Message, *, timeout: float, min_replies: int
    ) -> list[Message]:
        """Ask every live server of ``service``; return the replies that came
        by ``timeout`` (sooner once every server answered).

        Raises:
            NoResponders: no live server offers the service.
            Timeout: fewer than ``min_replies`` replies came in time.
        """
        ...

    async def close(self, timeout: float = 5.0) -> None:
        """Stop: wait up to ``timeout`` for unconfirmed sends, then release all."""

    def stats(self) -> dict[str, Any]:
        """Counters of everything sent, delivered, retried, dropped, dead-lettered."""
        ...
