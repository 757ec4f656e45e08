"""How fast one worker drains a queue with a plain (def) handler, against an
async one, on the same node: the thread hand-off's cost per delivery.

    python benchmarks/plain_handler.py [--count N]

A binding node is filled with N messages of 16 B, then one worker connects
over tcp loopback and acks them all; the rate is N over the drain time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import pigeon


async def drain(count: int, handler: Callable[[pigeon.Delivery], Any]) -> float:
    """Messages per second one worker with ``handler`` drained."""
    async with pigeon.connect(bind="tcp://127.0.0.1:0", max_memory=None) as node:
        await node.send_many("q", [b"x" * 16] * count)
        done = asyncio.Event()

        def watch() -> None:
            if node.stats()["queues"]["q"]["acked"] >= count:
                done.set()
            else:
                asyncio.get_running_loop().call_later(0.01, watch)

        async with pigeon.connect(node.stats()["bound"][0]) as worker:
            start = time.perf_counter()
            await worker.consume("q", handler)
            watch()
            await done.wait()
            return count / (time.perf_counter() - start)


def plain(delivery: pigeon.Delivery) -> None:
    """A plain handler that does nothing: what is left is pigeon's cost."""


async def awaited(delivery: pigeon.Delivery) -> None:
    """The same, as a coroutine."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    count = parser.parse_args().count
    for name, handler in (("plain def", plain), ("async def", awaited)):
        rate = asyncio.run(drain(count, handler))
        print(f"{name} handler: {rate:,.0f} msgs/s ({count:,} messages)")


if __name__ == "__main__":
    main()
