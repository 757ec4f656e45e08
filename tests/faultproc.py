"""Child processes for the fault tests: a worker that reports and never
settles, and a server that records each execution. Run as
``python tests/faultproc.py ROLE URL [options]``; events go to stdout as
JSON lines."""

from __future__ import annotations

import asyncio
import json
import sys

import pigeon


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def hanging_worker(url: str, queue: str) -> None:
    """Takes deliveries and never settles them: to be killed mid-message."""
    async with pigeon.connect(url, heartbeat=0.2) as conn:

        async def hang(delivery: pigeon.Delivery) -> None:
            emit(ev="got", id=delivery.message.id, redelivered=delivery.message.redelivered)
            await asyncio.Event().wait()

        await conn.consume(queue, hang, prefetch=1)
        emit(ev="ready")
        await asyncio.Event().wait()


async def server(url: str, name: str, mode: str) -> None:
    """Serves ``svc``; ``mode`` hang never answers, echo answers at once."""
    async with pigeon.connect(bind=url, heartbeat=0.2) as conn:

        async def handle(message: pigeon.Message) -> str:
            emit(ev="execute", id=message.id, server=name)
            if mode == "hang":
                await asyncio.Event().wait()
            return f"{name}:{message.text}"

        await conn.serve("svc", handle)
        emit(ev="ready")
        await asyncio.Event().wait()


async def outbox_producer(url: str, outbox: str, count: str) -> None:
    """Sends ``count`` messages through a durable outbox, reporting each one
    once it is accepted (on disk here), then stays up to deliver them."""
    async with pigeon.connect(url, outbox=outbox, heartbeat=0.2) as conn:
        emit(ev="ready", restored=conn.stats()["outbox"]["restored"])
        for i in range(int(count)):
            await conn.send("jobs", f"m{i}", message_id=f"outbox-{i}")
            emit(ev="accepted", id=f"outbox-{i}")
        await asyncio.Event().wait()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    roles = {"hanging_worker": hanging_worker, "server": server, "outbox_producer": outbox_producer}
    coro = roles[role](*args)
    asyncio.run(coro)
