"""send() waits for room: for its own outbox on the confirmations of the sends
it holds, for a full host by offering again after a short backoff; it never
spins on the event loop and gives up with Timeout at its deadline."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

import pigeon
from pigeon.message import new_id
from pigeon.testing.conformance import wait_until


def _free_tcp_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def test_send_to_a_full_outbox_resumes_when_the_host_comes_up() -> None:
    address = _free_tcp_address()

    async def scenario() -> None:
        async with pigeon.connect(address, outbox_limit=2, heartbeat=0.2) as producer:
            producer.send_nowait("q", "a")
            producer.send_nowait("q", "b")
            with pytest.raises(pigeon.Backpressure):
                producer.send_nowait("q", "over")
            sending = asyncio.ensure_future(producer.send("q", "c", timeout=20))
            await asyncio.sleep(0.3)
            assert not sending.done()  # waiting for room, not failed
            got: list[str] = []
            async with pigeon.connect(bind=address, heartbeat=0.2) as host:
                await host.consume("q", lambda d: got.append(d.message.text))
                await asyncio.wait_for(sending, 15)
                await wait_until(lambda: sorted(got) == ["a", "b", "c"], 10, "all three")

    asyncio.run(scenario())


def test_send_to_a_full_memory_queue_backs_off_then_gets_in() -> None:
    url = f"memory://room-{new_id()}"

    async def scenario() -> None:
        async with pigeon.connect(url, max_length=1) as conn:
            await conn.send("q", "first")
            offers = 0
            send_nowait = conn.transport.send_nowait

            def counting(*args: Any, **kwargs: Any) -> asyncio.Future[None]:
                nonlocal offers
                offers += 1
                return send_nowait(*args, **kwargs)

            conn.transport.send_nowait = counting  # type: ignore[method-assign]
            started = time.monotonic()
            with pytest.raises(pigeon.Timeout, match="no room"):
                await conn.send("q", "second", timeout=0.5)
            elapsed = time.monotonic() - started
            assert 0.4 <= elapsed < 3.0
            # Offered again after a backoff that doubles up to 0.1 s: about ten
            # offers in 0.5 s (a 10 ms poll made fifty, a spin thousands).
            assert 3 <= offers <= 20, offers
            conn.transport.send_nowait = send_nowait  # type: ignore[method-assign]

            got: list[str] = []
            sending = asyncio.ensure_future(conn.send("q", "third", timeout=10))
            await asyncio.sleep(0.2)
            assert not sending.done()
            await conn.consume("q", lambda d: got.append(d.message.text))
            await asyncio.wait_for(sending, 5)
            await wait_until(lambda: got == ["first", "third"], 5, "both messages")

    asyncio.run(scenario())
