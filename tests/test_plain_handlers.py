"""Plain (non-async) handlers: run off the event loop, a batch of deliveries
per thread hand-off, and each delivery settled on its own."""

from __future__ import annotations

import asyncio
import threading

import pytest

import pigeon

WAIT = 30.0


@pytest.mark.parametrize("url", ["memory://plain", "bind"])
def test_a_plain_handler_settles_each_delivery_on_its_own(url: str) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        threads: set[int] = set()
        first_tries: list[int] = []
        handled: set[int] = set()
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def handle(delivery: pigeon.Delivery) -> None:
            threads.add(threading.get_ident())
            n = int(delivery.message.text)
            if delivery.message.attempt == 1:
                first_tries.append(n)
                if n % 7 == 0:
                    raise RuntimeError(f"{n} fails once")
            handled.add(n)
            if len(handled) == 500:
                loop.call_soon_threadsafe(done.set)

        options = {"bind": "tcp://127.0.0.1:0"} if url == "bind" else {}
        async with pigeon.connect(None if url == "bind" else url, **options) as conn:
            retry = pigeon.RetryPolicy(max_attempts=3, base_delay=0.01, jitter=0.0)
            worker = await conn.consume("jobs", handle, retry=retry)
            await conn.send_many("jobs", [str(n) for n in range(500)])
            await asyncio.wait_for(done.wait(), WAIT)
        # Read once closed: closing lets the last batch's settles finish.
        stats = worker.stats()
        assert loop_thread not in threads  # never on the event loop
        assert first_tries == list(range(500))  # one runner: in order
        assert handled == set(range(500))
        assert stats["handler_errors"] == stats["retried"] == len(range(0, 500, 7))
        assert stats["acked"] == 500 and stats["dead_lettered"] == 0

    asyncio.run(main())


def test_a_plain_handler_that_returns_a_coroutine_is_awaited() -> None:
    async def main() -> None:
        seen: list[str] = []
        done = asyncio.Event()

        async def later(text: str) -> None:
            seen.append(text)
            if len(seen) == 3:
                done.set()

        async with pigeon.connect("memory://coro") as conn:
            await conn.consume("jobs", lambda d: later(d.message.text))
            await conn.send_many("jobs", ["a", "b", "c"])
            await asyncio.wait_for(done.wait(), WAIT)
        assert seen == ["a", "b", "c"]

    asyncio.run(main())
