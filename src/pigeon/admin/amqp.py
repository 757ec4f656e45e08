"""The admin backend of ``amqp://`` (and ``amqps://``): AMQP 0-9-1 methods
only (the management HTTP API is not assumed to be enabled).

- Which queues: AMQP has no method that lists them. Every pigeon AMQP
  transport records the work queues it declares in the inventory, a small
  stream queue ``pigeon.inventory`` bounded in bytes
  (``pigeon.transports.amqp.inventory``); ``open_admin(url, queues=[...])``
  (``--queue NAME``) adds names pigeon did not declare.
- Counts: a passive ``queue.declare`` of ``Q`` gives ``ready`` (its message
  count) and ``consumers``; of ``Q.dead``, ``dead``. The broker says nothing
  else per queue over AMQP: the other fields are None.
- ``dead``: ``basic.get`` without ack on a channel of its own, then the
  channel is closed and the broker puts them back (each look is a delivery:
  they come back marked redelivered, and on RabbitMQ 4.x it counts toward a
  quorum queue's delivery limit).
- ``replay``: ``basic.get`` from ``Q.dead``, publish into ``Q`` with publisher
  confirms, and only then ``basic.ack`` the letter.
- ``purge``: ``queue.purge`` (ready messages only: unacked ones stay).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from .._core import policy
from .._core.backoff import TryWindow
from .._core.ledger import DEAD_SUFFIX, dead_letter_queue
from .._core.limits import check_name
from ..errors import AuthenticationError, DeliveryError, PigeonError, TransportError
from ..transports.amqp import envelope, inventory
from ..transports.amqp.errors import map_exceptions
from ..transports.amqp.options import parse as parse_options
from ..transports.amqp.topology import plain_channel
from ..transports.zmq.admin import dead_letter_row
from .base import Admin, QueueRow, ServiceRow
from .errors import Unreachable
from .rows import declared_rows

MAX_LETTERS = 10_000  # dead letters taken per call at most
INVENTORY_IDLE = 0.3  # seconds without a new inventory entry: the end is reached
INVENTORY_PAUSE = 2.0  # the same, before the stream's end at the look's start has come
MAX_INVENTORY = 100_000  # entries read at most
COUNT_CHANNELS = 8  # passive declares in flight at once
FRESH_INVENTORY_WAIT = 3.0  # seconds an inventory counted empty is tried for
FRESH_INVENTORY_PAUSE = 0.25  # seconds between those tries

# Opens another connection to the broker, named (for its management views).
Connect = Callable[[str], Awaitable[AbstractConnection]]


class AmqpAdmin(Admin):
    """Admin of pigeon's queues on a RabbitMQ broker; see the module docstring."""

    transport = "amqp"

    def __init__(
        self,
        address: str,
        connection: AbstractConnection,
        names: list[str],
        timeout: float,
        connect: Connect,
    ) -> None:
        self.url = address
        self._connection = connection
        self._connect = connect  # another connection to the same broker
        self._names = names
        self._timeout = timeout
        # Inventory entries that are not queue names (any client may write
        # the stream): skipped, never declared, and counted in info().
        self.inventory_skipped = 0
        # Reads of an inventory counted empty that the broker cut off (see
        # inventory()) and that were tried again.
        self.inventory_retries = 0

    @classmethod
    async def open(
        cls, url: str, *, timeout: float = 3.0, queues: list[str] | None = None, **options: Any
    ) -> AmqpAdmin:
        """Connect (``Unreachable`` if no broker answers)."""
        settings, urls = parse_options(url, {"connect_timeout": timeout, **options})
        extra: dict[str, Any] = {}
        if settings.tls is not None:
            extra["ssl_context"] = settings.tls.ssl_context()

        async def connect(name: str) -> AbstractConnection:
            with map_exceptions(f"connect to {settings.address}", address=settings.address):
                connection: AbstractConnection = await aio_pika.connect(
                    urls[0], timeout=timeout, client_properties={"connection_name": name}, **extra
                )
            return connection

        try:
            connection = await connect("pigeon admin")
        except AuthenticationError:
            raise  # something answered, and refused us
        except TransportError as exc:
            raise Unreachable(settings.address, str(exc)) from exc
        return cls(settings.address, connection, list(queues or ()), timeout, connect)

    def _channel(
        self, *, confirms: bool = False
    ) -> contextlib.AbstractAsyncContextManager[AbstractChannel]:
        """A channel of its own: a refused passive declare closes it."""
        return plain_channel(self._connection, self.url, confirms=confirms)

    async def _counts(self, names: list[str]) -> dict[str, tuple[int, int] | None]:
        """(ready, consumers) of each queue in ``names``, None where there is
        none. The inventory names every queue ever recorded, most of them
        perhaps deleted since: the declares run ``COUNT_CHANNELS`` at a time,
        each on a channel kept while the broker answers and opened anew
        only after a refusal (a missing queue closes its channel)."""
        pending = list(reversed(names))
        counts: dict[str, tuple[int, int] | None] = {}

        async def declare_in_turn() -> None:
            while pending:
                async with self._channel() as channel:
                    while pending and not channel.is_closed:
                        name = pending.pop()
                        counts[name] = await self._declared(channel, name)

        workers = [
            asyncio.ensure_future(declare_in_turn()) for _ in range(min(COUNT_CHANNELS, len(names)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:  # (one failed: the rest stop too)
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return counts

    async def _declared(self, channel: AbstractChannel, queue: str) -> tuple[int, int] | None:
        try:
            with map_exceptions(f"look for queue {queue!r}", address=self.url):
                declared = await channel.declare_queue(queue, passive=True)
        except DeliveryError:  # no such queue (and the broker closed the channel)
            return None
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def inventory(self) -> list[str]:
        """The queue names in the inventory (see the module docstring)."""
        async with self._channel() as channel:
            try:
                with map_exceptions(f"read {inventory.QUEUE}", address=self.url):
                    declared = await channel.declare_queue(inventory.QUEUE, passive=True)
            except DeliveryError:  # nothing recorded yet
                return []
        # The entries the stream holds as the broker last counted them: it
        # counts a stream every few seconds, so this is a lower bound.
        expected = int(declared.declaration_result.message_count or 0)
        if expected:
            return await self._read_inventory(self._connection, expected)
        # Counted empty: perhaps declared an instant ago, and a consume that
        # comes before the stream's writer runs crashes the broker's channel
        # and with it the whole connection. So it is read on a connection of
        # its own, tried again for up to FRESH_INVENTORY_WAIT.
        window = TryWindow(FRESH_INVENTORY_WAIT, FRESH_INVENTORY_PAUSE)
        while True:
            try:
                side = await self._connect("pigeon admin inventory")
                try:
                    return await self._read_inventory(side, 0)
                finally:
                    with contextlib.suppress(Exception):  # noqa: BLE001  (the broker may have closed it)
                        await side.close()
            except TransportError:
                if not window.again(time.monotonic()):
                    raise
                self.inventory_retries += 1
                await asyncio.sleep(window.pause)

    async def _read_inventory(self, connection: AbstractConnection, expected: int) -> list[str]:
        """Read the inventory stream on ``connection`` from its first entry.

        Until an entry ``expected`` offsets on has come, a pause in the
        broker's delivery is no end (stopping at the first quiet moment lost
        the newest names on a loaded machine); after it, a short quiet spell
        is. (A few offsets of a stream carry no entry, so the far end may
        never come: INVENTORY_PAUSE bounds that.)
        """
        names: set[str] = set()
        async with plain_channel(connection, self.url) as channel:
            with map_exceptions(f"read {inventory.QUEUE}", address=self.url):
                await channel.set_qos(prefetch_count=1000)
                queue = await channel.declare_queue(inventory.QUEUE, passive=True)
            entries: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue()

            async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                offset = (message.headers or {}).get("x-stream-offset")
                entries.put_nowait((message.body, offset if isinstance(offset, int) else -1))
                await message.ack()

            with map_exceptions(f"read {inventory.QUEUE}", address=self.url):
                tag = await queue.consume(take, arguments={"x-stream-offset": "first"})
            deadline = time.monotonic() + self._timeout
            first = last = -1
            while len(names) < MAX_INVENTORY:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                at_end = expected == 0 or (first >= 0 and last >= first + expected - 1)
                try:
                    wait = min(left, INVENTORY_IDLE if at_end else INVENTORY_PAUSE)
                    body, last = await asyncio.wait_for(entries.get(), wait)
                except TimeoutError:
                    break  # caught up
                if first < 0:
                    first = last
                name = body.decode("utf-8", "replace")
                try:
                    names.add(check_name(name, "queue"))
                except ValueError:
                    self.inventory_skipped += 1
            with contextlib.suppress(PigeonError):
                with map_exceptions(f"stop reading {inventory.QUEUE}", address=self.url):
                    await queue.cancel(tag)
        return sorted(names)

    async def info(self) -> dict[str, Any]:
        properties = getattr(self._connection.transport, "connection", None)
        server = getattr(properties, "server_properties", None) or {}
        version = server.get("version")
        product = server.get("product")
        return {
            "transport": "amqp",
            "address": self.url,
            "node": server.get("cluster_name"),
            "version": f"{product} {version}" if product and version else version,
            "services": [],
            "peers": await self.peers(),
            "inventory_skipped": self.inventory_skipped,
            "inventory_retries": self.inventory_retries,
        }

    async def overview(self) -> dict[str, Any]:
        queues = await self.queues()  # first: it reads the inventory info() counts
        return {**(await self.info()), "queues": queues}

    async def queues(self) -> dict[str, QueueRow]:
        names = set(await self.inventory()) | set(self._names)
        names |= {dead_letter_queue(n) for n in names if not n.endswith(DEAD_SUFFIX)}
        return declared_rows(await self._counts(sorted(names)))

    async def services(self) -> dict[str, ServiceRow]:
        return {}

    async def peers(self) -> list[dict[str, Any]]:
        return [
            {
                "address": self.url,
                "node": None,
                "up": not self._connection.is_closed,
                "services": [],
            }
        ]

    async def dead(self, queue: str, limit: int = 20) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        async with self._channel() as channel:
            try:
                with map_exceptions(f"look at {dead_letter_queue(queue)!r}", address=self.url):
                    letters = await channel.declare_queue(dead_letter_queue(queue), passive=True)
                    for _ in range(min(limit, MAX_LETTERS)):
                        incoming = await letters.get(no_ack=False, fail=False)
                        if incoming is None:
                            break
                        rows.append(dead_letter_row(envelope.from_amqp(incoming)))
            except DeliveryError:  # no such queue
                return []
            # Closing the channel gives every letter taken back to the broker.
        return rows

    async def replay(self, queue: str, limit: int | None = None) -> int:
        moved = 0
        async with self._channel(confirms=True) as channel:
            try:
                with map_exceptions(f"look at {dead_letter_queue(queue)!r}", address=self.url):
                    letters = await channel.declare_queue(dead_letter_queue(queue), passive=True)
            except DeliveryError:
                return 0
            # Only the letters there now: one that dies again while this runs
            # (a worker still failing on it) waits for the next replay.
            there = int(letters.declaration_result.message_count or 0)
            while moved < min(limit or MAX_LETTERS, there):
                with map_exceptions(f"replay into {queue!r}", address=self.url):
                    incoming = await letters.get(no_ack=False, fail=False)
                    if incoming is None:
                        break
                    message = envelope.from_amqp(incoming)
                    message.headers = policy.without_dead_letter_headers(message.headers)
                    # Confirmed into the queue before the letter is acked away.
                    await channel.default_exchange.publish(
                        envelope.to_amqp(message, redelivered=True), routing_key=queue
                    )
                    await incoming.ack()
                moved += 1
        return moved

    async def purge(self, queue: str, *, dead: bool = False) -> int:
        name = dead_letter_queue(queue) if dead else queue
        async with self._channel() as channel:
            try:
                with map_exceptions(f"purge {name!r}", address=self.url):
                    declared = await channel.declare_queue(name, passive=True)
                    purged = await declared.purge()
            except DeliveryError:
                return 0
        return int(purged.message_count or 0)

    async def ping(self) -> float:
        started = time.perf_counter()
        async with self._channel():
            pass  # channel.open and its ok: one round trip (and a close)
        return time.perf_counter() - started

    async def close(self) -> None:
        if not self._connection.is_closed:
            with contextlib.suppress(PigeonError):
                with map_exceptions("close", address=self.url):
                    await self._connection.close()
