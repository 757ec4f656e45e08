"""Child processes for the fault tests: a worker that reports and never
settles, a named subscriber, a server that records each execution, and a
producer with a durable outbox. Run as
``python tests/faultproc.py ROLE URL [options]``; events go to stdout as
JSON lines, errors to stderr.

A server binds URL (``tcp://127.0.0.1:0`` for any free port) and reports the
address it got in its ``ready`` event.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pigeon

# Seconds between heartbeats, here and in the tests that talk to these
# processes: a peer is declared dead after three missed ones, and a busy
# machine can starve a process for a good part of a second.
HEARTBEAT = 0.5


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def hanging_worker(url: str, queue: str) -> None:
    """Takes deliveries and never settles them: to be killed mid-message."""
    async with pigeon.connect(url, heartbeat=HEARTBEAT) as conn:

        async def hang(delivery: pigeon.Delivery) -> None:
            emit(ev="got", id=delivery.message.id, redelivered=delivery.message.redelivered)
            await asyncio.Event().wait()

        await conn.consume(queue, hang, prefetch=1)
        emit(ev="ready")
        await asyncio.Event().wait()


async def subscriber(url: str, pattern: str, name: str, mode: str) -> None:
    """A named subscriber that reports each event; ``hang`` never settles
    (to be killed mid-event), ``ack`` acks each."""
    async with pigeon.connect(url, heartbeat=HEARTBEAT) as conn:

        async def handle(event: pigeon.Event) -> None:
            emit(
                ev="got", seq=event.seq, missed=event.missed, redelivered=event.message.redelivered
            )
            if mode == "hang":
                await asyncio.Event().wait()

        await conn.subscribe(pattern, handle, name=name, prefetch=1)
        emit(ev="ready")
        await asyncio.Event().wait()


async def server(url: str, name: str, mode: str) -> None:
    """Serves ``svc``: mode ``hang`` never answers, ``echo`` answers at once,
    ``echo-on-cue`` answers at once but only starts serving once a line comes
    on stdin (it then also serves ``probe``, after ``svc``, so a caller that
    reaches ``probe`` knows this server offers ``svc``)."""
    async with pigeon.connect(bind=url, heartbeat=HEARTBEAT) as conn:

        async def handle(message: pigeon.Message) -> str:
            # late: started after its caller's deadline (which must never happen)
            late = message.deadline is None or time.time() > message.deadline
            emit(ev="execute", id=message.id, server=name, late=late)
            if mode == "hang":
                await asyncio.Event().wait()
            return f"{name}:{message.text}"

        if mode != "echo-on-cue":
            await conn.serve("svc", handle)
        emit(ev="ready", url=conn.stats()["bound"][0])
        if mode == "echo-on-cue":
            await asyncio.to_thread(sys.stdin.readline)
            await conn.serve("svc", handle)
            await conn.serve("probe", lambda m: "here")
            emit(ev="serving")
        await asyncio.Event().wait()


async def outbox_producer(url: str, outbox: str, count: str) -> None:
    """Sends ``count`` messages through a durable outbox, reporting each one
    once it is accepted (on disk here), then stays up to deliver them."""
    async with pigeon.connect(url, outbox=outbox, heartbeat=HEARTBEAT) as conn:
        emit(ev="ready", restored=conn.stats()["outbox"]["restored"])
        for i in range(int(count)):
            await conn.send("jobs", f"m{i}", message_id=f"outbox-{i}")
            emit(ev="accepted", id=f"outbox-{i}")
        await asyncio.Event().wait()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    roles = {
        "hanging_worker": hanging_worker,
        "subscriber": subscriber,
        "server": server,
        "outbox_producer": outbox_producer,
    }
    coro = roles[role](*args)
    asyncio.run(coro)
