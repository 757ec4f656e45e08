"""The inventory: the names of the work queues pigeon declared on a broker,
kept on the broker itself, for ``pigeon queues`` (AMQP has no method that
lists queues, and the management HTTP API is not assumed).

Rule 1: each transport adds a queue's name the first time it declares the
queue on its connection (so a name comes again after every reconnect or
restart, and a long-lived queue is not forgotten for good).
Rule 2: the inventory is a stream queue bounded in bytes: the broker drops
its oldest segments past ``MAX_BYTES``, so it never grows without bound; a
reader takes the union of the names it holds.
Rule 3: recording is best effort and never holds a send back; a failure is
counted (``inventory_errors`` in the transport's counts), not raised.
Rule 4: recording runs on a connection of its own, opened for a batch of
names and closed after it: a broker refuses a stream declaration it cannot
serve yet (a node just started) with a connection-level error, which must
not close the connection the app's messages travel on.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection

from ...errors import PigeonError
from .errors import map_exceptions

QUEUE = "pigeon.inventory"
MAX_BYTES = 1_000_000
SEGMENT_BYTES = 100_000  # retention drops whole segments: keep them small
ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-length-bytes": MAX_BYTES,
    "x-stream-max-segment-size-bytes": SEGMENT_BYTES,
}


async def record(connection: AbstractConnection, queues: list[str], address: str) -> bool:
    """Add ``queues`` to the inventory (Rule 1) on ``connection``, a
    connection of its own (Rule 4); False if that failed (Rule 3)."""
    channel = aio_pika.Channel(connection, publisher_confirms=False)
    try:
        with map_exceptions(f"record queues {queues!r} in {QUEUE}", address=address):
            await channel.initialize()
            await channel.declare_queue(QUEUE, durable=True, arguments=ARGUMENTS)
            for queue in queues:
                await channel.default_exchange.publish(
                    aio_pika.Message(queue.encode(), content_type="text/plain"),
                    routing_key=QUEUE,
                )
    except PigeonError:
        return False
    finally:
        if not channel.is_closed:
            try:
                await channel.close()
            except Exception:  # noqa: BLE001  (closing a channel the broker closed)
                pass
    return True
