"""Traffic for the dashboard's tests, against the node at ``argv[1]``:

- ``orders``: 7 messages ready, nobody consuming;
- ``emails``: 4 messages held in flight by a consumer that never settles;
- ``invoices`` and ``refunds``: 3 and 2 dead letters (their worker rejected
  each message, then stopped);
- ``echo``: a service served from here behind the node, called 5 times
  and failed once.

Prints ``ready`` when all of it holds still. A ``flow`` line on stdin
starts a varying stream through ``events`` (for a screenshot with moving
sparklines); end of stdin closes everything.
"""

from __future__ import annotations

import asyncio
import math
import sys
from typing import Any

import pigeon

SERVED = 5


async def until(check: Any, what: str, timeout: float = 60.0) -> None:
    """Wait for the node to show ``what`` (it is asked, not told)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the node never showed {what} within {timeout} s")
        await asyncio.sleep(0.05)


async def main(url: str) -> None:
    hold = asyncio.Event()  # never set: emails stay in flight
    async with (
        pigeon.connect(url, connect_grace=30) as producer,
        pigeon.connect(url, connect_grace=30) as server,
        pigeon.connect(url, connect_grace=30) as consumer,
        pigeon.connect(url, connect_grace=30) as client,
    ):
        for i in range(7):
            await producer.send("orders", {"order": i})
        for i in range(4):
            await producer.send("emails", {"to": f"user{i}@example.com"})
        for queue, count in (("invoices", 3), ("refunds", 2)):
            for i in range(count):
                await producer.send(queue, {"n": i})

        async def keep(delivery: Any) -> None:
            await hold.wait()

        async def refuse(delivery: Any) -> None:
            await delivery.reject(reason="the test refuses it")

        async def echo(message: pigeon.Message) -> Any:
            body = message.decode()
            if body == "fail":
                raise ValueError("asked to fail")
            return body

        await consumer.consume("emails", keep, lease_ttl=3600)
        refusers = [await consumer.consume(q, refuse) for q in ("invoices", "refunds")]
        await server.serve("echo", echo)

        async def info() -> dict[str, Any]:
            reply = await client.request("pigeon.info", {}, timeout=10)
            answer: dict[str, Any] = reply.decode()
            return answer

        async def settled() -> bool:
            queues = (await info())["queues"]
            dead = {q: queues.get(f"{q}.dead", {}).get("ready", 0) for q in ("invoices", "refunds")}
            emails = queues.get("emails", {}).get("in_flight", 0)
            return dead == {"invoices": 3, "refunds": 2} and emails == 4

        await until(settled, "the dead letters and the held emails")
        for worker in refusers:
            await worker.close()

        async def served() -> bool:
            return "echo" in (await info()).get("relay", {}).get("services", [])

        await until(served, "echo served behind the node")
        for i in range(SERVED):
            await client.request("echo", f"call {i}", timeout=30)
        try:
            await client.request("echo", "fail", timeout=30)
        except pigeon.Rejected:
            pass
        else:
            raise AssertionError("echo should have failed")
        print("ready", flush=True)

        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        flowing: asyncio.Task[None] | None = None
        while line := await reader.readline():
            if line.strip() == b"flow" and flowing is None:
                flowing = asyncio.create_task(flow(producer, consumer))
        if flowing is not None:
            flowing.cancel()


async def flow(producer: pigeon.Connection, consumer: pigeon.Connection) -> None:
    """Sends to ``events`` at a rate that rises and falls, and a slower
    worker that acks them, so the sparklines have something to draw."""

    async def slow(delivery: Any) -> None:
        await asyncio.sleep(0.03)

    await consumer.consume("events", slow)
    tick = 0
    while True:
        tick += 1
        for _ in range(int(20 + 18 * math.sin(tick / 4))):
            await producer.send("events", {"tick": tick})
        await asyncio.sleep(0.25)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
