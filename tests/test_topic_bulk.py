"""The topic host's Rule 6: copies put into a ``drop-oldest`` subscription
in one go (``publish_many``) leave exactly what publishing one by one
leaves: the same messages waiting with the same missed headers, the same
counters, the same bytes held."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon._core import headers
from pigeon._core.limits import message_size
from pigeon._core.topics import SlowPolicy, StartAt
from pigeon.message import Message
from pigeon.transports import queue_table
from pigeon.transports.host import QueueHost
from pigeon.transports.topic_host import TopicHost

pytestmark = pytest.mark.timeout(120)

# A step: publish a batch of n (bodies of the given sizes), let a consumer
# take and ack some, or nack what it holds (it comes back to the front).
Step = tuple[str, Any]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.lists(st.integers(0, 40), min_size=0, max_size=30)),
        st.tuples(st.just("take"), st.integers(1, 10)),
        st.just(("nack", 0)),
    ),
    max_size=12,
)


class Taker:
    """A consumer of one queue that holds what it is given."""

    def __init__(self, host: QueueHost, queue: str) -> None:
        self.host, self.queue = host, queue
        self.held: list[Message] = []
        self.key = ("taker", queue)
        host.subscribe(queue, self.key, self.sink, prefetch=1000)

    def sink(self, queue: str, messages: list[Message]) -> None:
        self.held.extend(messages)


def _world(buffers: list[int], max_memory: int | None) -> tuple[TopicHost, list[str]]:
    host = QueueHost(max_memory=max_memory)
    topics = TopicHost(host, "source", clock=lambda: 1000.0)
    queues = [
        topics.subscribe(
            "t.>",
            name=f"s{i}",
            policy=SlowPolicy.DROP_OLDEST,
            buffer=buffer,
            start=StartAt(),
        )
        for i, buffer in enumerate(buffers)
    ]
    return topics, queues


def _state(topics: TopicHost, queues: list[str]) -> list[Any]:
    out: list[Any] = [dict(topics.counts)]
    for queue in queues:
        sub = topics.subscriptions[queue]
        ledger = topics.host.queues[queue]
        ready = ledger.peek_ready(ledger.ready_count)
        out.append(
            (
                sub.dropped,
                sub.refused,
                sub.unmarked,
                [(m.id, m.headers.get(headers.MISSED)) for m in ready],
                ledger.stats.as_dict(),
                ledger.bytes_held,
            )
        )
    return out


async def _run(
    buffers: list[int], plan: list[Step], bulk: bool, max_memory: int | None
) -> list[Any]:
    topics, queues = _world(buffers, max_memory)
    ids = itertools.count()
    takers: dict[str, Taker] = {}
    for kind, arg in plan:
        if kind == "publish":
            batch = [Message(id=f"m{next(ids)}", body=b"x" * size) for size in arg]
            if bulk:
                answers = topics.publish_many("t.a", batch)
            else:
                answers = [topics.publish("t.a", m) for m in batch]
            assert all(a.result for a in answers)
        elif kind == "take":
            queue = queues[arg % len(queues)]
            taker = takers.get(queue) or takers.setdefault(queue, Taker(topics.host, queue))
            await asyncio.sleep(0)  # its dispatch
            acks = [m.id for m in taker.held[:arg]]
            del taker.held[: len(acks)]
            topics.host.settle(queue, taker.key, acks=acks)
        else:
            for queue, taker in takers.items():
                nacks = [(m.id, 0.0, "") for m in taker.held]
                taker.held.clear()
                topics.host.settle(queue, taker.key, nacks=nacks)
    for taker in takers.values():
        topics.host.unsubscribe(taker.queue, taker.key)
    await asyncio.sleep(0)
    return _state(topics, queues)


@settings(max_examples=150, deadline=None)
@given(
    buffers=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    plan=steps,
    max_memory=st.sampled_from([None, 400, 2000]),
    every=st.sampled_from([0.0, 1e9]),
)
def test_bulk_copies_leave_what_one_by_one_leaves(
    buffers: list[int], plan: list[Step], max_memory: int | None, every: float
) -> None:
    # The node's memory figure is summed again every MEMORY_RECOUNT
    # seconds, whenever that falls: here at every look or only once, so
    # both runs see the same.
    recount, queue_table.MEMORY_RECOUNT = queue_table.MEMORY_RECOUNT, every
    try:
        one_by_one = asyncio.run(_run(buffers, plan, False, max_memory))
        in_bulk = asyncio.run(_run(buffers, plan, True, max_memory))
    finally:
        queue_table.MEMORY_RECOUNT = recount
    assert in_bulk == one_by_one


def test_bulk_drops_are_told_in_the_next_message() -> None:
    async def main() -> None:
        topics, (queue,) = _world([3], None)
        topics.publish_many("t.a", [Message(id=f"m{i}", body=b"x") for i in range(10)])
        ledger = topics.host.queues[queue]
        ready = ledger.peek_ready(10)
        assert [m.id for m in ready] == ["m7", "m8", "m9"]
        assert [m.headers[headers.MISSED] for m in ready] == ["7", "0", "0"]
        assert topics.subscriptions[queue].dropped == 7
        assert ledger.bytes_held == sum(message_size(m.body, m.headers) for m in ready)
        topics.publish_many("t.a", [Message(id=f"n{i}", body=b"x") for i in range(2)])
        ready = ledger.peek_ready(10)
        assert [m.id for m in ready] == ["m9", "n0", "n1"]
        # m7 carried 7; dropping it and m8 tells 7 + 2 to m9.
        assert [m.headers[headers.MISSED] for m in ready] == ["9", "0", "0"]
        assert ledger.bytes_held == sum(message_size(m.body, m.headers) for m in ready)

    asyncio.run(main())


def test_a_resend_in_a_batch_is_published_once() -> None:
    async def main() -> None:
        topics, (queue,) = _world([10], None)
        batch = [Message(id="a", body=b"1"), Message(id="b", body=b"2"), Message(id="a", body=b"1")]
        answers = topics.publish_many("t.a", batch)
        assert [a.result for a in answers] == [True, True, False]
        assert topics.counts["duplicates"] == 1
        assert [m.id for m in topics.host.queues[queue].peek_ready(10)] == ["a", "b"]

    asyncio.run(main())
