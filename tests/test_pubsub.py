"""The publish-subscribe API on memory://, beyond the conformance suite:
argument checks, EventStream settling, subscriber and host counters,
durable names, and what leaving a subscription cleans up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import pigeon
from pigeon.message import new_id
from pigeon.testing.conformance import Inbox, wait_until

pytestmark = pytest.mark.timeout(60)


def run(body: Callable[[pigeon.Connection], Awaitable[None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(30):
            async with pigeon.connect(f"memory://pubsub-{new_id()}") as conn:
                await body(conn)

    asyncio.run(main())


def topics(conn: pigeon.Connection) -> dict[str, Any]:
    return dict(conn.stats()["topics"])


# -- bad arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "rule"),
    [
        ("", "1 to 255 characters"),
        ("a..b", "dot-separated segments"),
        ("a b", "without spaces"),
        ("orders.*", "wildcards for subscriptions"),
        ("orders.>", "wildcards for subscriptions"),
    ],
)
def test_publishing_to_an_invalid_topic_names_the_rule(topic: str, rule: str) -> None:
    async def body(conn: pigeon.Connection) -> None:
        for publish in (
            lambda: conn.publish_nowait(topic, "x"),
            lambda: conn.publish(topic, "x"),
        ):
            with pytest.raises(pigeon.ConfigurationError, match="topic") as info:
                outcome = publish()
                if asyncio.iscoroutine(outcome):
                    await outcome
            assert rule in str(info.value)
            assert isinstance(info.value, ValueError)
        assert topics(conn)["published"] == 0

    run(body)


def test_a_topic_that_is_not_a_str_is_a_type_error() -> None:
    async def body(conn: pigeon.Connection) -> None:
        with pytest.raises(TypeError):
            conn.publish_nowait(42, "x")  # type: ignore[arg-type]

    run(body)


@pytest.mark.parametrize(
    ("pattern", "rule"),
    [
        ("a.>.b", "'>' may only be the last segment"),
        ("a*", "must be whole segments"),
        ("a..*", "each non-empty"),
        ("", "1 to 255 characters"),
    ],
)
def test_subscribing_to_an_invalid_pattern_names_the_rule(pattern: str, rule: str) -> None:
    async def body(conn: pigeon.Connection) -> None:
        with pytest.raises(pigeon.ConfigurationError, match="pattern") as info:
            await conn.subscribe(pattern, Inbox())
        assert rule in str(info.value)
        with pytest.raises(pigeon.ConfigurationError, match="pattern"):
            async with conn.subscription(pattern):
                pass
        with pytest.raises(pigeon.ConfigurationError, match="pattern"):
            await conn.retain(pattern, max_count=1)
        assert topics(conn)["subscriptions"] == {}

    run(body)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"policy": "drop-newest"}, "policy must be one of"),
        ({"buffer": 0}, "buffer must be an int"),
        ({"buffer": True}, "buffer must be an int"),
        ({"from_seq": 1, "last": 2}, "give one of"),
        ({"from_seq": 0}, "from_seq must be an int >= 1"),
        ({"last": -1}, "last must be an int >= 1"),
        ({"from_time": float("nan")}, "from_time must be a time"),
        ({"prefetch": 0}, "prefetch must be an int >= 1"),
        ({"lease_ttl": 0}, "lease_ttl must be a number of seconds"),
        ({"name": "a b"}, "subscription name"),
    ],
)
def test_bad_subscribe_options(options: dict[str, Any], says: str) -> None:
    async def body(conn: pigeon.Connection) -> None:
        with pytest.raises(pigeon.ConfigurationError, match=says):
            await conn.subscribe("a.b", Inbox(), **options)
        assert topics(conn)["subscriptions"] == {}

    run(body)


def test_bad_retention() -> None:
    async def body(conn: pigeon.Connection) -> None:
        with pytest.raises(
            pigeon.ConfigurationError, match="needs max_count, max_bytes or max_age"
        ):
            await conn.retain("a.>")
        with pytest.raises(pigeon.ConfigurationError, match="max_age"):
            await conn.retain("a.>", max_age=0)

    run(body)


def test_a_durable_name_with_another_pattern_is_refused() -> None:
    async def body(conn: pigeon.Connection) -> None:
        await conn.subscribe("orders.*", Inbox(), name="audit")
        with pytest.raises(pigeon.ConfigurationError, match="exists for pattern 'orders.\\*'"):
            await conn.subscribe("orders.>", Inbox(), name="audit")
        await conn.subscribe("orders.*", Inbox(), name="audit")  # the same pattern shares it
        rows = topics(conn)["subscriptions"]
        assert [(r["pattern"], r["durable"]) for r in rows.values()] == [("orders.*", True)]

    run(body)


# -- EventStream ----------------------------------------------------------------------


def test_event_stream_acks_an_event_when_the_loop_asks_for_the_next() -> None:
    async def body(conn: pigeon.Connection) -> None:
        async with conn.subscription("prices.>") as events:
            for i in range(3):
                await conn.publish("prices.eur", i)
            seen: list[tuple[int, int]] = []
            async for event in events:
                # The event the loop holds is not acked yet; the one before is.
                seen.append((event.seq, events.stats()["acked"]))
                assert event.topic == "prices.eur" and event.decode() == event.seq - 1
                if event.seq == 3:
                    break
            assert seen == [(1, 0), (2, 1), (3, 2)]
        # Leaving after it acked the last one too.
        assert conn.stats()["workers"][0]["acked"] == 3

    run(body)


def test_an_exception_in_the_loop_body_retries_the_event() -> None:
    async def body(conn: pigeon.Connection) -> None:
        retry = pigeon.RetryPolicy(max_attempts=3, base_delay=0.01, jitter=0.0)
        # A durable name, so the retried event waits for the next loop.
        with pytest.raises(RuntimeError, match="handler failed"):
            async with conn.subscription("jobs.*", name="jobs", retry=retry) as events:
                await conn.publish("jobs.a", "work")
                async for event in events:
                    assert (event.message.attempt, event.message.redelivered) == (1, False)
                    raise RuntimeError("handler failed")
        first = events.stats()
        assert (first["retried"], first["acked"], first["handler_errors"]) == (1, 0, 1)
        async with conn.subscription("jobs.*", name="jobs", retry=retry) as events:
            async for event in events:
                assert event.decode() == "work"
                assert (event.message.attempt, event.message.redelivered) == (2, True)
                assert event.seq == 1 and event.missed == 0
                break
        assert events.stats()["acked"] == 1
        # The first, ended, was let go when the second started.
        assert [w["acked"] for w in conn.stats()["workers"]] == [1]

    run(body)


def test_event_stream_settled_by_hand_is_not_acked_again() -> None:
    async def body(conn: pigeon.Connection) -> None:
        async with conn.subscription("t.*") as events:
            await conn.publish("t.a", "bad")
            await conn.publish("t.b", "good")
            async for event in events:
                if event.decode() == "bad":
                    await event.reject("not wanted")
                    continue
                break
        stats = conn.stats()["workers"][0]
        assert (stats["received"], stats["acked"], stats["dead_lettered"]) == (2, 1, 0)

    run(body)


def test_event_stream_raises_when_cut_off() -> None:
    async def body(conn: pigeon.Connection) -> None:
        async with conn.subscription("feed", policy="disconnect", buffer=2, prefetch=1) as events:
            await conn.publish("feed", 0)
            with pytest.raises(pigeon.SubscriberDisconnected, match="fell 2 messages behind"):
                async for event in events:
                    for i in range(1, 10):  # while the loop holds the first one
                        await conn.publish("feed", i)
                    assert event.seq == 1
        assert topics(conn)["disconnected"] == 1

    run(body)


def test_event_stream_subscriber_before_start() -> None:
    async def body(conn: pigeon.Connection) -> None:
        stream = conn.subscription("a")
        with pytest.raises(RuntimeError, match="has not started"):
            stream.subscriber  # noqa: B018
        async with stream:
            assert stream.subscriber.pattern == "a"

    run(body)


# -- leaving a subscription -------------------------------------------------------------


def test_leaving_a_subscription_removes_it() -> None:
    async def body(conn: pigeon.Connection) -> None:
        async with conn.subscription("news.*") as events:
            assert [r["pattern"] for r in topics(conn)["subscriptions"].values()] == ["news.*"]
            await conn.publish("news.a", 1)
            await conn.publish("news.a", 2)
            async for _event in events:
                break  # leaves one event unread in the subscription
        assert topics(conn)["subscriptions"] == {}
        assert conn.stats()["queues"].get("pigeon.tmp", None) is None
        for queue, row in conn.stats()["queues"].items():
            assert not (queue.startswith("pigeon.tmp.") and row.get("ready")), (queue, row)
        await conn.publish("news.a", 3)
        assert topics(conn)["unrouted"] == 1

    run(body)


def test_closing_a_subscriber_removes_its_own_subscription_but_keeps_a_durable_one() -> None:
    async def body(conn: pigeon.Connection) -> None:
        own = await conn.subscribe("a.*", Inbox())
        durable = await conn.subscribe("a.*", Inbox(), name="keep")
        await own.close()
        await durable.close()
        rows = topics(conn)["subscriptions"]
        assert [(r["pattern"], r["durable"]) for r in rows.values()] == [("a.*", True)]
        await conn.publish("a.x", "kept for the next subscriber")
        again = Inbox()
        await conn.subscribe("a.*", again, name="keep")
        await again.wait(1)
        assert again.payloads == ["kept for the next subscriber"]

    run(body)


# -- counters ---------------------------------------------------------------------------


def test_subscriber_stats_count_gaps_and_missed() -> None:
    async def body(conn: pigeon.Connection) -> None:
        release = asyncio.Event()
        got = Inbox()

        async def slow(event: pigeon.Event) -> None:
            await got(event)
            await release.wait()

        subscriber = await conn.subscribe("ticks", slow, buffer=2, prefetch=1)
        await conn.publish("ticks", 1)
        await got.wait(1)
        for i in range(2, 11):  # 2..8 are dropped: 9 and 10 wait
            await conn.publish("ticks", i)
        release.set()
        await got.wait(3)
        assert got.seqs == [1, 9, 10]
        assert got.missed == [0, 7, 0]
        stats = subscriber.stats()
        assert {k: stats[k] for k in ("gaps", "missed", "repeats", "unnumbered")} == {
            "gaps": 1,
            "missed": 7,
            "repeats": 0,
            "unnumbered": 0,
        }
        assert (stats["pattern"], stats["name"], stats["disconnected"]) == ("ticks", None, False)
        assert stats["acked"] == 3
        host = topics(conn)
        assert host["dropped"] == 7
        assert [r["dropped"] for r in host["subscriptions"].values()] == [7]

    run(body)


def test_host_stats_count_blocked_and_disconnected() -> None:
    async def body(conn: pigeon.Connection) -> None:
        release = asyncio.Event()
        held = Inbox()

        async def stuck(event: pigeon.Event) -> None:
            await held(event)
            await release.wait()

        await conn.subscribe("blk", stuck, policy="block", buffer=1, prefetch=1)
        cut = await conn.subscribe("cut", stuck, policy="disconnect", buffer=1, prefetch=1)
        await conn.publish("blk", 1)
        await held.wait(1)  # (the buffer counts what is not handed to the subscriber yet)
        await conn.publish("blk", 2)  # fills the buffer
        with pytest.raises(pigeon.Backpressure):
            conn.publish_nowait("blk", 3)
        with pytest.raises(pigeon.Timeout, match="no room to publish"):
            await conn.publish("blk", 3, timeout=0.1)
        await conn.publish("cut", 1)
        await held.wait(2)
        await conn.publish("cut", 2)  # fills the buffer
        await conn.publish("cut", 3)  # one too many: cut off
        error = await asyncio.wait_for(cut.wait_disconnected(), 5)
        assert error.pattern == "cut" and "fell 1 messages behind" in error.reason
        release.set()
        host = topics(conn)
        assert host["blocked"] >= 2  # the nowait one and the tries of the timed-out one
        assert host["disconnected"] == 1
        assert host["published"] == 2 + 3  # refused publishes are not published
        assert host["unrouted"] == 0
        assert [r["pattern"] for r in host["subscriptions"].values()] == ["blk"]
        await conn.publish("unheard", 1)
        assert topics(conn)["unrouted"] == 1

    run(body)


def test_host_stats_count_retained_history() -> None:
    async def body(conn: pigeon.Connection) -> None:
        await conn.retain("r.>", max_count=2)
        for i in range(5):
            await conn.publish("r.a", i)
        await conn.publish("r.b", 0)
        host = topics(conn)
        assert (host["retained_topics"], host["retained_messages"], host["trimmed"]) == (2, 3, 3)
        with pytest.raises(pigeon.ReplayTrimmed) as info:
            await conn.subscribe("r.a", Inbox(), from_seq=2)
        assert info.value.first_retained == 4
        assert topics(conn)["subscriptions"] == {}  # nothing is left of a refused subscription

    run(body)


# -- request_all ----------------------------------------------------------------------------


def test_request_all_leaves_out_failing_servers() -> None:
    async def body(conn: pigeon.Connection) -> None:
        def fails(message: pigeon.Message) -> str:
            raise KeyError("boom")

        await conn.serve("census", lambda m: "a")
        await conn.serve("census", fails)
        replies = await conn.request_all("census", "?", timeout=1.0)
        assert [r.text for r in replies] == ["a"]
        with pytest.raises(pigeon.Timeout, match="1 of the 2 replies"):
            await conn.request_all("census", "?", timeout=0.5, min_replies=2)
        with pytest.raises(pigeon.ConfigurationError, match="min_replies"):
            await conn.request_all("census", "?", min_replies=-1)

    run(body)


def test_publish_before_start_and_after_close() -> None:
    async def main() -> None:
        conn = pigeon.connect(f"memory://pubsub-{new_id()}")
        with pytest.raises(pigeon.NotStartedError):
            conn.publish_nowait("a", 1)
        await conn.start()
        await conn.close()
        with pytest.raises(pigeon.ClosedError):
            await conn.publish("a", 1)
        with pytest.raises(pigeon.ClosedError):
            await conn.subscribe("a", Inbox())

    asyncio.run(main())


def test_wait_until_is_what_the_tests_use() -> None:
    # (conformance.wait_until is the suite's bounded poll; a quick self-check.)
    async def main() -> None:
        with pytest.raises(AssertionError, match="never"):
            await wait_until(lambda: False, timeout=0.05, what="never")

    asyncio.run(main())


# -- each subscription its own copy, and drops told in the next message --------------


def test_each_subscription_counts_its_own_attempts() -> None:
    async def body(conn: pigeon.Connection) -> None:
        a, b = Inbox(), Inbox()
        await conn.subscribe("t", a)
        await conn.subscribe("t", b)
        await conn.publish("t", 1)
        await a.wait(1)
        await b.wait(1)
        attempts = [(e.message.attempt, e.message.redelivered) for e in a.events + b.events]
        assert attempts == [(1, False), (1, False)]

    run(body)


def test_replaying_does_not_wear_out_the_history() -> None:
    async def body(conn: pigeon.Connection) -> None:
        await conn.retain("r", max_count=1)
        await conn.publish("r", "kept")
        for _ in range(6):
            got = Inbox()
            subscriber = await conn.subscribe("r", got, last=1)
            await got.wait(1)
            assert (got.events[0].message.attempt, got.events[0].message.redelivered) == (1, False)
            await subscriber.close()

    run(body)


def test_drops_before_the_first_delivery_are_counted_missed() -> None:
    """A subscriber whose very first messages were dropped (it joined, and
    fell behind at once) is told of them: the host counts each drop into
    the next message the subscription hands out."""

    async def body(conn: pigeon.Connection) -> None:
        got = Inbox()
        held = asyncio.Event()

        async def slow(event: pigeon.Event) -> None:
            await held.wait()
            await got(event)

        subscriber = await conn.subscribe("burst", slow, buffer=5, prefetch=1)
        for i in range(1, 21):
            conn.publish_nowait("burst", i)  # a burst: nothing runs in between
        held.set()
        await wait_until(lambda: 20 in got.seqs, what="the last one")
        dropped = topics(conn)["dropped"]
        assert dropped == 15  # 20, less the buffer of 5 (none was handed out yet)
        stats = subscriber.stats()
        assert (stats["missed"], stats["gaps"]) == (15, 1)
        assert len(got) + stats["missed"] == 20, (got.seqs, stats)

    run(body)


def test_a_shared_subscription_sees_no_false_gaps() -> None:
    """Subscribers sharing a named subscription each see part of a topic's
    numbers; only what the host dropped is missed."""

    async def body(conn: pigeon.Connection) -> None:
        one, two = Inbox(), Inbox()
        first = await conn.subscribe("shared", one, name="both")
        second = await conn.subscribe("shared", two, name="both")
        for i in range(20):
            await conn.publish("shared", i)
        await wait_until(lambda: len(one) + len(two) == 20, what="all 20 between them")
        assert one.seqs and two.seqs
        for subscriber in (first, second):
            assert (subscriber.stats()["gaps"], subscriber.stats()["missed"]) == (0, 0)

    run(body)
