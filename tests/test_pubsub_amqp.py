"""Publish-subscribe on the amqp:// transport against a real RabbitMQ, through
the transport's own methods (publish_nowait, subscribe, retain, request_all):
the mapping onto exchanges, queues and streams that docs/transports-amqp.md
describes. Every test uses names of its own and deletes what it declared."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiormq.exceptions
import brokers
import pytest

from pigeon._core import headers
from pigeon._core.topics import GapTracker, Retention, SlowPolicy, StartAt, covers
from pigeon.errors import (
    Backpressure,
    ConfigurationError,
    NoResponders,
    ReplayTrimmed,
    Timeout,
)
from pigeon.message import Message, new_id
from pigeon.testing.conformance import unique
from pigeon.transports import ConsumeOptions, Delivery, SubscribeOptions, open_transport
from pigeon.transports.amqp import topics as amqp_topics

aio_pika = pytest.importorskip("aio_pika")

URL = brokers.AMQP_URL

pytestmark = pytest.mark.broker


# Per test: a broker that gets stuck mid-module fails the rest at once (brokers.require).
@pytest.fixture(autouse=True)
def broker() -> None:
    brokers.require(URL)


@pytest.fixture
def cleanup() -> Iterator[set[str]]:
    """Queue (and stream) names to delete after the test."""
    names: set[str] = set()
    yield names

    async def delete() -> None:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            for name in sorted(names):
                await channel.queue_delete(name)

    if names:
        asyncio.run(delete())


def message(body: bytes | str) -> Message:
    data = body.encode() if isinstance(body, str) else body
    return Message(id=new_id(), body=data, created_at=time.time())


class Sink:
    """Keeps every delivery; acks each at once unless ``settle`` is False."""

    def __init__(self, settle: bool = True) -> None:
        self.deliveries: list[Delivery] = []
        self.settle = settle
        self.gaps = GapTracker()
        self.missed: list[int] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, batch: list[Delivery]) -> None:
        for delivery in batch:
            self.deliveries.append(delivery)
            self.missed.append(self.gaps.observe(delivery.message))
            if self.settle:
                task = asyncio.get_running_loop().create_task(delivery.ack())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    @property
    def bodies(self) -> list[str]:
        return [d.body.decode() for d in self.deliveries]

    @property
    def seqs(self) -> list[int]:
        return [int(d.message.headers[headers.SEQ]) for d in self.deliveries]

    @property
    def topics(self) -> list[str]:
        return [d.message.headers[headers.TOPIC] for d in self.deliveries]

    async def wait(self, count: int, timeout: float = 3.0) -> None:
        await until(lambda: len(self.deliveries) >= count, timeout, f"{count} deliveries")


async def until(check: Callable[[], bool], timeout: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.01)


def never(reason: str) -> None:
    raise AssertionError(f"disconnected: {reason}")


def run(
    cleanup: set[str], scenario: Callable[[Callable[..., Awaitable[Any]]], Awaitable[None]]
) -> None:
    """Run ``scenario(open)`` where ``open()`` starts a transport that is
    closed afterwards and whose declarations are deleted."""

    async def main() -> None:
        opened: list[Any] = []

        async def open_one(**options: Any) -> Any:
            transport = open_transport([URL], [], **options)
            await transport.start()
            opened.append(transport)
            return transport

        try:
            await asyncio.wait_for(scenario(open_one), 15.0)
        finally:
            for transport in opened:
                cleanup.update(transport.stats()["declared"])
                await transport.close()

    asyncio.run(main())


async def publish(transport: Any, topic: str, *bodies: str) -> None:
    for body in bodies:
        await transport.publish_nowait(topic, message(body))


# -- the mapping, without a broker --------------------------------------------


def test_binding_keys() -> None:
    assert amqp_topics.binding_key("a.*.c") == "a.*.c"
    assert amqp_topics.binding_key("a.>") == "a.#"
    assert amqp_topics.binding_key(">") == "#"
    # A literal '#' segment would be AMQP's wildcard: bound wider, filtered.
    assert amqp_topics.binding_key("a.#") == "a.*"
    with pytest.raises(ConfigurationError, match="255"):
        amqp_topics.binding_key("é" * 200)
    with pytest.raises(ConfigurationError, match="whole segments"):
        amqp_topics.binding_key("a.b*")
    with pytest.raises(ConfigurationError, match="255"):
        amqp_topics.routing_key("ü" * 128)


def test_names_are_escaped_one_to_one() -> None:
    assert amqp_topics.stream_name("a.>") == "pigeon.retained.a.:rest"
    assert amqp_topics.stream_name("a.*") == "pigeon.retained.a.:any"
    names = {amqp_topics.stream_name(p) for p in ("a.*", "a.:any", "a.:00002a", "a.ü", "a.>")}
    assert len(names) == 5
    assert amqp_topics.named_queue("billing") == "pigeon.sub.billing"
    assert amqp_topics.named_queue("a b".replace(" ", "é")) == "pigeon.sub.a:0000e9b"
    with pytest.raises(ConfigurationError, match="too long"):
        amqp_topics.named_queue("n" * 240)


def test_retention_arguments() -> None:
    arguments = amqp_topics.stream_arguments("a.>", Retention(max_bytes=1 << 20, max_age=90.5))
    assert arguments == {
        "x-queue-type": "stream",
        "x-max-length-bytes": 1 << 20,
        "x-max-age": "91s",
        "x-stream-max-segment-size-bytes": 1 << 18,
    }
    with pytest.raises(ConfigurationError, match="max_bytes and/or max_age instead"):
        amqp_topics.stream_arguments("a.>", Retention(max_count=5))
    assert covers("a.>", "a.b.*") and not covers("a.*", "a.>")
    assert amqp_topics.retained_candidates("a.b") == ["a.b", "a.>", ">"]


# -- live subscriptions ------------------------------------------------------------


def test_fan_out_and_numbering(cleanup: set[str]) -> None:
    """Two subscribers each get every message, numbered 1..N in order with
    TOPIC, SEQ and SOURCE; a topic without subscribers is no error."""
    topic = f"{unique('fan')}.news"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        publisher, a, b = [await open_transport() for _ in range(3)]
        await publish(publisher, f"{unique('nobody')}.x", "into the void")
        sinks = [Sink(), Sink()]
        for transport, sink in zip((a, b), sinks, strict=True):
            await transport.subscribe(topic, sink, SubscribeOptions(), never)
        await publish(publisher, topic, *(str(i) for i in range(20)))
        for sink in sinks:
            await sink.wait(20)
            assert sink.bodies == [str(i) for i in range(20)]
            assert sink.seqs == list(range(1, 21))
            assert set(sink.topics) == {topic}
            sources = {d.message.headers[headers.SOURCE] for d in sink.deliveries}
            assert sources == {publisher.session}
            assert sink.gaps.counts() == {"gaps": 0, "missed": 0, "repeats": 0, "unnumbered": 0}
        topics = publisher.stats()["topics"]
        assert topics["published"] == topics["confirmed"] == 21
        assert a.stats()["topics"]["delivered"] == 20

    run(cleanup, scenario)


def test_wildcards(cleanup: set[str]) -> None:
    """'*' is one segment, a final '>' one or more: 'a.>' does not get 'a'
    (the binding 'a.#' does; the subscriber drops it, counted filtered)."""
    base = unique("wild")
    expected = {
        f"{base}.*": [f"{base}.x", f"{base}.y"],
        f"{base}.>": [f"{base}.x", f"{base}.y", f"{base}.x.z"],
        f"{base}.*.z": [f"{base}.x.z"],
    }

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        transport = await open_transport()
        sinks = {pattern: Sink() for pattern in expected}
        for pattern, sink in sinks.items():
            await transport.subscribe(pattern, sink, SubscribeOptions(), never)
        for topic in (base, f"{base}.x", f"{base}.y", f"{base}.x.z", f"{base}x.y", f"{base}.x"):
            await publish(transport, topic, topic)
        # The last one published matches every pattern but '*.z': when it is
        # there, the rest published before it is too.
        for pattern, sink in sinks.items():
            want = expected[pattern] + ([f"{base}.x"] if "z" not in pattern else [])
            await sink.wait(len(want))
            await asyncio.sleep(0.05)
            assert sink.topics == want, (pattern, sink.topics)
        assert transport.stats()["topics"]["filtered"] == 1  # base, at base.>

    run(cleanup, scenario)


def test_drop_oldest_shows_as_gap_and_is_counted(cleanup: set[str]) -> None:
    """A subscriber that holds its one delivery and has a buffer of 3 keeps
    the newest 3: the broker drops the rest, which the subscriber counts
    (dropped) and sees as one jump in the numbering."""
    topic = f"{unique('drop')}.ticks"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        publisher, subscriber = await open_transport(), await open_transport()
        sink = Sink(settle=False)
        options = SubscribeOptions(buffer=3, consume=ConsumeOptions(prefetch=1))
        await subscriber.subscribe(topic, sink, options, never)
        await publish(publisher, topic, "1")
        await sink.wait(1)
        await publish(publisher, topic, *(str(i) for i in range(2, 21)))
        await until(lambda: subscriber.stats()["topics"]["dropped"] == 16, what="16 drops")
        for _ in range(3):  # settle one, get the next
            await sink.deliveries[-1].ack()
            await sink.wait(len(sink.deliveries) + 1)
        assert sink.seqs == [1, 18, 19, 20]
        assert sink.missed == [0, 16, 0, 0]

    run(cleanup, scenario)


def test_block_refuses_the_publisher(cleanup: set[str]) -> None:
    """A full 'block' subscriber makes the broker nack: Backpressure. The
    refused number is given back, so the retry has it: no gap."""
    topic = f"{unique('block')}.orders"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        publisher, subscriber = await open_transport(), await open_transport()
        sink = Sink(settle=False)
        options = SubscribeOptions(
            policy=SlowPolicy.BLOCK, buffer=2, consume=ConsumeOptions(prefetch=1)
        )
        await subscriber.subscribe(topic, sink, options, never)
        await publish(publisher, topic, "1")
        await sink.wait(1)
        await publish(publisher, topic, "2", "3")  # the buffer
        with pytest.raises(Backpressure, match="policy 'block'"):
            await publish(publisher, topic, "refused")
        with pytest.raises(Backpressure):
            await publish(publisher, topic, "refused again")
        assert publisher.stats()["topics"]["backpressure"] == 2
        await sink.deliveries[0].ack()
        await sink.wait(2)
        await publish(publisher, topic, "4")  # room again
        sink.settle = True
        for delivery in sink.deliveries[1:]:
            await delivery.ack()
        await sink.wait(4)
        assert sink.bodies == ["1", "2", "3", "4"]
        assert sink.seqs == [1, 2, 3, 4]

    run(cleanup, scenario)


def test_disconnect_ends_the_subscription(cleanup: set[str]) -> None:
    """A 'disconnect' subscriber that falls behind its buffer is cut off:
    on_disconnect once, counted, its queues gone; the publisher is not held."""
    topic = f"{unique('cut')}.feed"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        publisher, subscriber = await open_transport(), await open_transport()
        reasons: list[str] = []
        sink = Sink(settle=False)
        options = SubscribeOptions(
            policy=SlowPolicy.DISCONNECT, buffer=2, consume=ConsumeOptions(prefetch=1)
        )
        subscription = await subscriber.subscribe(topic, sink, options, reasons.append)
        await publish(publisher, topic, *(str(i) for i in range(10)))
        await until(lambda: bool(reasons), what="on_disconnect")
        await asyncio.sleep(0.1)
        assert len(reasons) == 1 and "policy disconnect" in reasons[0]
        assert subscriber.stats()["topics"]["disconnected"] == 1
        # Cut off: its queue is gone, so publishing goes on unrouted.
        await publish(publisher, topic, "after")
        assert not await queue_exists(subscription.queue)

    run(cleanup, scenario)


async def queue_exists(name: str) -> bool:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        except aiormq.exceptions.ChannelLockedResource:
            pass  # exclusive to another connection: it exists
        return True


def test_ephemeral_subscription_leaves_nothing(cleanup: set[str]) -> None:
    topic = f"{unique('gone')}.x"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        transport = await open_transport()
        subscription = await transport.subscribe(topic, Sink(), SubscribeOptions(), never)
        queues = [subscription.queue, amqp_topics.overflow_queue(subscription.queue)]
        assert [await queue_exists(q) for q in queues] == [True, True]
        await subscription.cancel()
        assert [await queue_exists(q) for q in queues] == [False, False]

    run(cleanup, scenario)


def test_ephemeral_settling_on_the_client(cleanup: set[str]) -> None:
    """nack(delay) hands the message over again, attempt one higher and
    flagged; reject dead-letters a copy into pigeon.topics.dead."""
    topic = f"{unique('settle')}.x"
    cleanup.add(amqp_topics.EPHEMERAL_DEAD)

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        transport = await open_transport()
        sink = Sink(settle=False)
        await transport.subscribe(topic, sink, SubscribeOptions(), never)
        await publish(transport, topic, "once")
        await sink.wait(1)
        await sink.deliveries[0].nack(0.1, "not yet")
        await sink.wait(2)
        again = sink.deliveries[1].message
        assert (again.attempt, again.redelivered) == (2, True)
        assert again.headers[headers.LAST_ERROR] == "not yet"
        assert again.headers[headers.SEQ] == "1"
        await sink.deliveries[1].reject("bad")
        counts = transport.stats()["topics"]
        assert (counts["nacked"], counts["dead_lettered"]) == (1, 1)

    run(cleanup, scenario)


# -- named subscriptions ------------------------------------------------------------


def test_named_subscription_resumes(cleanup: set[str]) -> None:
    """The queue keeps what is published while no subscriber of the name runs."""
    topic = f"{unique('resume')}.events"
    name = unique("resume")

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        publisher = await open_transport()
        first, second = Sink(), Sink()
        subscriber = await open_transport()
        subscription = await subscriber.subscribe(topic, first, SubscribeOptions(name=name), never)
        await publish(publisher, topic, "1", "2")
        await first.wait(2)
        await until(lambda: subscriber.stats()["topics"]["acked"] == 2, what="2 acks")
        await subscription.cancel()
        await publish(publisher, topic, "3", "4")  # nobody runs on it
        again = await open_transport()
        await again.subscribe(topic, second, SubscribeOptions(name=name), never)
        await second.wait(2)
        await publish(publisher, topic, "5")
        await second.wait(3)
        assert first.bodies == ["1", "2"] and second.bodies == ["3", "4", "5"]
        assert second.seqs == [3, 4, 5]
        assert amqp_topics.named_queue(name) in again.stats()["declared"]

    run(cleanup, scenario)


def test_named_subscribers_compete(cleanup: set[str]) -> None:
    topic = f"{unique('share')}.jobs"
    name = unique("share")

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        publisher, one, two = [await open_transport() for _ in range(3)]
        sinks = [Sink(), Sink()]
        options = SubscribeOptions(name=name, consume=ConsumeOptions(prefetch=1))
        for transport, sink in zip((one, two), sinks, strict=True):
            await transport.subscribe(topic, sink, options, never)
        await publish(publisher, topic, *(str(i) for i in range(30)))
        await until(lambda: sum(len(s.deliveries) for s in sinks) >= 30, what="30 between two")
        await asyncio.sleep(0.05)
        together = sorted(sinks[0].seqs + sinks[1].seqs)
        assert together == list(range(1, 31))
        assert sinks[0].deliveries and sinks[1].deliveries

    run(cleanup, scenario)


# -- retained history -------------------------------------------------------------------


def test_replay_from_seq_last_and_time_then_live(cleanup: set[str]) -> None:
    """History then live, from one stream consumer: no gap, no duplicate."""
    base = unique("replay")
    topic, other = f"{base}.a", f"{base}.b"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        host, client = await open_transport(), await open_transport()
        await host.retain(f"{base}.>", Retention(max_bytes=1 << 20))
        await publish(host, topic, *(str(i) for i in range(1, 6)))
        await asyncio.sleep(0.02)
        mark = time.time()
        await asyncio.sleep(0.02)
        await publish(host, topic, "6", "7", "8")
        await publish(host, other, "b1")
        sinks = {what: Sink() for what in ("from_seq", "last", "from_time", "per_subject")}
        starts = {
            "from_seq": (topic, StartAt(from_seq=4)),
            "last": (topic, StartAt(last=3)),
            "from_time": (topic, StartAt(from_time=mark)),
            "per_subject": (f"{base}.>", StartAt(last_per_subject=True)),
        }
        for what, (pattern, start) in starts.items():
            options = SubscribeOptions(start=start)
            await client.subscribe(pattern, sinks[what], options, never)
        await publish(host, topic, "9")
        want = {
            "from_seq": [4, 5, 6, 7, 8, 9],
            "last": [6, 7, 8, 9],
            "from_time": [6, 7, 8, 9],
        }
        for what, seqs in want.items():
            await sinks[what].wait(len(seqs))
        await sinks["per_subject"].wait(3)
        await asyncio.sleep(0.05)
        for what, seqs in want.items():
            assert sinks[what].seqs == seqs, (what, sinks[what].seqs)
            assert sinks[what].missed == [0] * len(seqs)
        per_subject = sinks["per_subject"]
        assert list(zip(per_subject.topics, per_subject.seqs, strict=True)) == [
            (topic, 8),
            (other, 1),
            (topic, 9),
        ]
        assert client.stats()["topics"]["replayed"] == 5 + 3 + 3 + 2

    run(cleanup, scenario)


def test_replay_last_needs_the_whole_stream_when_the_window_is_short(cleanup: set[str]) -> None:
    """last=N first reads the last N offsets of the stream; if other topics
    filled them, it reads the stream from its start."""
    base = unique("window")

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        transport = await open_transport()
        await transport.retain(f"{base}.>", Retention(max_age=60))
        await publish(transport, f"{base}.a", "a1", "a2")
        await publish(transport, f"{base}.b", *(f"b{i}" for i in range(5)))
        sink = Sink()
        options = SubscribeOptions(start=StartAt(last=2))
        await transport.subscribe(f"{base}.a", sink, options, never)
        await sink.wait(2)
        assert sink.bodies == ["a1", "a2"]

    run(cleanup, scenario)


def test_replay_trimmed(cleanup: set[str]) -> None:
    """A stream trimmed by bytes no longer has the first numbers: from_seq=1
    is ReplayTrimmed, naming the first number it still has."""
    base = unique("trim")
    topic = f"{base}.t"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        transport = await open_transport()
        await transport.retain(f"{base}.>", Retention(max_bytes=8192))
        body = "x" * 400
        futures = [transport.publish_nowait(topic, message(body)) for _ in range(200)]
        await asyncio.gather(*futures)
        published = 200
        # RabbitMQ trims a stream a segment at a time, in the background; right
        # after a segment rolls over, the newest may even be empty (nothing
        # retained: no error then). One more message each time around.
        deadline = time.monotonic() + 4.0
        while True:
            try:
                options = SubscribeOptions(start=StartAt(from_seq=1))
                subscription = await transport.subscribe(topic, Sink(), options, never)
            except ReplayTrimmed as exc:
                error = exc
                break
            await subscription.cancel()
            assert time.monotonic() < deadline, "the stream was not trimmed in 4 s"
            await publish(transport, topic, body)
            published += 1
        first = error.first_retained
        assert error.topic == topic and error.asked == 1 and 1 < first <= published
        while True:
            sink = Sink()
            options = SubscribeOptions(start=StartAt(from_seq=first))
            try:
                await transport.subscribe(topic, sink, options, never)
                break
            except ReplayTrimmed as again:
                # The broker trimmed another segment in the background since.
                assert again.asked == first < again.first_retained <= published, again
                assert time.monotonic() < deadline + 4.0, "the stream kept being trimmed"
                first = again.first_retained
        await sink.wait(published - first + 1)
        assert sink.seqs == list(range(first, published + 1))

    run(cleanup, scenario)


def test_replay_refusals(cleanup: set[str]) -> None:
    """What a replay on RabbitMQ cannot do is a ConfigurationError that says
    what to use."""
    base = unique("refuse")

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        transport = await open_transport()
        replay = StartAt(last=1)
        with pytest.raises(ConfigurationError, match="call retain"):
            await transport.subscribe(f"{base}.x", Sink(), SubscribeOptions(start=replay), never)
        with pytest.raises(ConfigurationError, match="not by count"):
            await transport.retain(f"{base}.>", Retention(max_count=10))
        await transport.retain(f"{base}.>", Retention(max_bytes=1 << 16))
        block = SubscribeOptions(start=replay, policy=SlowPolicy.BLOCK)
        with pytest.raises(ConfigurationError, match="drop-oldest"):
            await transport.subscribe(f"{base}.x", Sink(), block, never)
        named = SubscribeOptions(start=replay, name=unique("n"))
        with pytest.raises(ConfigurationError, match="name or start"):
            await transport.subscribe(f"{base}.x", Sink(), named, never)
        # Another connection finds the stream retained by this one.
        other = await open_transport()
        sink = Sink()
        await publish(transport, f"{base}.x", "kept")
        await other.subscribe(f"{base}.x", sink, SubscribeOptions(start=replay), never)
        await sink.wait(1)
        assert sink.bodies == ["kept"]

    run(cleanup, scenario)


def test_replay_from_a_future_time_is_live_only(cleanup: set[str]) -> None:
    base = unique("future")

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        transport = await open_transport()
        await transport.retain(f"{base}.>", Retention(max_age=60))
        await publish(transport, f"{base}.x", "old")
        sink = Sink()
        options = SubscribeOptions(start=StartAt(from_time=time.time() + 3600))
        await transport.subscribe(f"{base}.>", sink, options, never)
        await publish(transport, f"{base}.x", "new")
        await sink.wait(1)
        await asyncio.sleep(0.05)
        assert sink.bodies == ["new"]

    run(cleanup, scenario)


# -- request_all -----------------------------------------------------------------------------


def test_request_all(cleanup: set[str]) -> None:
    """Every server answers; the call ends as soon as all did; no server is
    NoResponders at once; more replies wanted than servers is Timeout."""
    service = unique("census")

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        a, b, client = [await open_transport() for _ in range(3)]

        def answer(name: str) -> Callable[[Message], Awaitable[Message]]:
            async def handler(request: Message) -> Message:
                return message(name)

            return handler

        await a.serve(service, answer("a"))
        await b.serve(service, answer("b"))
        started = time.monotonic()
        replies = await client.request_all(service, message("who?"), timeout=5.0, min_replies=2)
        assert sorted(r.body for r in replies) == [b"a", b"b"]
        assert time.monotonic() - started < 2.0  # not the whole timeout
        # One plain request still reaches one server.
        reply = await client.request(service, message("one"), timeout=2.0)
        assert reply.body in (b"a", b"b")
        started = time.monotonic()
        with pytest.raises(NoResponders):
            await client.request_all(unique("nobody"), message("x"), timeout=5.0, min_replies=1)
        assert time.monotonic() - started < 1.0
        with pytest.raises(Timeout, match="2 of the 3"):
            await client.request_all(service, message("x"), timeout=0.5, min_replies=3)
        assert client.stats()["request_all"] == 2  # NoResponders was found before sending

    run(cleanup, scenario)


def test_replay_resumes_after_a_reconnect(cleanup: set[str]) -> None:
    """A replaying subscriber whose connection is cut comes back reading
    after the last offset it saw: what was published meanwhile arrives, and
    nothing twice."""
    from test_amqp import Proxy

    base = unique("outage")
    topic = f"{base}.t"

    async def scenario(open_transport: Callable[..., Awaitable[Any]]) -> None:
        proxy = Proxy()
        await proxy.start()
        try:
            publisher = await open_transport()
            await publisher.retain(f"{base}.>", Retention(max_age=60))
            await publish(publisher, topic, "1", "2", "3")
            subscriber = open_transport_at(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
            await subscriber.start()
            try:
                sink = Sink()
                options = SubscribeOptions(start=StartAt(last=2))
                await subscriber.subscribe(topic, sink, options, never)
                await sink.wait(2)
                await proxy.cut()
                await publish(publisher, topic, "4", "5")
                await proxy.start()  # same port
                await until(
                    lambda: subscriber.stats().get("reconnects", 0) >= 1, 10.0, "a reconnect"
                )
                await publish(publisher, topic, "6")
                await sink.wait(4, timeout=10.0)
                await asyncio.sleep(0.1)
                assert sink.seqs == [2, 3, 4, 5, 6], sink.seqs
            finally:
                cleanup.update(subscriber.stats()["declared"])
                await subscriber.close()
        finally:
            await proxy.close()

    run(cleanup, scenario)


def open_transport_at(url: str) -> Any:
    return open_transport([url], [], reconnect_interval=0.2)
