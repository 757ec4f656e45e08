"""RouterTopics Rule 5: a peer's publishes are taken in a slice at a time,
the loop running between slices; answered per slice, in the order they
came, a Subscribe after what came before it."""

from __future__ import annotations

import asyncio

import pytest

from pigeon._core import frames, headers
from pigeon._core.topics import SlowPolicy, StartAt
from pigeon.message import Message
from pigeon.transports.host import QueueHost
from pigeon.transports.topic_host import TopicHost
from pigeon.transports.zmq import topic_side
from pigeon.transports.zmq.topic_side import SLICE, RouterTopics

pytestmark = pytest.mark.timeout(60)

QUEUE = "pigeon.publish.t.a"


def batch(prefix: str, n: int) -> list[Message]:
    return [Message(id=f"{prefix}{i}", body=b"x") for i in range(n)]


class World:
    def __init__(self, buffer: int = 100_000) -> None:
        self.host = QueueHost()
        self.topics = TopicHost(self.host, "source")
        self.sent: list[tuple[bytes, frames.Frame]] = []
        self.router = RouterTopics(self.topics, lambda who, f: self.sent.append((who, f)), None)
        self.queue = self.topics.subscribe(
            "t.>", name="s", policy=SlowPolicy.DROP_OLDEST, buffer=buffer, start=StartAt()
        )

    def confirmed(self, who: bytes = b"p") -> list[str]:
        return [
            i for w, f in self.sent if w == who and isinstance(f, frames.Confirm) for i in f.ids
        ]

    def waiting_ids(self) -> list[str]:
        ledger = self.host.queues[self.queue]
        return [m.id for m in ledger.peek_ready(ledger.ready_count)]


async def turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_big_frame_is_taken_a_slice_at_a_time() -> None:
    async def main() -> None:
        world = World()
        sent = batch("a", 2 * SLICE + 500)
        world.router.publish(b"p", "", QUEUE, sent)
        assert world.confirmed() == [m.id for m in sent[:SLICE]]  # the first at once
        await asyncio.sleep(0)
        assert world.confirmed() == [m.id for m in sent[: 2 * SLICE]]
        await turns()
        assert world.confirmed() == [m.id for m in sent]  # each once, in order
        assert world.waiting_ids() == [m.id for m in sent]
        assert world.topics.counts["published"] == len(sent)

    asyncio.run(main())


def test_dispatch_runs_between_slices() -> None:
    async def main() -> None:
        world = World()
        at: list[int] = []  # publishes confirmed when a delivery went out
        world.host.subscribe(
            world.queue, "c", lambda q, ms: at.append(len(world.confirmed())), prefetch=10
        )
        world.router.publish(b"p", "", QUEUE, batch("a", 3 * SLICE))
        await turns()
        assert len(world.confirmed()) == 3 * SLICE
        assert at and at[0] < 3 * SLICE  # delivered before the frame was all in

    asyncio.run(main())


def test_a_later_frame_of_a_peer_never_overtakes_an_earlier_one() -> None:
    async def main() -> None:
        world = World()
        first, second, third = batch("a", SLICE + 10), batch("b", 5), batch("c", 5)
        world.router.publish(b"p", "", QUEUE, first)
        world.router.publish(b"p", "", QUEUE, second)  # small, but behind the rest of first
        world.router.publish(b"q", "", QUEUE, third)  # another peer: at once
        assert world.confirmed(b"q") == [m.id for m in third]
        await turns()
        assert world.confirmed() == [m.id for m in first + second]
        order = world.waiting_ids()
        assert order.index(f"a{SLICE + 9}") < order.index("b0")
        ledger = world.host.queues[world.queue]
        seqs = [int(m.headers[headers.SEQ]) for m in ledger.peek_ready(ledger.ready_count)]
        assert seqs == sorted(seqs)

    asyncio.run(main())


def test_a_subscribe_comes_after_what_the_peer_published_before() -> None:
    async def main() -> None:
        world = World()
        world.router.publish(b"p", "", QUEUE, batch("a", 3 * SLICE))
        subscribe = frames.Subscribe("pigeon.sub.late", "t.>", "drop-oldest", 100_000)
        world.router.subscribe(b"p", "", subscribe)
        assert len(world.confirmed()) == 3 * SLICE
        await turns()
        assert world.host.queues["pigeon.sub.late"].ready_count == 0

    asyncio.run(main())


def test_past_the_waiting_bound_a_peer_is_taken_in_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(topic_side, "PEER_WAITING", 3 * SLICE)

    async def main() -> None:
        world = World()
        world.router.publish(b"p", "", QUEUE, batch("a", 3 * SLICE))
        assert len(world.confirmed()) == SLICE
        world.router.publish(b"p", "", QUEUE, batch("b", 2 * SLICE))
        assert len(world.confirmed()) == 5 * SLICE
        await turns()
        assert len(world.confirmed()) == 5 * SLICE

    asyncio.run(main())


def test_drops_are_counted_and_told_across_slices() -> None:
    async def main() -> None:
        world = World(buffer=100)
        world.router.publish(b"p", "", QUEUE, batch("a", 2 * SLICE + 1))
        await turns()
        ledger = world.host.queues[world.queue]
        ready = ledger.peek_ready(ledger.ready_count)
        assert len(ready) == 100
        assert ready[0].headers[headers.MISSED] == str(2 * SLICE + 1 - 100)
        assert world.topics.counts["dropped"] == 2 * SLICE + 1 - 100

    asyncio.run(main())


def test_closing_takes_in_nothing_more() -> None:
    async def main() -> None:
        world = World()
        world.router.publish(b"p", "", QUEUE, batch("a", 3 * SLICE))
        world.router.close()
        await turns()
        assert len(world.confirmed()) == SLICE

    asyncio.run(main())


def test_past_the_waiting_bytes_a_peer_is_taken_in_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(topic_side, "ALL_WAITING_BYTES", 4 * SLICE)

    async def main() -> None:
        world = World()
        world.router.publish(b"p", "", QUEUE, batch("a", 3 * SLICE))  # 1 B bodies
        world.router.publish(b"q", "", QUEUE, batch("b", 2 * SLICE))
        assert len(world.confirmed(b"p")) == SLICE
        assert len(world.confirmed(b"q")) == 2 * SLICE
        await turns()
        assert len(world.confirmed(b"p")) == 3 * SLICE

    asyncio.run(main())
