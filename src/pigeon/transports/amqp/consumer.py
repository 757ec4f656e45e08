"""Consuming a work queue: deliveries, settling, leases and attempt limits.

Settling maps onto the broker like this:

* ``ack`` → ``basic.ack``.
* ``nack(0)`` → ``basic.reject(requeue=True)`` (reject rather than nack, so
  RabbitMQ 4.3+ counts it as a failed delivery in ``x-delivery-count``).
* ``nack(delay)`` → a copy, carrying the attempts so far and the last error,
  goes to the queue's delay queue (confirmed); only then is the original acked.
* ``reject(reason)`` → a copy with the dead-letter headers goes to
  ``<queue>.dead`` (confirmed); then the original is acked.
* ``extend`` → renews the client-side lease (see :class:`Subscription`).

If the copy cannot be published the original is requeued instead: a
message is never acked before its successor is safe on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from ..._core import headers, policy
from ..._core.backoff import TryWindow
from ..._core.ledger import dead_letter_queue
from ...errors import AuthenticationError, PigeonError, TransportError
from ...message import Message
from ..base import ConsumeOptions, Delivery, DeliverySink
from .envelope import from_amqp, to_amqp
from .errors import map_exceptions
from .publisher import Prepare, Publisher
from .topology import Topology, queue_arguments

# A consume the broker crashed on (see Subscription.start) is tried again
# for this long, a pause apart (backoff Rule 3).
RESTART_WITHIN = 10.0  # seconds
RESTART_PAUSE = 0.25  # seconds


class _Lease:
    """One delivery this consumer holds; ``done`` once settled or expired."""

    __slots__ = ("incoming", "timer", "done")

    def __init__(self, incoming: AbstractIncomingMessage) -> None:
        self.incoming = incoming
        self.timer: asyncio.TimerHandle | None = None
        self.done = False


class Subscription:
    """A consumer of one queue on a channel of its own (its prefetch is the
    worker's credit).

    Leases are kept on the client: a delivery left unsettled for
    ``lease_ttl`` (and not extended) is given back with
    ``basic.reject(requeue=True)``, so the broker redelivers it, flagged; a
    later settle of the old delivery is stale and changes nothing, as on the
    other transports. A process that dies loses its channel, and the broker
    requeues what it held.

    Args:
        connection: returns the connection to open the channel on (and
            raises ClosedError once the transport is closed).
        topology: declares the queue, its dead-letter and delay queues.
        publisher: publishes the copies that delayed nacks and dead letters are.
        counts: the counters to add to (``delivered``, ``acked``...).
        address: the broker's address, for errors.
        queue: the queue consumed.
        sink: where deliveries are handed to the worker.
        options: the worker's prefetch, lease and attempt limit.
    """

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        topology: Topology,
        publisher: Publisher,
        counts: Counter[str],
        *,
        address: str,
        queue: str,
        sink: DeliverySink,
        options: ConsumeOptions,
    ) -> None:
        self.connection = connection
        self.topology = topology
        self.publisher = publisher
        self.counts = counts
        self.address = address
        self.queue = queue
        self.sink = sink
        self.options = options
        self.channel: AbstractRobustChannel | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._leases: set[_Lease] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancelled = False

    async def start(self) -> None:
        """Declare the queue and start consuming.

        A consume the broker crashed on is tried again for up to
        ``RESTART_WITHIN`` seconds, counted in ``consume_restarts``:
        RabbitMQ 3.10 answers a ``basic.consume`` of a quorum queue that
        another connection declared an instant before, while the queue's
        own process is not running yet, by closing this whole connection
        (541 INTERNAL_ERROR). The robust connection reconnects, restoring
        the other channels on it.

        Raises:
            ConfigurationError: the queue exists with other arguments.
            TransportError: the broker cannot be reached.
        """
        await self._prepare()
        window = TryWindow(RESTART_WITHIN, RESTART_PAUSE)
        while True:
            try:
                with map_exceptions(f"consume {self.queue!r}", address=self.address):
                    await self._consume()
                return
            except TransportError as exc:
                crashed = isinstance(exc.__cause__, aiormq.exceptions.ConnectionInternalError)
                if not (crashed or window.opened):
                    raise  # only a broker that crashed our consume is waited for
                if isinstance(exc, AuthenticationError) or not window.again(time.monotonic()):
                    raise
            # The connection is back within a reconnect interval (one second
            # unless the URL says otherwise); tried again while the window runs.
            self.counts["consume_restarts"] += 1
            await self._drop_channel()
            await asyncio.sleep(window.pause)
            with contextlib.suppress(TimeoutError):
                connected = self.connection().connected.wait()
                await asyncio.wait_for(connected, window.left(time.monotonic()))

    async def _consume(self) -> None:
        """Open this consumer's channel, declare the queue, start consuming
        (inside map_exceptions)."""
        self.channel = channel = await self.connection().channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=self.options.prefetch)
        # Declared on this channel too, so the robust channel restores the
        # queue and its consumer after a reconnect.
        self._amqp_queue = await self._declare(channel)
        self._consumer_tag = await self._amqp_queue.consume(self._on_message)

    async def _drop_channel(self) -> None:
        """Close a channel a failed start left (so a reconnect does not
        restore it), whatever state it is in."""
        channel, self.channel = self.channel, None
        self._amqp_queue = None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):  # noqa: BLE001  (it is being dropped)
                await channel.close()

    async def _prepare(self) -> None:
        """What must exist before the queue is consumed (its dead-letter queue)."""
        await self.topology.work_queue(self.queue)

    async def _declare(self, channel: AbstractRobustChannel) -> AbstractQueue:
        """Declare the consumed queue on ``channel`` (inside map_exceptions)."""
        return await channel.declare_queue(
            self.queue,
            durable=True,
            arguments=queue_arguments(self.queue, self.topology.queue_type),
        )

    # -- deliveries ------------------------------------------------------

    async def _on_message(self, incoming: AbstractIncomingMessage) -> None:
        # aio-pika runs this as one task per delivery, in delivery order; it
        # must not await before the sink call, or the order would be lost.
        lease = _Lease(incoming)
        if self._cancelled:
            self._spawn(self._give_back(lease))
            return
        message = from_amqp(incoming)
        counts = self.counts
        counts["delivered"] += 1
        if message.redelivered:
            counts["redelivered"] += 1
        if policy.over_attempt_limit(message.attempt, self.options.max_attempts):
            # Workers kept dying on it: dead-letter instead of delivering again.
            message.attempt -= 1
            reason = policy.attempt_limit_reason(self.queue, message.attempt)
            self._spawn(self._bury(lease, message, reason))
            return
        self._leases.add(lease)
        self._arm(lease)
        self.sink([Delivery(self.queue, message, self, tag=lease)])

    def _arm(self, lease: _Lease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        lease.timer = asyncio.get_running_loop().call_later(
            self.options.lease_ttl, self._expire, lease
        )

    def _expire(self, lease: _Lease) -> None:
        if lease.done:
            return
        self.counts["lease_expired"] += 1
        self._spawn(self._give_back(lease))

    def _release(self, lease: _Lease) -> bool:
        """Take the lease for settling; False (counted stale) if it is gone."""
        if lease.done:
            self.counts["stale_settles"] += 1
            return False
        lease.done = True
        self._leases.discard(lease)
        if lease.timer is not None:
            lease.timer.cancel()
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _basic(self, lease: _Lease, requeue: bool) -> None:
        """ack, or reject with requeue; a channel gone meanwhile makes it stale
        (the broker has already requeued the delivery)."""
        try:
            with map_exceptions(f"settle a delivery of {self.queue!r}", address=self.address):
                if requeue:
                    await lease.incoming.reject(requeue=True)
                else:
                    await lease.incoming.ack()
        except TransportError:
            self.counts["stale_settles"] += 1

    async def _give_back(self, lease: _Lease) -> None:
        lease.done = True
        self._leases.discard(lease)
        if lease.timer is not None:
            lease.timer.cancel()
        await self._basic(lease, requeue=True)

    async def _republish(
        self,
        lease: _Lease,
        target: str,
        copy_of: Message,
        extra: dict[str, str],
        attempt: int,
        redelivered: bool,
        prepare: Prepare | None = None,
    ) -> bool:
        """Publish a copy (confirmed), then ack the original; on failure
        requeue the original instead. True when the copy was stored."""

        def build(resend: bool) -> aio_pika.Message:
            return to_amqp(copy_of, attempt=attempt, redelivered=redelivered or resend, extra=extra)

        try:
            await self.publisher.publish(target, build, prepare)
        except PigeonError:
            self.counts["settle_errors"] += 1
            await self._basic(lease, requeue=True)
            return False
        await self._basic(lease, requeue=False)
        return True

    async def _bury(self, lease: _Lease, message: Message, reason: str) -> None:
        lease.done = True
        extra = policy.dead_letter_headers(message.headers, self.queue, reason, message.attempt)
        # A dead letter starts a new life in its queue: fresh attempts, but
        # flagged, since it was seen.
        dead = dead_letter_queue(self.queue)
        topology = self.topology
        if await self._republish(
            lease, dead, message, extra, 0, True, lambda: topology.work_queue(dead)
        ):
            self.counts["dead_lettered"] += 1

    # -- Settler ---------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        lease: _Lease = delivery.tag
        if self._release(lease):
            self.counts["acked"] += 1
            await self._basic(lease, requeue=False)

    async def nack(self, delivery: Delivery, delay: float, reason: str) -> None:
        lease: _Lease = delivery.tag
        if not self._release(lease):
            return
        self.counts["nacked"] += 1
        if delay <= 0:
            await self._basic(lease, requeue=True)
            return
        try:
            target = await self.topology.delay_queue(self.queue, delay)
        except PigeonError:
            self.counts["settle_errors"] += 1
            await self._basic(lease, requeue=True)
            return
        message = delivery.message
        extra = {headers.LAST_ERROR: reason} if reason else {}
        if await self._republish(lease, target, message, extra, message.attempt, True):
            self.counts["delayed"] += 1

    async def reject(self, delivery: Delivery, reason: str) -> None:
        lease: _Lease = delivery.tag
        if self._release(lease):
            await self._bury(lease, delivery.message, reason)

    def extend(self, delivery: Delivery) -> None:
        lease: _Lease = delivery.tag
        if lease.done:
            self.counts["stale_settles"] += 1
            return
        self._arm(lease)

    # -- Subscription ----------------------------------------------------

    async def drain(self) -> None:
        """Take no more deliveries (basic.cancel); those held stay on the
        channel, to be settled as usual."""
        queue, tag = self._amqp_queue, self._consumer_tag
        if queue is None or tag is None or self._cancelled:
            return
        self._consumer_tag = None
        with contextlib.suppress(PigeonError):
            with map_exceptions(f"stop consuming {self.queue!r}", address=self.address):
                await queue.cancel(tag)

    async def cancel(self) -> None:
        """Stop consuming; what this consumer still holds goes back to the queue."""
        if self._cancelled:
            return
        self._cancelled = True
        for lease in self._leases:
            if lease.timer is not None:
                lease.timer.cancel()
        self._leases.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        channel, self.channel = self.channel, None
        if channel is None or channel.is_closed:
            return
        # Closing the channel cancels its consumer and makes the broker
        # requeue every delivery still unacked on it.
        with contextlib.suppress(PigeonError):
            with map_exceptions(f"stop consuming {self.queue!r}", address=self.address):
                await channel.close()
