"""Publish-subscribe on the blocking twin: ``pigeon.sync`` publishes,
subscribes with plain handlers run in threads, iterates a subscription with
a plain ``for`` loop, keeps history and scatters requests to every server."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import pigeon
import pigeon.sync
from pigeon.message import new_id

WAIT = 10.0


def memory() -> str:
    return f"memory://sync-pubsub-{new_id()}"


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def test_publish_reaches_a_plain_subscriber_in_a_thread() -> None:
    got: list[tuple[str, int, int, Any]] = []
    kinds: set[type] = set()
    threads: set[threading.Thread] = set()
    with pigeon.sync.connect(memory()) as conn:

        def handle(event: pigeon.sync.Delivery) -> None:
            assert isinstance(event, pigeon.sync.Event)
            kinds.add(type(event))
            threads.add(threading.current_thread())
            got.append((event.topic, event.seq, event.missed, event.decode()))

        subscriber = conn.subscribe("orders.*", handle)
        assert isinstance(subscriber, pigeon.sync.Subscriber)
        assert subscriber.pattern == "orders.*"
        for i in range(3):
            conn.publish("orders.new", {"i": i})
        future = conn.publish_nowait("orders.eu", "x")
        assert isinstance(future, concurrent.futures.Future)
        future.result(WAIT)
        conn.publish("orders.eu.new", "not matched: * is one segment")
        wait_for(lambda: len(got) == 4, "four events")
        wait_for(lambda: subscriber.stats()["acked"] == 4, "four acks")
        stats = subscriber.stats()
        assert stats["pattern"] == "orders.*" and stats["gaps"] == 0
        assert subscriber.disconnected is None
        assert subscriber.idle
    assert sorted(got, key=lambda g: (g[0], g[1])) == [
        ("orders.eu", 1, 0, "x"),
        ("orders.new", 1, 0, {"i": 0}),
        ("orders.new", 2, 0, {"i": 1}),
        ("orders.new", 3, 0, {"i": 2}),
    ]
    assert kinds == {pigeon.sync.Event}
    assert threading.main_thread() not in threads


def test_a_plain_subscriber_settles_by_hand_and_is_retried() -> None:
    attempts: list[int] = []
    settled: list[bool] = []
    with pigeon.sync.connect(memory()) as conn:

        def handle(event: pigeon.sync.Delivery) -> None:
            attempts.append(event.message.attempt)
            if event.message.attempt == 1:
                raise RuntimeError("fails once")
            event.ack()
            settled.append(event.settled)

        retry = pigeon.RetryPolicy(max_attempts=3, base_delay=0.01, jitter=0.0)
        subscriber = conn.subscribe("jobs.>", handle, retry=retry)
        conn.publish("jobs.a", 1)
        wait_for(lambda: settled == [True], "the ack by hand after a retry")
        time.sleep(0.1)  # nothing more comes: the ack by hand held
        assert attempts == [1, 2]
        stats = subscriber.stats()
        assert stats["retried"] == 1 and stats["handler_errors"] == 1
        assert stats["received"] == 2 and stats["dead_lettered"] == 0


def test_sync_errors_of_publish_and_subscribe_reach_the_caller() -> None:
    with pigeon.sync.connect(memory()) as conn:
        for bad in ["a..b", "a.*", "a b"]:
            with pytest.raises(ValueError):
                conn.publish(bad, 1)
            with pytest.raises(ValueError):
                conn.publish_nowait(bad, 1)
        with pytest.raises(pigeon.ConfigurationError):
            conn.subscribe("a.>.b", lambda e: None)
        with pytest.raises(pigeon.ConfigurationError):
            conn.subscribe("a.>", lambda e: None, policy="sometimes")
        with pytest.raises(TypeError):
            conn.subscribe("a.>", "not callable")  # type: ignore[arg-type]


def test_subscription_iterator_replays_the_last_then_goes_live() -> None:
    with pigeon.sync.connect(memory()) as conn:
        conn.retain("prices.>", max_count=3)
        for i in range(5):
            conn.publish("prices.eur", i)  # seq 1..5; 3..5 are kept
        seen: list[tuple[str, int, int, Any]] = []
        with conn.subscription("prices.>", last=2) as events:
            assert isinstance(events, pigeon.sync.EventStream)
            conn.publish("prices.eur", 5)  # live, after the replay: seq 6
            for event in events:
                assert isinstance(event, pigeon.sync.Event)
                seen.append((event.topic, event.seq, event.missed, event.decode()))
                if event.seq == 6:
                    break
            subscriber = events.subscriber
            assert isinstance(subscriber, pigeon.sync.Subscriber)
            # Each event is acked when the loop asks for the next: two so far.
            assert events.stats()["acked"] == 2
        assert seen == [
            ("prices.eur", 4, 0, 3),
            ("prices.eur", 5, 0, 4),
            ("prices.eur", 6, 0, 5),
        ]
        # Leaving the with acked the last one and ended the subscription.
        assert subscriber.stats()["acked"] == 3
        with pytest.raises(pigeon.ReplayTrimmed):
            conn.subscribe("prices.>", lambda e: None, from_seq=1)


def test_subscription_without_with_and_a_failing_body() -> None:
    with pigeon.sync.connect(memory()) as conn:
        events = conn.subscription("news.*")
        with pytest.raises(RuntimeError, match="not started"):
            events.subscriber  # noqa: B018 - the property raises
        conn.publish("news.a", "before: not seen")
        stream = iter(events)  # starts on the first next()
        consumer: concurrent.futures.Future[pigeon.sync.Event]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            consumer = pool.submit(next, stream)
            wait_for(lambda: _started(events), "the subscription to start")
            conn.publish("news.a", "live")
            first = consumer.result(WAIT)
        assert (first.topic, first.seq, first.decode()) == ("news.a", 2, "live")
        first.nack(reason="by hand")  # settled by hand: the loop does not ack it
        again = next(events)
        assert again.seq == 2 and again.message.attempt == 2
        events.close()
        assert events.subscriber.closed  # closed: it stopped (its stats stay)

        with pytest.raises(ZeroDivisionError):
            with conn.subscription("news.*") as failing:
                running = failing.subscriber
                conn.publish("news.b", "boom")
                for _ in failing:
                    1 / 0  # noqa: B018 - the body fails on the event
        assert failing.subscriber.closed
        # The body's error went to the retry policy, as a handler's would.
        assert running.stats()["handler_errors"] == 1
        assert running.stats()["acked"] == 0


def _started(events: pigeon.sync.EventStream) -> bool:
    try:
        events.subscriber  # noqa: B018 - the property raises until started
    except RuntimeError:
        return False
    return True


def test_wait_disconnected_on_a_slow_disconnect_subscriber() -> None:
    release = threading.Event()
    with pigeon.sync.connect(memory()) as conn:
        subscriber = conn.subscribe(
            "slow.t",
            lambda e: release.wait(WAIT),
            buffer=2,
            prefetch=1,
            policy="disconnect",
        )
        for i in range(10):
            conn.publish("slow.t", i)
        error = subscriber.wait_disconnected()
        release.set()
        assert isinstance(error, pigeon.SubscriberDisconnected)
        assert subscriber.disconnected is error
        assert subscriber.stats()["disconnected"] is True


def test_sync_request_all_gathers_every_server() -> None:
    with pigeon.sync.connect(memory()) as conn:
        conn.serve("who", lambda m: f"a:{m.decode()}")
        conn.serve("who", lambda m: f"b:{m.decode()}")

        def fail(message: pigeon.Message) -> None:
            raise ValueError("no")

        conn.serve("who", fail)
        replies = conn.request_all("who", "x", timeout=1.0)
        assert all(isinstance(r, pigeon.Message) for r in replies)
        assert sorted(r.decode() for r in replies) == ["a:x", "b:x"]
        with pytest.raises(pigeon.Timeout):
            conn.request_all("who", "x", timeout=0.3, min_replies=3)
        with pytest.raises(pigeon.NoResponders):
            conn.request_all("nobody", "x")
        with pytest.raises(pigeon.ConfigurationError):
            conn.request_all("who", "x", min_replies=-1)


# -- over ZeroMQ ----------------------------------------------------------


def test_sync_pubsub_over_tcp_between_a_node_and_a_client() -> None:
    """A node hosts the topics; a client connected to it publishes,
    subscribes, replays retained history and scatters requests, all with
    the blocking twin."""
    with pigeon.sync.connect(bind="tcp://127.0.0.1:0", heartbeat=0.2) as node:
        (address,) = node._conn.transport.bound  # type: ignore[attr-defined]
        node.serve("who", lambda m: "node")
        with pigeon.sync.connect(address, heartbeat=0.2) as client:
            got: list[tuple[str, int, Any]] = []
            client.subscribe("orders.*", lambda e: got.append((e.topic, e.seq, e.decode())))
            node_got: list[int] = []
            node.subscribe("orders.>", lambda e: node_got.append(e.seq))
            client.retain("prices.>", max_count=3)
            for i in range(3):
                client.publish("orders.new", i)
            client.publish_nowait("orders.eu", "x").result(WAIT)
            for i in range(5):
                node.publish("prices.eur", i)
            wait_for(lambda: len(got) == 4 and len(node_got) == 4, "every event")
            assert sorted(got, key=lambda g: (g[0], g[1])) == [
                ("orders.eu", 1, "x"),
                ("orders.new", 1, 0),
                ("orders.new", 2, 1),
                ("orders.new", 3, 2),
            ]
            seen: list[tuple[int, Any]] = []
            with client.subscription("prices.>", last=2) as events:
                for event in events:
                    assert isinstance(event, pigeon.sync.Event)
                    seen.append((event.seq, event.decode()))
                    if event.seq == 5:
                        break
            assert seen == [(4, 3), (5, 4)]
            client.serve("who", lambda m: "client")
            replies = client.request_all("who", "x", timeout=2.0, min_replies=2)
            assert sorted(r.decode() for r in replies) == ["client", "node"]
