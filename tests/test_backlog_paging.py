"""A durable host keeps a window of each queue in memory and the rest on disk.

Real SQLite stores, a real event loop and the host's own dispatch: messages
past the window are read back in order, exactly once, across restarts, while
producers and consumers run at once.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from pigeon._core.paging import Window
from pigeon.errors import StoreError
from pigeon.message import Message, make_message
from pigeon.store import Page, SqliteStore
from pigeon.transports import host as host_module
from pigeon.transports.host import QueueHost

WINDOW = Window(16, 1 << 20)


class Consumer:
    """Takes deliveries, acks (or now and then nacks) them, remembers what came."""

    def __init__(self, host: QueueHost, queue: str, *, nack_rate: float = 0.0) -> None:
        self.host = host
        self.queue = queue
        self.nack_rate = nack_rate
        self.rng = random.Random(7)
        self.deliveries: list[Message] = []
        self.acked: list[str] = []
        self.changed = asyncio.Event()

    def sink(self, queue: str, messages: list[Message]) -> None:
        self.deliveries += messages
        # Settle on a later loop turn, as a remote worker would.
        asyncio.get_running_loop().call_soon(self.settle, [m.id for m in messages])

    def settle(self, ids: list[str]) -> None:
        nacks = [i for i in ids if self.rng.random() < self.nack_rate]
        acks = [i for i in ids if i not in nacks]
        self.host.settle(self.queue, self, acks=acks, nacks=[(i, 0.0, "") for i in nacks])
        self.acked += acks
        self.changed.set()

    async def until_acked(self, count: int, timeout: float = 30.0) -> None:
        async def wait() -> None:
            while len(self.acked) < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


def window_in_memory(host: QueueHost, queue: str) -> int:
    return len(host.queues[queue].peek_ready(1 << 30))


def test_a_backlog_past_the_window_stays_on_disk_and_drains_in_order_once(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        host = QueueHost(store=SqliteStore(tmp_path / "q.db"), page_window=WINDOW)
        # Ten producers at once, each in batches of its own.
        streams = [[make_message(b"x") for _ in range(60)] for _ in range(10)]

        async def produce(stream: list[Message]) -> None:
            for start in range(0, len(stream), 7):
                assert all(await host.put_many("q", stream[start : start + 7]))

        await asyncio.gather(*(produce(s) for s in streams))
        assert window_in_memory(host, "q") <= WINDOW.messages
        depth = host.stats()["q"]
        assert depth["ready"] == 600 and depth["on_disk"] >= 600 - WINDOW.messages
        consumer = Consumer(host, "q")
        host.subscribe("q", consumer, consumer.sink, prefetch=5)
        await consumer.until_acked(600)
        ids = [m.id for m in consumer.deliveries]
        assert len(ids) == len(set(ids)) == 600  # every one, exactly once
        for stream in streams:  # each producer's order is kept
            mine = [i for i in ids if i in {m.id for m in stream}]
            assert mine == [m.id for m in stream]
        assert host.stats()["q"]["ready"] == 0 and host.backlog_errors == 0
        await host.aclose()

    asyncio.run(main())


def test_producers_and_consumers_at_once_with_nacks_lose_and_double_nothing(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        host = QueueHost(store=SqliteStore(tmp_path / "q.db"), page_window=WINDOW)
        consumers = [Consumer(host, "q", nack_rate=0.1) for _ in range(3)]
        for consumer in consumers:
            host.subscribe("q", consumer, consumer.sink, prefetch=4)
        sent = [make_message(b"y") for _ in range(1500)]
        on_disk = [0]

        async def produce(part: list[Message]) -> None:
            for start in range(0, len(part), 25):
                assert all(await host.put_many("q", part[start : start + 25]))
                on_disk.append(host.stats()["q"]["on_disk"])
                await asyncio.sleep(0)

        await asyncio.gather(*(produce(sent[i::5]) for i in range(5)))

        changed = asyncio.Event()
        for consumer in consumers:
            consumer.changed = changed  # any settle wakes the wait below

        async def all_acked() -> None:
            while sum(len(c.acked) for c in consumers) < len(sent):
                changed.clear()
                await changed.wait()

        await asyncio.wait_for(all_acked(), 60)
        assert max(on_disk) > 0  # the consumers fell behind: the backlog paged
        acked = [i for c in consumers for i in c.acked]
        assert sorted(acked) == sorted(m.id for m in sent)  # each acked once
        first_deliveries = [m.id for c in consumers for m in c.deliveries if not m.redelivered]
        assert len(first_deliveries) == len(set(first_deliveries))
        await host.aclose()
        with SqliteStore(tmp_path / "q.db") as store:
            assert store.counts() == {}  # nothing left behind on disk

    asyncio.run(main())


def test_a_restart_reads_the_backlog_back_a_window_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def fill() -> list[str]:
        host = QueueHost(store=SqliteStore(path), page_window=WINDOW)
        messages = [make_message(b"z") for _ in range(300)]
        assert all(await host.put_many("q", messages))
        await host.aclose()
        return [m.id for m in messages]

    async def drain(expected: list[str]) -> None:
        host = QueueHost(store=SqliteStore(path), page_window=WINDOW)
        assert host.restore() == 300
        assert host.stats()["q"]["on_disk"] == 300
        assert window_in_memory(host, "q") == 0  # nothing read before a consumer asks
        consumer = Consumer(host, "q")
        host.subscribe("q", consumer, consumer.sink, prefetch=8)
        await consumer.until_acked(300)
        assert [m.id for m in consumer.deliveries] == expected
        assert all(m.redelivered for m in consumer.deliveries)  # may have been seen
        # What comes after the restart is new, not redelivered.
        fresh = make_message(b"new")
        assert await host.put_many("q", [fresh]) == [True]
        await consumer.until_acked(301)
        assert consumer.deliveries[-1].id == fresh.id and not consumer.deliveries[-1].redelivered
        await host.aclose()

    expected = asyncio.run(fill())
    asyncio.run(drain(expected))


def test_a_producer_that_gives_up_waiting_still_gets_its_message_queued(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        host = QueueHost(store=SqliteStore(tmp_path / "q.db"), page_window=WINDOW)
        message = make_message(b"late")
        task = asyncio.ensure_future(host.put_many("q", [message]))
        await asyncio.sleep(0)  # queued with the store's writer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        consumer = Consumer(host, "q")
        host.subscribe("q", consumer, consumer.sink, prefetch=1)
        await consumer.until_acked(1)
        assert consumer.acked == [message.id]
        await host.aclose()

    asyncio.run(main())


class FlakyPages(SqliteStore):
    """Fails its first backlog read, as a damaged row or an I/O error would."""

    failures = 1

    def page(self, queue: str, after: int, *, limit: int, max_bytes: int) -> Page:
        if self.failures:
            self.failures -= 1
            raise StoreError("disk I/O error while reading", path=self.path)
        return super().page(queue, after, limit=limit, max_bytes=max_bytes)


def test_a_failed_backlog_read_is_counted_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_module, "BACKLOG_RETRY", 0.05)

    async def main() -> None:
        host = QueueHost(store=FlakyPages(tmp_path / "q.db"), page_window=WINDOW)
        assert all(await host.put_many("q", [make_message(b"a") for _ in range(40)]))
        consumer = Consumer(host, "q")
        host.subscribe("q", consumer, consumer.sink, prefetch=40)
        await consumer.until_acked(40)
        assert host.backlog_errors == 1 and host.store_errors == 1
        await host.aclose()

    asyncio.run(main())


def test_a_store_answer_that_never_comes_fails_the_send_with_store_error(tmp_path: Path) -> None:
    async def main() -> None:
        host = QueueHost(store=SqliteStore(tmp_path / "q.db"), page_window=WINDOW)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[bool]] = loop.create_future()
        answer: asyncio.Future[list[bool]] = loop.create_future()
        done.cancel()  # e.g. the loop closing under a pending commit
        host._committed("q", [make_message(b"x")], done, answer)
        with pytest.raises(StoreError, match="cancelled"):
            await answer
        await host.aclose()

    asyncio.run(main())
