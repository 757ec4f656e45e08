"""Queue names and declarations on the broker.

For a work queue ``Q`` pigeon declares:

* ``Q``: durable, quorum by default; the broker dead-letters into ``Q.dead``
  what it drops itself (RabbitMQ 4.x's default delivery limit of 20).
* ``Q.dead``: durable, same type, where rejected messages go.
* ``Q.delay.<ms>``: made on first use by ``nack(delay)``; every message in it
  has the same TTL (so none waits behind a longer one), then the broker
  dead-letters it back into ``Q``. Delays are rounded *up* to one of four
  steps per doubling, so there are few such queues; each deletes itself
  (``x-expires``) once unused.

The first time a connection declares ``Q``, it records the name in the
inventory (:mod:`.inventory`), where ``pigeon queues`` finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractRobustChannel, AbstractRobustConnection

from ..._core.ledger import DEAD_SUFFIX, dead_letter_queue
from ..._core.schedule import QUEUE_PREFIX as SCHEDULE_PREFIX
from ...errors import DeliveryError, PigeonError
from . import inventory
from .errors import map_exceptions

SERVICE_PREFIX = "pigeon.svc."
DELAY_INFIX = ".delay."
# A delay queue outlives its last declaration by this much, so every message
# published into it (right after a declaration) expires before the queue does.
EXPIRES_MARGIN_MS = 60_000
REDECLARE_EVERY = EXPIRES_MARGIN_MS / 1000 / 2
QUEUE_TYPES = ("quorum", "classic")
INVENTORY_GRACE = 1.0  # seconds a close waits for inventory recordings


def service_queue(service: str) -> str:
    """The queue the servers of ``service`` consume."""
    return SERVICE_PREFIX + service


def delay_step_ms(delay: float) -> int:
    """``delay`` seconds rounded up to a delay-queue step, in milliseconds.

    Steps are ``ceil(2 ** (k / 4))`` ms: at most 19 % longer than asked,
    about 90 steps from 1 ms to a day.
    """
    ms = max(1, math.ceil(delay * 1000))
    k = math.ceil(4 * math.log2(ms) - 1e-9)
    step = math.ceil(2 ** (k / 4))
    return max(step, ms)


def delay_queue(queue: str, delay: float) -> str:
    return f"{queue}{DELAY_INFIX}{delay_step_ms(delay)}"


def queue_arguments(name: str, queue_type: str) -> dict[str, Any]:
    """The declaration arguments of a pigeon work or dead-letter queue."""
    arguments: dict[str, Any] = {"x-queue-type": queue_type}
    if not name.endswith(DEAD_SUFFIX):
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = dead_letter_queue(name)
        if name.startswith(SCHEDULE_PREFIX):
            # A schedule's ticks go to one consumer at a time, which keeps
            # one per period (``pigeon._core.schedule`` Rule 3).
            arguments["x-single-active-consumer"] = True
    return arguments


def delay_arguments(queue: str, ms: int, queue_type: str) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-expires": ms + EXPIRES_MARGIN_MS,
    }
    if queue_type == "quorum":
        # Move expired messages with confirms, not fire-and-forget (3.10+).
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


@contextlib.asynccontextmanager
async def plain_channel(
    connection: aio_pika.abc.AbstractConnection, address: str, *, confirms: bool = False
) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel for a few declarations (``confirms``: and publishes the
    broker confirms), closed afterwards. Not a robust one: a refused
    declaration closes a channel, and a robust channel would reopen itself
    and stay open.

    Raises:
        TransportError: the broker cannot be reached.
    """
    channel = aio_pika.Channel(connection, publisher_confirms=confirms)
    with map_exceptions("open a channel", address=address):
        await channel.initialize()
    try:
        yield channel
    finally:
        if not channel.is_closed:
            with contextlib.suppress(PigeonError):
                with map_exceptions("close a channel", address=address):
                    await channel.close()


async def probe(
    connection: AbstractRobustConnection, queue: str, address: str
) -> aiormq.spec.Queue.DeclareOk | None:
    """What a passive declaration of ``queue`` says (its message and consumer
    counts), or None if there is no such queue.

    Raises:
        TransportError: the broker cannot be reached.
    """
    async with plain_channel(connection, address) as channel:
        try:
            with map_exceptions(f"look for queue {queue!r}", address=address):
                declared = await channel.declare_queue(queue, passive=True)
        except DeliveryError:  # no such queue
            return None
        return declared.declaration_result


class Topology:
    """Declares queues once per connection, on a channel of its own (a
    refused declaration closes its channel; it must not take publishes down).

    Args:
        connection: the robust connection.
        queue_type: ``quorum`` or ``classic``.
        address: the broker address, for error messages.
        open_side: opens a connection of its own for inventory recordings
            (``inventory`` Rule 4); None: queues are not recorded.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        queue_type: str,
        address: str,
        counts: Counter[str] | None = None,
        open_side: Callable[[], Awaitable[AbstractConnection]] | None = None,
    ) -> None:
        self.connection = connection
        self._open_side = open_side
        self._unrecorded: list[str] = []
        self.queue_type = queue_type
        self.address = address
        self.counts: Counter[str] = Counter() if counts is None else counts
        # Work queues recorded in the broker's inventory from this connection.
        self.inventoried: set[str] = set()
        self._recording: set[asyncio.Task[None]] = set()
        self.declared: dict[str, asyncio.Future[None]] = {}
        self.exchanges: dict[str, asyncio.Future[None]] = {}
        self._declared_at: dict[str, float] = {}
        self._channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()

    async def _get_channel(self) -> AbstractRobustChannel:
        async with self._lock:
            if self._channel is None:
                with map_exceptions("open a channel", address=self.address):
                    self._channel = await self.connection.channel(publisher_confirms=False)
            return self._channel

    async def _declare(self, name: str, arguments: dict[str, Any]) -> None:
        channel = await self._get_channel()
        with map_exceptions(f"declare queue {name!r}", address=self.address):
            # robust=False: durable queues survive a reconnect by themselves.
            await channel.declare_queue(name, durable=True, arguments=arguments, robust=False)

    async def _once(self, name: str, arguments: dict[str, Any]) -> None:
        future = self.declared.get(name)
        if future is None:
            future = self.declared[name] = asyncio.get_running_loop().create_future()
            try:
                await self._declare(name, arguments)
            except BaseException as exc:
                del self.declared[name]  # let the next caller try again
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                    future.exception()  # retrieved: the raise below reports it
                else:
                    future.cancel()
                raise
            future.set_result(None)
            self._declared_at[name] = time.monotonic()
            return
        await future

    def ready(self, queue: str) -> bool:
        """True when ``queue`` and its dead-letter queue are declared."""
        future = self.declared.get(queue)
        # Failed declarations are removed at once, so a done one succeeded.
        return future is not None and future.done()

    async def work_queue(self, queue: str) -> None:
        """Declare ``queue`` and its dead-letter queue (once).

        Raises:
            ConfigurationError: the queue exists with other arguments.
            TransportError: the broker cannot be reached.
        """
        if queue.endswith(DEAD_SUFFIX):
            await self._once(queue, queue_arguments(queue, self.queue_type))
            return
        dead = dead_letter_queue(queue)
        await self._once(dead, queue_arguments(dead, self.queue_type))
        await self._once(queue, queue_arguments(queue, self.queue_type))
        if queue not in self.inventoried and self._open_side is not None:
            # So pigeon queues can find it (AMQP cannot list queues). In the
            # background: sends waiting for this declaration must not wait
            # for it too, nor overtake the first of them. Names declared
            # while a recording runs go in the next one.
            self.inventoried.add(queue)
            self._unrecorded.append(queue)
            if not self._recording:
                task = asyncio.get_running_loop().create_task(self._record(self._open_side))
                self._recording.add(task)
                task.add_done_callback(self._recording.discard)

    async def _record(self, open_side: Callable[[], Awaitable[AbstractConnection]]) -> None:
        while self._unrecorded:
            queues, self._unrecorded = self._unrecorded, []
            try:
                side = await open_side()
            except PigeonError:
                self.counts["inventory_errors"] += 1
                return
            try:
                if not await inventory.record(side, queues, self.address):
                    self.counts["inventory_errors"] += 1
            finally:
                await side.close()

    async def delay_queue(self, queue: str, delay: float) -> str:
        """Declare (or re-declare, to keep it from expiring) the delay queue
        for ``queue`` and ``delay``; return its name.

        Raises:
            ConfigurationError: the queue exists with other arguments.
            TransportError: the broker cannot be reached.
        """
        ms = delay_step_ms(delay)
        name = f"{queue}{DELAY_INFIX}{ms}"
        at = self._declared_at.get(name)
        if at is not None and time.monotonic() - at > REDECLARE_EVERY:
            self.declared.pop(name, None)
        await self._once(name, delay_arguments(queue, ms, self.queue_type))
        return name

    def exchange_ready(self, name: str) -> bool:
        """True when the exchange ``name`` is declared on this connection."""
        future = self.exchanges.get(name)
        return future is not None and future.done()

    async def exchange(self, name: str, kind: str) -> None:
        """Declare the durable exchange ``name`` of type ``kind`` (once).

        Raises:
            ConfigurationError: it exists with another type.
            TransportError: the broker cannot be reached.
        """
        future = self.exchanges.get(name)
        if future is not None:
            await future
            return
        future = self.exchanges[name] = asyncio.get_running_loop().create_future()
        try:
            channel = await self._get_channel()
            with map_exceptions(f"declare exchange {name!r}", address=self.address):
                await channel.declare_exchange(name, kind, durable=True, robust=False)
        except BaseException as exc:
            del self.exchanges[name]  # let the next caller try again
            if isinstance(exc, Exception):
                future.set_exception(exc)
                future.exception()  # retrieved: the raise below reports it
            else:
                future.cancel()
            raise
        future.set_result(None)

    async def close(self) -> None:
        if self._recording:
            # Let a recording just started end (a short-lived sender's queue
            # is worth finding too), but not hold the close for long.
            recording = list(self._recording)
            _, late = await asyncio.wait(recording, timeout=INVENTORY_GRACE)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=INVENTORY_GRACE)
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            await channel.close()
