"""Publish-subscribe on the nats:// transport, against a real NATS server
with JetStream, through the transport's own methods (publish_nowait,
subscribe, retain, request_all): the API layer is not involved.

Every test has a subject prefix and stream name of its own, and deletes
every stream it made (the retained and subscription streams are named
after the transport's stream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import brokers
import pytest

from pigeon._core import headers
from pigeon._core.topics import Retention, StartAt
from pigeon.errors import (
    Backpressure,
    ConfigurationError,
    NoResponders,
    ReplayTrimmed,
    Timeout,
)
from pigeon.message import Message, new_id
from pigeon.transports import ConsumeOptions, Delivery, SubscribeOptions, open_transport

pytestmark = pytest.mark.broker

NATS_URL = brokers.NATS_URL


# Per test: a broker that gets stuck mid-module fails the rest at once (brokers.require).
@pytest.fixture
def server() -> str:
    return brokers.require(NATS_URL)


class Place:
    """A stream name and subject prefix of this test's own."""

    def __init__(self, server: str) -> None:
        tag = new_id()
        self.server = server
        self.stream = f"PIGEON_PS_{tag}"
        self.prefix = f"ps{tag}"
        self.url = f"{server}?stream={self.stream}&prefix={self.prefix}"

    async def transport(self, **options: Any) -> Any:
        t = open_transport([self.url], [], **options)
        await t.start()
        return t

    async def streams(self) -> dict[str, Any]:
        """This test's streams (by name) with their info."""
        import nats

        nc = await nats.connect(self.server, connect_timeout=2, allow_reconnect=False)
        try:
            infos = await nc.jetstream().streams_info()
            return {i.config.name: i for i in infos if i.config.name.startswith(self.stream)}
        finally:
            await nc.close()

    async def clean(self) -> None:
        import nats

        nc = await nats.connect(self.server, connect_timeout=2, allow_reconnect=False)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                if info.config.name.startswith(self.stream):
                    await js.delete_stream(info.config.name)
        finally:
            await nc.close()


@pytest.fixture
def place(server: str):
    setup = Place(server)
    yield setup
    asyncio.run(setup.clean())


def run(main: Callable[[], Awaitable[None]], timeout: float = 15.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    asyncio.run(bounded())


def message(body: object) -> Message:
    return Message(id=new_id(), body=str(body).encode())


class Sink:
    """Collects deliveries; acks them at once if ``auto_ack``."""

    def __init__(self, auto_ack: bool = True) -> None:
        self.deliveries: list[Delivery] = []
        self.auto_ack = auto_ack
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, batch: list[Delivery]) -> None:
        self.deliveries.extend(batch)
        if self.auto_ack:
            for delivery in batch:
                task = asyncio.get_running_loop().create_task(delivery.ack())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def __len__(self) -> int:
        return len(self.deliveries)

    @property
    def bodies(self) -> list[str]:
        return [d.body.decode() for d in self.deliveries]

    @property
    def seqs(self) -> list[int]:
        return [int(d.message.headers[headers.SEQ]) for d in self.deliveries]

    @property
    def topics(self) -> list[str]:
        return [d.queue for d in self.deliveries]


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def nothing(reason: str) -> None:
    raise AssertionError(f"disconnected: {reason}")


async def publish(t: Any, topic: str, *bodies: object) -> None:
    for body in bodies:
        await t.publish_nowait(topic, message(body))


# -- plain subscriptions (core NATS) ----------------------------------------


def test_fan_out_to_two_subscribers_numbered_per_topic(place: Place) -> None:
    async def main() -> None:
        pub, a, b = [await place.transport() for _ in range(3)]
        try:
            sinks = [Sink(), Sink()]
            for t, sink in zip((a, b), sinks, strict=True):
                await t.subscribe("news.>", sink, SubscribeOptions(), nothing)
            for i in range(1, 6):
                await pub.publish_nowait("news.eu", message(f"eu{i}"))
                await pub.publish_nowait("news.us", message(f"us{i}"))
            for sink in sinks:
                await wait_until(lambda sink=sink: len(sink) == 10, "10 deliveries")
                source = {d.message.headers[headers.SOURCE] for d in sink.deliveries}
                assert source == {pub.stats()["topics"]["source"]}
                for topic in ("news.eu", "news.us"):
                    mine = [d for d in sink.deliveries if d.queue == topic]
                    assert [d.message.headers[headers.TOPIC] for d in mine] == [topic] * 5
                    assert [int(d.message.headers[headers.SEQ]) for d in mine] == [1, 2, 3, 4, 5]
                    assert [d.body.decode() for d in mine] == [
                        f"{topic[-2:]}{i}" for i in range(1, 6)
                    ]
                assert all(d.message.attempt == 1 for d in sink.deliveries)
            counts = pub.stats()["topics"]
            assert (counts["published"], counts["confirmed"], counts["stored"]) == (10, 10, 0)
            assert a.stats()["topics"]["delivered"] == 10
            await wait_until(lambda: a.stats()["topics"]["acked"] == 10, "10 acks")
        finally:
            for t in (pub, a, b):
                await t.close()

    run(main)


def test_wildcards(place: Place) -> None:
    expected = {
        "w": ["w"],
        "w.*": ["w.x", "w.y"],
        "w.>": ["w.x", "w.y", "w.x.z"],
        "w.*.z": ["w.x.z"],
        "*": ["w", "wx"],
    }

    async def main() -> None:
        t = await place.transport()
        try:
            sinks = {pattern: Sink() for pattern in expected}
            for pattern, sink in sinks.items():
                await t.subscribe(pattern, sink, SubscribeOptions(), nothing)
            for topic in ("w", "w.x", "w.y", "w.x.z", "wx", "wx.y"):
                await publish(t, topic, topic)
            # A marker after all the others: once it is in, so are they.
            end = Sink()
            await t.subscribe("z.end.q", end, SubscribeOptions(), nothing)
            await publish(t, "z.end.q", "end")
            await wait_until(lambda: len(end) == 1, "the end marker")
            for pattern, sink in sinks.items():
                await wait_until(
                    lambda sink=sink, pattern=pattern: len(sink) >= len(expected[pattern]),
                    pattern,
                )
                assert sorted(sink.topics) == sorted(expected[pattern]), pattern
                assert sink.bodies == sink.topics
        finally:
            await t.close()

    run(main)


def test_bad_topics_and_patterns_are_configuration_errors(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            for topic in ("a.*", "a.>", "", "a..b", "a b"):
                with pytest.raises(ConfigurationError):
                    t.publish_nowait(topic, message("x"))
            for pattern in ("a.>.b", "a.b*", ""):
                with pytest.raises(ConfigurationError):
                    await t.subscribe(pattern, Sink(), SubscribeOptions(), nothing)
            assert t.stats()["topics"]["published"] == 0
        finally:
            await t.close()

    run(main)


def test_a_plain_nats_publisher_is_delivered_unnumbered(place: Place) -> None:
    import nats

    async def main() -> None:
        t = await place.transport()
        nc = await nats.connect(place.server, connect_timeout=2, allow_reconnect=False)
        try:
            sink = Sink()
            await t.subscribe("raw", sink, SubscribeOptions(), nothing)
            prefix = place.prefix
            await nc.publish(f"{prefix}.t.raw", b"plain")
            # A forged TOPIC naming another topic loses its numbering.
            forged = {headers.TOPIC: "elsewhere", headers.SEQ: "7", headers.SOURCE: "x"}
            await nc.publish(f"{prefix}.t.raw", b"forged", headers=forged)
            await nc.flush()
            await wait_until(lambda: len(sink) == 2, "2 deliveries")
            assert sink.bodies == ["plain", "forged"]
            for delivery in sink.deliveries:
                assert headers.SEQ not in delivery.message.headers
                assert delivery.queue == "raw"
            assert t.stats()["topics"]["bad_numbering"] == 1
        finally:
            await nc.close()
            await t.close()

    run(main)


def test_drop_oldest_drops_and_counts(place: Place) -> None:
    async def main() -> None:
        pub, sub = await place.transport(), await place.transport()
        try:
            sink = Sink(auto_ack=False)  # the handler settles nothing
            options = SubscribeOptions(buffer=3, consume=ConsumeOptions(prefetch=1))
            await sub.subscribe("ticks", sink, options, nothing)
            await publish(pub, "ticks", *range(1, 21))
            await wait_until(lambda: sub.stats()["topics"]["received"] == 20, "20 received")
            counts = sub.stats()["topics"]
            assert len(sink) == 1 and sink.seqs == [1]  # prefetch 1: the first, held
            assert counts["dropped"] == 20 - 1 - 3, counts  # all but the held one and the buffer
            for _ in range(4):
                await sink.deliveries[-1].ack()
            assert sink.seqs == [1, 18, 19, 20]  # the buffer kept the newest
            assert sub.stats()["topics"]["acked"] == 4
        finally:
            await pub.close()
            await sub.close()

    run(main)


def test_disconnect_policy_calls_on_disconnect(place: Place) -> None:
    async def main() -> None:
        pub, sub = await place.transport(), await place.transport()
        try:
            reasons: list[str] = []
            sink, other = Sink(auto_ack=False), Sink()
            options = SubscribeOptions(
                policy="disconnect", buffer=2, consume=ConsumeOptions(prefetch=1)
            )
            await sub.subscribe("feed", sink, options, reasons.append)
            await sub.subscribe("feed", other, SubscribeOptions(), nothing)
            await publish(pub, "feed", *range(10))
            await wait_until(lambda: len(other) == 10, "the other subscriber's 10")
            await wait_until(lambda: bool(reasons), "on_disconnect")
            assert len(reasons) == 1 and "disconnect" in reasons[0]
            counts = sub.stats()["topics"]
            assert counts["disconnected"] == 1
            assert len(sink) == 1  # the one it held; nothing after the cut
            await wait_until(lambda: sub.stats()["topics"]["subscriptions"] == 1, "unsubscribed")
            await publish(pub, "feed", "after")
            await wait_until(lambda: len(other) == 11, "one more at the other")
            assert len(sink) == 1
            await sink.deliveries[0].ack()  # settling what it held still works
        finally:
            await pub.close()
            await sub.close()

    run(main)


def test_block_without_a_name_is_a_configuration_error(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            with pytest.raises(ConfigurationError, match="durable subscription"):
                await t.subscribe("x", Sink(), SubscribeOptions(policy="block"), nothing)
            with pytest.raises(ConfigurationError, match="durable subscription"):
                await t.subscribe(
                    "x", Sink(), SubscribeOptions(policy="block", start=StartAt(last=1)), nothing
                )
            assert t.stats()["topics"]["subscriptions"] == 0
        finally:
            await t.close()

    run(main)


def test_nack_redelivers_locally_and_reject_is_counted(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            sink = Sink(auto_ack=False)
            options = SubscribeOptions(consume=ConsumeOptions(max_attempts=2))
            await t.subscribe("jobs", sink, options, nothing)
            await publish(t, "jobs", "a")
            await wait_until(lambda: len(sink) == 1, "the first delivery")
            await sink.deliveries[0].nack(delay=0.05, reason="later")
            await wait_until(lambda: len(sink) == 2, "the redelivery")
            again = sink.deliveries[1].message
            assert (again.attempt, again.redelivered) == (2, True)
            assert again.headers[headers.SEQ] == "1"  # a repeat, not a new number
            await sink.deliveries[1].nack(delay=0.0)  # over max_attempts: not again
            await publish(t, "jobs", "b")
            await wait_until(lambda: len(sink) == 3, "the next message")
            await sink.deliveries[2].reject("bad payload")
            counts = t.stats()["topics"]
            assert (counts["nacked"], counts["redelivered"], counts["rejected"]) == (2, 1, 2)
            assert "bad payload" in counts["last_rejected"]
            assert sink.bodies == ["a", "a", "b"]
        finally:
            await t.close()

    run(main)


# -- retained topics (JetStream) --------------------------------------------


def test_replay_from_seq_last_per_subject_and_time(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            await t.retain("r.>", Retention(max_count=5))
            await publish(t, "r.b", 1, 2, 3)  # first: r.a's numbers are not stream places
            await publish(t, "r.a", *range(1, 6))
            await asyncio.sleep(0.02)  # so the times around `mark` differ
            mark = time.time()
            await asyncio.sleep(0.02)
            await publish(t, "r.a", 6, 7, 8)  # r.a keeps 4..8
            assert t.stats()["topics"]["stored"] == 11
            sinks = {k: Sink() for k in ("from_seq", "last", "time", "per_subject", "wide")}
            starts = {
                "from_seq": ("r.a", StartAt(from_seq=6)),
                "last": ("r.a", StartAt(last=2)),
                "time": ("r.a", StartAt(from_time=mark)),
                "per_subject": ("r.>", StartAt(last_per_subject=True)),
                "wide": ("r.>", StartAt(last=4)),  # across both topics, in stream order
            }
            for what, (pattern, start) in starts.items():
                await t.subscribe(pattern, sinks[what], SubscribeOptions(start=start), nothing)
            await publish(t, "r.a", 9)  # live, right after the history
            want = {
                "from_seq": ["6", "7", "8", "9"],
                "last": ["7", "8", "9"],
                "time": ["6", "7", "8", "9"],
                "wide": ["5", "6", "7", "8", "9"],
            }
            for what, bodies in want.items():
                sink = sinks[what]
                n = len(bodies)
                await wait_until(lambda sink=sink, n=n: len(sink) >= n, what)
                assert sink.bodies == bodies, (what, sink.bodies)
            per = sinks["per_subject"]
            await wait_until(lambda: len(per) >= 3, "per subject")
            assert per.topics[:2] == ["r.b", "r.a"]  # in stream order
            assert per.bodies[:3] == ["3", "8", "9"]
            # A retained topic is numbered by its stream: from_seq counts those.
            from_seq = sinks["from_seq"].deliveries
            assert [d.message.headers[headers.SEQ] for d in from_seq] == ["6", "7", "8", "9"]
            sources = {d.message.headers[headers.SOURCE] for d in from_seq}
            assert sources == {_retained(await place.streams())}
        finally:
            await t.close()

    run(main)


def _retained(streams: dict[str, Any]) -> str:
    (name,) = [n for n in streams if "_T_" in n]
    return name


def test_from_seq_on_a_wildcard_counts_each_topic(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            await t.retain("m.>", Retention(max_count=5))
            await publish(t, "m.x", 1, 2, 3)
            for i in range(4, 9):  # x4 y1 x5 y2 ... x8 y5, then y6
                await publish(t, "m.x", f"x{i}")
                await publish(t, "m.y", f"y{i - 3}")
            await publish(t, "m.y", "y6")  # x keeps 4..8, y keeps 2..6
            sink = Sink()
            await t.subscribe("m.>", sink, SubscribeOptions(start=StartAt(from_seq=4)), nothing)
            await wait_until(lambda: len(sink) == 8, "x4..x8 and y4..y6")
            assert sink.bodies == ["x4", "x5", "x6", "x7", "y4", "x8", "y5", "y6"]
            assert t.stats()["topics"]["skipped"] == 2  # y2 and y3, in between
            with pytest.raises(ReplayTrimmed) as caught:
                await t.subscribe(
                    "m.>", Sink(), SubscribeOptions(start=StartAt(from_seq=3)), nothing
                )
            assert (caught.value.topic, caught.value.first_retained) == ("m.x", 4)
        finally:
            await t.close()

    run(main)


def test_publishers_share_a_retained_topics_numbers(place: Place) -> None:
    async def main() -> None:
        a, b, sub = [await place.transport() for _ in range(3)]
        try:
            await a.retain("shared", Retention(max_count=1000))
            sink = Sink()
            await sub.subscribe("shared", sink, SubscribeOptions(), nothing)
            futures = []
            for i in range(20):  # interleaved, pipelined: both publish at once
                futures.append(a.publish_nowait("shared", message(f"a{i}")))
                futures.append(b.publish_nowait("shared", message(f"b{i}")))
            await asyncio.gather(*futures)
            await wait_until(lambda: len(sink) == 40, "40 deliveries")
            assert sink.seqs == list(range(1, 41)), (  # one sequence, whoever published
                [(d.message.headers, d.body) for d in sink.deliveries],
                a.stats()["topics"],
                b.stats()["topics"],
            )
            assert {d.message.headers[headers.SOURCE] for d in sink.deliveries} == {
                _retained(await place.streams())
            }
            assert sorted(sink.bodies) == sorted(
                [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]
            )
        finally:
            for t in (a, b, sub):
                await t.close()

    run(main)


def test_replay_trimmed_names_the_first_retained(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            await t.retain("trim", Retention(max_count=3))
            await publish(t, "trim", *range(1, 8))  # keeps stream seqs 5..7
            with pytest.raises(ReplayTrimmed) as caught:
                await t.subscribe(
                    "trim", Sink(), SubscribeOptions(start=StartAt(from_seq=2)), nothing
                )
            assert (caught.value.topic, caught.value.asked, caught.value.first_retained) == (
                "trim",
                2,
                5,
            )
            sink = Sink()
            await t.subscribe("trim", sink, SubscribeOptions(start=StartAt(from_seq=5)), nothing)
            await wait_until(lambda: len(sink) == 3, "5..7")
            assert sink.bodies == ["5", "6", "7"]
            assert t.stats()["topics"]["replays_trimmed"] == 1
        finally:
            await t.close()

    run(main)


def test_replay_needs_a_retained_topic(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            with pytest.raises(ConfigurationError, match=r"retain\(\)"):
                await t.subscribe("plain", Sink(), SubscribeOptions(start=StartAt(last=1)), nothing)
            await t.retain("part.a", Retention(max_count=1))
            with pytest.raises(ConfigurationError, match="only part"):
                await t.subscribe(
                    "part.*", Sink(), SubscribeOptions(start=StartAt(last=1)), nothing
                )
            with pytest.raises(ConfigurationError, match="overlap"):
                await t.retain("part.>", Retention(max_count=1))
        finally:
            await t.close()

    run(main)


def test_ephemeral_replay_leaves_no_consumer(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            await t.retain("gone", Retention(max_age=60))
            await publish(t, "gone", 1)
            sink = Sink()
            sub = await t.subscribe("gone", sink, SubscribeOptions(start=StartAt(last=1)), nothing)
            await wait_until(lambda: len(sink) == 1, "the replay")
            (info,) = [i for n, i in (await place.streams()).items() if "_T_" in n]
            assert info.state.consumer_count == 1
            await sub.cancel()
            (info,) = [i for n, i in (await place.streams()).items() if "_T_" in n]
            assert info.state.consumer_count == 0
        finally:
            await t.close()

    run(main)


def test_retained_stream_limits(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            await t.retain("lim.>", Retention(max_count=10, max_bytes=1 << 20, max_age=30))
            infos = await place.streams()
            (name,) = [n for n in infos if "_T_" in n]
            config = infos[name].config
            assert config.subjects == [f"{place.prefix}.r.lim.>"]  # republished to .t.
            assert (config.max_msgs_per_subject, config.max_bytes) == (10, 1 << 20)
            assert config.max_age == 30
            await t.retain("lim.>", Retention(max_count=2))  # an update, not a new stream
            infos = await place.streams()
            assert [n for n in infos if "_T_" in n] == [name]
            assert infos[name].config.max_msgs_per_subject == 2
            assert t.stats()["topics"]["retained"] == ["lim.>"]
            with pytest.raises(ConfigurationError):
                await t.retain("lim.>", Retention())
        finally:
            await t.close()

    run(main)


def test_another_connection_learns_of_a_retained_topic(place: Place) -> None:
    async def main() -> None:
        a = await place.transport()
        b = await place.transport()  # started before the retain
        try:
            await a.retain("late", Retention(max_count=10))
            await publish(b, "late", 1, 2)
            counts = b.stats()["topics"]
            assert (counts["confirmed"], counts["stored"]) == (2, 2)  # pub acks, not flushes
        finally:
            await a.close()
            await b.close()

    run(main)


def test_a_consumer_deleted_under_a_replay_is_made_again(place: Place) -> None:
    import nats
    import nats.js.errors

    async def main() -> None:
        # A pull the server drops with its consumer is written off after
        # pull_expires + 1 s; keep that short here.
        t = await place.transport(pull_expires=0.5)
        nc = await nats.connect(place.server, connect_timeout=2, allow_reconnect=False)
        try:
            await t.retain("again", Retention(max_count=100))
            await publish(t, "again", 1, 2)
            sink = Sink()
            await t.subscribe("again", sink, SubscribeOptions(start=StartAt(from_seq=1)), nothing)
            await wait_until(lambda: t.stats()["topics"]["acked"] == 2, "the history, acked")
            (name,) = [n for n in await place.streams() if "_T_" in n]
            js = nc.jetstream()
            for consumer in await js.consumers_info(name):
                for _ in range(20):  # nats-server 2.9 may refuse while it writes acks
                    try:
                        await js.delete_consumer(name, consumer.name)
                        break
                    except nats.js.errors.ServerError:
                        await asyncio.sleep(0.05)
            await publish(t, "again", 3, 4)
            await wait_until(lambda: len(sink) == 4, "the ones after, once")
            assert sink.bodies == ["1", "2", "3", "4"]  # nothing replayed twice
            assert t.stats()["topics"]["consumers_recreated"] >= 1
        finally:
            await nc.close()
            await t.close()

    run(main)


# -- durable subscriptions --------------------------------------------------


def test_durable_disconnect_when_too_much_is_pending(place: Place) -> None:
    async def main() -> None:
        pub, sub = await place.transport(), await place.transport()
        try:
            reasons: list[str] = []
            sink = Sink(auto_ack=False)
            options = SubscribeOptions(
                name="lagging", policy="disconnect", buffer=2, consume=ConsumeOptions(prefetch=1)
            )
            await sub.subscribe("lag", sink, options, reasons.append)
            await publish(pub, "lag", 1)
            await wait_until(lambda: len(sink) == 1, "the first, held")
            # Its stream keeps 2 * buffer + prefetch = 5 of them: 6..10.
            await publish(pub, "lag", *range(2, 11))
            await sink.deliveries[0].ack()
            await wait_until(lambda: bool(reasons), "on_disconnect")
            assert "4 messages were pending" in reasons[0] and len(sink) == 1
            assert sub.stats()["topics"]["disconnected"] == 1
            # The durable kept its place: a new subscriber gets the rest.
            rest = Sink()
            await sub.subscribe("lag", rest, SubscribeOptions(name="lagging"), nothing)
            await wait_until(lambda: len(rest) == 5, "the 5 kept")
            assert rest.bodies == [str(i) for i in range(6, 11)]
        finally:
            await pub.close()
            await sub.close()

    run(main)


def test_durable_subscription_resumes_where_it_stopped(place: Place) -> None:
    async def main() -> None:
        pub = await place.transport()
        options = SubscribeOptions(name="audit")
        try:
            sub = await place.transport()
            first = Sink()
            subscription = await sub.subscribe("ev", first, options, nothing)
            await publish(pub, "ev", 1, 2, 3)
            await wait_until(lambda: sub.stats()["topics"]["acked"] == 3, "3 acks")
            await subscription.cancel()
            await sub.close()
            await publish(pub, "ev", 4, 5)  # while no subscriber runs
            sub = await place.transport()
            second = Sink()
            await sub.subscribe("ev", second, options, nothing)
            await wait_until(lambda: len(second) == 2, "the 2 missed")
            await publish(pub, "ev", 6)
            await wait_until(lambda: len(second) == 3, "a live one")
            assert first.bodies == ["1", "2", "3"]
            assert second.bodies == ["4", "5", "6"]
            assert second.seqs == [4, 5, 6]  # the publisher's numbers: no gap
            await sub.close()
        finally:
            await pub.close()

    run(main)


def test_a_durable_keeps_its_stream_when_the_topic_is_retained_later(place: Place) -> None:
    async def main() -> None:
        pub = await place.transport()
        options = SubscribeOptions(name="early")
        try:
            sub = await place.transport()
            first = Sink()
            await sub.subscribe("late.x", first, options, nothing)
            await publish(pub, "late.x", 1)
            await wait_until(lambda: sub.stats()["topics"]["acked"] == 1, "the first, acked")
            await sub.close()
            await pub.retain("late.>", Retention(max_count=10))
            await publish(pub, "late.x", 2, 3)  # stored, and republished to its stream too
            sub = await place.transport()
            second = Sink()
            await sub.subscribe("late.x", second, options, nothing)
            await wait_until(lambda: len(second) == 2, "what it missed")
            assert second.bodies == ["2", "3"]
            await sub.close()
        finally:
            await pub.close()

    run(main)


def test_a_name_is_one_pattern(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            await t.retain("dd.>", Retention(max_count=5))
            await t.subscribe("dd.a", Sink(), SubscribeOptions(name="n"), nothing)
            with pytest.raises(ConfigurationError, match="exists on"):
                await t.subscribe("dd.b", Sink(), SubscribeOptions(name="n"), nothing)
            with pytest.raises(ConfigurationError, match="retain"):
                await t.subscribe(
                    "nd", Sink(), SubscribeOptions(name="m", start=StartAt(last=1)), nothing
                )
        finally:
            await t.close()

    run(main)


def test_same_name_shares_the_messages(place: Place) -> None:
    async def main() -> None:
        pub, c1, c2 = [await place.transport() for _ in range(3)]
        try:
            a, b = Sink(auto_ack=False), Sink(auto_ack=False)
            options = SubscribeOptions(name="workers", consume=ConsumeOptions(prefetch=1))
            await c1.subscribe("jobs.*", a, options, nothing)
            await c2.subscribe("jobs.*", b, options, nothing)
            await publish(pub, "jobs.x", *range(1, 21))

            async def settle(sink: Sink) -> None:
                done = 0
                while len(a) + len(b) < 20 or done < len(sink):
                    if done < len(sink):
                        await asyncio.sleep(0.002)  # a little work
                        await sink.deliveries[done].ack()
                        done += 1
                    else:
                        await asyncio.sleep(0.005)

            await asyncio.gather(settle(a), settle(b))
            assert sorted(int(x) for x in a.bodies + b.bodies) == list(range(1, 21))
            assert a.bodies and b.bodies, "one subscriber got everything"
        finally:
            for t in (pub, c1, c2):
                await t.close()

    run(main)


def test_durable_block_refuses_publishes_with_backpressure(place: Place) -> None:
    async def main() -> None:
        pub, sub = await place.transport(), await place.transport()
        try:
            sink = Sink(auto_ack=False)
            options = SubscribeOptions(
                name="slow", policy="block", buffer=2, consume=ConsumeOptions(prefetch=1)
            )
            await sub.subscribe("orders", sink, options, nothing)
            await publish(pub, "orders", 1, 2, 3)  # the one held and the buffer of 2
            with pytest.raises(Backpressure):
                await pub.publish_nowait("orders", message(4))
            with pytest.raises(Backpressure):
                await pub.publish_nowait("orders", message(4))
            assert pub.stats()["topics"]["refused"] == 2
            await wait_until(lambda: len(sink) == 1, "the first")
            await sink.deliveries[0].ack()  # room for one

            async def room() -> None:
                while True:
                    try:
                        await pub.publish_nowait("orders", message(4))
                        return
                    except Backpressure:
                        await asyncio.sleep(0.01)

            await asyncio.wait_for(room(), 5.0)
            for n in range(2, 5):
                await wait_until(lambda n=n: len(sink) == n, f"delivery {n}")
                await sink.deliveries[-1].ack()
            assert sink.bodies == ["1", "2", "3", "4"]
            assert sink.seqs == [1, 2, 3, 4]  # refused publishes used no number
        finally:
            await pub.close()
            await sub.close()

    run(main)


def test_durable_reject_dead_letters(place: Place) -> None:
    async def main() -> None:
        t = await place.transport()
        try:
            sink = Sink(auto_ack=False)
            await t.subscribe("mail", sink, SubscribeOptions(name="mailer"), nothing)
            await publish(t, "mail", "poison")
            await wait_until(lambda: len(sink) == 1, "the delivery")
            await sink.deliveries[0].nack(delay=0.0)
            await wait_until(lambda: len(sink) == 2, "the redelivery")
            assert sink.deliveries[1].message.attempt == 2
            await sink.deliveries[1].reject("bad")
            dead = Sink()
            await t.consume("mailer.dead", dead, ConsumeOptions())
            await wait_until(lambda: len(dead) == 1, "the dead letter")
            assert dead.bodies == ["poison"]
            assert dead.deliveries[0].message.headers[headers.DEAD_REASON] == "bad"
            assert t.stats()["topics"]["dead_lettered"] == 1
        finally:
            await t.close()

    run(main)


# -- request_all ------------------------------------------------------------


def test_request_all_asks_every_server(place: Place) -> None:
    async def main() -> None:
        s1, s2, caller = [await place.transport() for _ in range(3)]
        try:

            def answer(name: str) -> Any:
                async def handler(request: Message) -> Message:
                    if request.body == b"fail":
                        raise ValueError(f"{name} failed")
                    return message(name)

                return handler

            await s1.serve("census", answer("a"))
            await s2.serve("census", answer("b"))
            replies = await caller.request_all("census", message("who"), timeout=1.0, min_replies=2)
            assert sorted(r.body for r in replies) == [b"a", b"b"]
            # request() still reaches one of them only
            reply = await caller.request("census", message("who"), timeout=2.0)
            assert reply.body in (b"a", b"b")
            # A server whose handler failed gives no reply; it is counted.
            failed = await caller.request_all("census", message("fail"), timeout=1.0, min_replies=0)
            assert failed == []
            assert caller.stats()["request_all_rejected"] == 2
            with pytest.raises(Timeout, match="2 servers failed it"):
                await caller.request_all("census", message("fail"), timeout=1.0, min_replies=1)

            started = time.monotonic()
            with pytest.raises(NoResponders):
                await caller.request_all("nobody", message("x"), timeout=10.0, min_replies=0)
            assert time.monotonic() - started < 1.0
            with pytest.raises(Timeout):
                await caller.request_all("census", message("x"), timeout=0.3, min_replies=3)
        finally:
            for t in (s1, s2, caller):
                await t.close()

    run(main)
