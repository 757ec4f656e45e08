"""Request-reply on RabbitMQ.

Servers of a service consume the queue ``pigeon.svc.<service>`` (classic,
durable, auto-delete: it exists exactly while some server consumes it).
Clients publish requests there with ``mandatory=True`` and receive replies
through direct reply-to (``amq.rabbitmq.reply-to``), matched by correlation
id. A request nobody can take comes back from the broker at once:
:class:`~pigeon.errors.NoResponders`. Each server also listens on a queue
of its own for ``request_all`` (:mod:`.broadcast`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable

import msgspec
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from ...errors import PigeonError, Rejected, Timeout, TransportError
from ...message import BYTES, Message, new_id
from ..base import ServiceHandler, run_service_handler
from . import broadcast
from .envelope import ERROR, error_of, from_amqp, remaining, to_amqp
from .errors import map_exceptions
from .topology import service_queue

REPLY_TO = "amq.rabbitmq.reply-to"
# A service queue whose servers all vanished without cancelling (a broker
# restart) deletes itself after this long unused.
SERVICE_QUEUE_EXPIRES_MS = 60_000


def service_arguments() -> dict[str, object]:
    # Explicitly classic: a vhost whose default queue type is quorum would
    # otherwise refuse an auto-delete queue.
    return {"x-queue-type": "classic", "x-expires": SERVICE_QUEUE_EXPIRES_MS}


class Requester:
    """The client side: one channel consuming direct reply-to, on which the
    requests are also published (the broker requires that).

    Args:
        connection: returns the connection to open the channel on (and
            raises ClosedError once the transport is closed).
        address: the broker's address, for errors.
        counts: the counters to add to (``late_replies``).
    """

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        address: str,
        counts: Counter[str],
    ) -> None:
        self.connection = connection
        self.address = address
        self.counts = counts
        self._channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()
        self._calls: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}

    async def _ready(self) -> AbstractRobustChannel:
        async with self._lock:
            if self._channel is None:
                connection = self.connection()
                with map_exceptions("open the reply channel", address=self.address):
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    queue = await channel.declare_queue(REPLY_TO, passive=True)
                    await queue.consume(self._on_reply, no_ack=True)
                self._channel = channel
            return self._channel

    async def _on_reply(self, incoming: AbstractIncomingMessage) -> None:
        call = self._calls.get(incoming.correlation_id or "")
        if call is None or call.done():
            self.counts["late_replies"] += 1
            return
        call.set_result(incoming)

    async def call(self, service: str, message: Message, timeout: float) -> Message:
        """Send ``message`` to ``service`` and wait for the reply.

        Raises:
            NoResponders: the broker returned the request: no server.
            Timeout: no reply within ``timeout``.
            Rejected: the server's handler failed.
            TransportError: the broker cannot be reached.
        """
        loop = asyncio.get_running_loop()
        call_id = message.id
        request = msgspec.structs.replace(message, deadline=time.time() + timeout)
        reply_future: asyncio.Future[AbstractIncomingMessage] = loop.create_future()
        self._calls[call_id] = reply_future
        try:
            async with asyncio.timeout(timeout):
                channel = await self._ready()
                outgoing = to_amqp(
                    request,
                    persistent=False,
                    reply_to=REPLY_TO,
                    correlation_id=call_id,
                    expiration=timeout,
                )
                with map_exceptions(f"request {service!r}", address=self.address, service=service):
                    await channel.default_exchange.publish(
                        outgoing, service_queue(service), mandatory=True
                    )
                incoming = await reply_future
        except TimeoutError as exc:
            raise Timeout(f"service {service!r} did not answer within {timeout:.3f} s") from exc
        finally:
            self._calls.pop(call_id, None)
        error = error_of(incoming)
        if error is not None:
            raise Rejected(service, error)
        return from_amqp(incoming)

    async def close(self) -> None:
        for call in self._calls.values():
            call.cancel()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(PigeonError):
                with map_exceptions("close the reply channel", address=self.address):
                    await channel.close()


class ServiceRegistration:
    """One server of ``service``: a consumer of its queue on its own channel.

    Each request runs as a task, cut off at the request's deadline (then no
    reply is sent: the caller has given up). A handler failure is replied
    with the error in ``headers.ERROR``; the caller raises Rejected.

    Args:
        connection: returns the connection to open the channel on (and
            raises ClosedError once the transport is closed).
        counts: the counters to add to (``requests_handled``...).
        address: the broker's address, for errors.
        prefetch: requests this server handles at once.
        service: the service answered.
        handler: what answers a request.
    """

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        counts: Counter[str],
        *,
        address: str,
        prefetch: int,
        service: str,
        handler: ServiceHandler,
    ) -> None:
        self.connection = connection
        self.counts = counts
        self.address = address
        self.prefetch = prefetch
        self.service = service
        self.handler = handler
        self.channel: AbstractRobustChannel | None = None
        self.broadcast_queue: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancelled = False

    async def start(self) -> None:
        """Declare the service queue and start consuming it, and this
        server's broadcast queue (see :mod:`.broadcast`).

        Raises:
            ConfigurationError: the queue exists with other arguments.
            TransportError: the broker cannot be reached.
        """
        with map_exceptions(f"serve {self.service!r}", address=self.address):
            self.channel = channel = await self.connection().channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await channel.declare_queue(
                service_queue(self.service),
                durable=True,
                auto_delete=True,
                arguments=service_arguments(),
            )
            await queue.consume(self._on_request)
            # request_all reaches every server through a queue of its own.
            self.broadcast_queue = await broadcast.listen(channel, self.service, self._on_request)

    async def _on_request(self, incoming: AbstractIncomingMessage) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(incoming))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, incoming: AbstractIncomingMessage) -> None:
        counts = self.counts
        message = from_amqp(incoming)
        left = remaining(message)
        outcome = await run_service_handler(self.handler, message, left)
        if outcome.expired:
            counts["expired_requests"] += 1
            await self._settle(incoming)  # the caller has given up: no reply
            return
        error, reply = outcome.error or None, outcome.reply
        counts["requests_handled"] += 1
        if incoming.reply_to:
            if reply is None:
                reply = Message(id=new_id(), body=b"", content_type=BYTES, created_at=time.time())
            outgoing = to_amqp(
                reply,
                persistent=False,
                correlation_id=incoming.correlation_id,
                extra={ERROR: error} if error is not None else None,
            )
            channel = self.channel
            try:
                with map_exceptions(f"reply for {self.service!r}", address=self.address):
                    if channel is None:
                        raise TransportError("the service channel is closed")
                    await channel.default_exchange.publish(
                        outgoing, incoming.reply_to, mandatory=False
                    )
            except PigeonError:
                counts["replies_lost"] += 1
        await self._settle(incoming)

    async def _settle(self, incoming: AbstractIncomingMessage) -> None:
        with contextlib.suppress(PigeonError):
            with map_exceptions(f"ack a request for {self.service!r}", address=self.address):
                await incoming.ack()

    async def cancel(self) -> None:
        """Stop serving; requests being handled go back to the queue for
        another server."""
        if self._cancelled:
            return
        self._cancelled = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(PigeonError):
                with map_exceptions(f"stop serving {self.service!r}", address=self.address):
                    await channel.close()
