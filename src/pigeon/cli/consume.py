"""``pigeon consume URL QUEUE``: take messages off a queue from a shell,
print each (its body, or with ``--json`` one object per line) and ack it
once printed.

``--count N`` ends it after N messages; otherwise Ctrl-C (or SIGTERM) does,
with the count on stderr. A message leased beyond the count is handed back
at once (a nack without delay), so it is not kept from other workers.
"""

from __future__ import annotations

import asyncio
import json
import sys

import click

import pigeon

from . import bodies
from .events import until_signal
from .options import json_option, key_options, timeout_option
from .reach import open_connection

# Deliveries leased ahead at most: a few round trips saved, and at most
# this many handed back when the count is reached.
_PREFETCH = 64


async def _wait(event: asyncio.Event) -> None:
    await event.wait()


def _line(delivery: pigeon.Delivery, *, as_json: bool) -> str:
    message = delivery.message
    if as_json:
        return json.dumps(
            {
                "queue": delivery.queue,
                "id": message.id,
                "attempt": message.attempt,
                "redelivered": message.redelivered,
            }
            | bodies.as_json(message)
        )
    return bodies.as_text(message.body)


@click.command(name="consume", short_help="Take messages off QUEUE at URL, print and ack each.")
@click.argument("url")
@click.argument("queue")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="stop after this many messages (default: until Ctrl-C)",
)
@timeout_option(5.0)
@key_options
@json_option
def consume(
    url: str,
    queue: str,
    count: int | None,
    timeout: float,
    key: str | None,
    server_key: str | None,
    as_json: bool,
) -> None:
    """Take messages off QUEUE at URL, print each (its body; --json: queue,
    id, attempt, redelivered, headers, body as text or base64) and ack it."""

    async def main() -> int:
        taken = 0
        enough = asyncio.Event()
        closed = False

        async def handle(delivery: pigeon.Delivery) -> None:
            nonlocal taken, closed
            if enough.is_set():
                # Leased before the count was reached: back to the queue now.
                await delivery.nack(reason="pigeon consume had its count")
                return
            try:
                sys.stdout.write(_line(delivery, as_json=as_json) + "\n")
                sys.stdout.flush()
            except BrokenPipeError:
                closed = True
                enough.set()
                await delivery.nack(reason="pigeon consume: its output was closed")
                return
            taken += 1  # returning acks it
            if count is not None and taken >= count:
                enough.set()

        async with open_connection(url, timeout=timeout, key=key, server_key=server_key) as conn:
            prefetch = min(count or _PREFETCH, _PREFETCH)
            await conn.consume(queue, handle, prefetch=prefetch)
            await until_signal(_wait(enough))
        if closed:
            raise BrokenPipeError  # the reader went away: end quietly
        return taken

    taken = asyncio.run(main())
    click.echo(f"pigeon consume: {taken} message(s)", err=True)
