"""``@app.subscriber`` and ``app.retain``: subscribers declared on an App are
started with it and get what is published, in whatever form their first
parameter asks for, as workers' handlers do."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
from collections.abc import Callable
from typing import Any

import pytest

import pigeon
import pigeon.sync
from pigeon.message import new_id
from pigeon.testing.conformance import wait_until

WAIT = 10.0


@dataclasses.dataclass
class Price:
    sku: str
    cents: int


def memory() -> str:
    return f"memory://app-pubsub-{new_id()}"


URLS: dict[str, Callable[[], dict[str, Any]]] = {
    "memory": lambda: {"url": memory()},
    "tcp": lambda: {"bind": "tcp://127.0.0.1:0", "heartbeat": 0.2},
}


@pytest.mark.parametrize("transport", URLS)
def test_app_subscribers_get_what_is_published(transport: str) -> None:
    app = pigeon.App(**URLS[transport]())
    got: dict[str, list[Any]] = {"event": [], "sync": [], "typed": [], "plain": []}
    threads: list[threading.Thread] = []

    @app.subscriber("prices.>")
    async def on_event(event: pigeon.Event) -> None:
        got["event"].append((type(event), event.topic, event.seq, event.missed))

    @app.subscriber("prices.*", concurrency=2)
    def on_sync(event: pigeon.sync.Event) -> None:
        threads.append(threading.current_thread())
        got["sync"].append((type(event), event.topic, event.seq))

    @app.subscriber("prices.eur")
    def typed(price: Price) -> None:
        got["typed"].append(price)

    @app.subscriber("prices.>")
    async def plain(body):  # noqa: ANN001,ANN202 - the decoded body
        got["plain"].append(body)

    async def scenario() -> None:
        conn = await app.start()
        try:
            for cents in (100, 101):
                await conn.publish("prices.eur", {"sku": "a", "cents": cents})
            await conn.publish("prices.usd.x", {"sku": "b", "cents": 7})
            await wait_until(
                lambda: (
                    len(got["event"]) == 3
                    and len(got["sync"]) == 2
                    and len(got["typed"]) == 2
                    and len(got["plain"]) == 3
                ),
                WAIT,
                "every subscriber's events",
            )
            stats = conn.stats()["workers"]
            assert sorted(w["pattern"] for w in stats) == sorted(
                ["prices.>", "prices.*", "prices.eur", "prices.>"]
            )
        finally:
            await app.stop()

    asyncio.run(scenario())
    assert sorted(got["event"], key=lambda g: (g[1], g[2])) == [
        (pigeon.Event, "prices.eur", 1, 0),
        (pigeon.Event, "prices.eur", 2, 0),
        (pigeon.Event, "prices.usd.x", 1, 0),
    ]
    assert sorted(got["sync"], key=lambda g: g[2]) == [
        (pigeon.sync.Event, "prices.eur", 1),
        (pigeon.sync.Event, "prices.eur", 2),
    ]
    assert threading.main_thread() not in threads
    assert sorted(got["typed"], key=lambda p: p.cents) == [Price("a", 100), Price("a", 101)]
    assert sorted(p["cents"] for p in got["plain"]) == [7, 100, 101]


@pytest.mark.parametrize("transport", URLS)
def test_app_retain_is_declared_at_start_and_subscriptions_replay_it(transport: str) -> None:
    app = pigeon.App(**URLS[transport]())
    app.retain("ticks.>", max_count=2)
    live: list[tuple[int, Any]] = []
    done = threading.Event()

    @app.subscriber("ticks.a", last=2, policy="block", buffer=16)
    def on_tick(event: pigeon.sync.Delivery) -> None:
        assert isinstance(event, pigeon.sync.Event)
        live.append((event.seq, event.decode()))
        if event.seq == 4:
            done.set()

    async def scenario() -> None:
        conn = await app.start()
        try:
            for i in range(3):
                await conn.publish("ticks.a", i)  # seq 1..3; 2 and 3 are kept
            async with conn.subscription("ticks.>", last=2) as events:
                seen = []
                async for event in events:
                    seen.append((event.seq, event.decode()))
                    if event.seq == 3:
                        break
            assert seen == [(2, 1), (3, 2)]
            await conn.publish("ticks.a", 3)  # seq 4
            await wait_until(done.is_set, WAIT, "the last tick")
        finally:
            await app.stop()

    asyncio.run(scenario())
    # The app's subscriber started before anything was published: it had no
    # history to replay, and got every tick live.
    assert live == [(1, 0), (2, 1), (3, 2), (4, 3)]


def test_app_run_async_starts_subscribers_and_stops_them() -> None:
    app = pigeon.App(memory())
    got: list[str] = []

    @app.subscriber("log.*", name="durable-log")
    async def record(line: str) -> None:
        got.append(line)

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.ensure_future(app.run_async(stop))
        await wait_until(lambda: app.connection is not None, WAIT, "the app to start")
        await wait_until(
            lambda: bool(app.connection and app.connection.stats()["workers"]),
            WAIT,
            "the subscriber to start",
        )
        assert app.connection is not None
        await app.connection.publish("log.info", "hello")
        await wait_until(lambda: got == ["hello"], WAIT, "the line")
        (stats,) = app.connection.stats()["workers"]
        assert stats["name"] == "durable-log"
        stop.set()
        await asyncio.wait_for(running, WAIT)

    asyncio.run(scenario())


def test_app_subscriber_takes_the_options_of_connection_subscribe() -> None:
    def options(fn: Any, skip: int) -> list[tuple[str, Any, Any]]:
        params = list(inspect.signature(fn).parameters.values())[skip:]
        return [(p.name, p.kind, p.default) for p in params]

    # Connection.subscribe(self, pattern, handler, *, ...) and
    # App.subscriber(self, pattern, *, ...): the same pattern and options,
    # but for concurrency, whose default in an app is the app's own
    # (App.configure(concurrency=), pigeon run --concurrency).
    connection = options(pigeon.Connection.subscribe, 1)
    del connection[1]  # handler
    keyword = inspect.Parameter.KEYWORD_ONLY
    assert ("concurrency", keyword, 1) in connection
    expected = [("concurrency", keyword, None) if o[0] == "concurrency" else o for o in connection]
    assert options(pigeon.App.subscriber, 1) == expected


def test_app_subscriber_options_are_checked_at_start() -> None:
    app = pigeon.App(memory())

    @app.subscriber("a.>", policy="sometimes")
    def never(event: pigeon.sync.Event) -> None: ...

    async def scenario() -> None:
        with pytest.raises(pigeon.ConfigurationError):
            await app.start()
        await app.stop()

    asyncio.run(scenario())


def test_events_are_for_subscribers_only() -> None:
    app = pigeon.App(memory())

    def wants_event(event: pigeon.Event) -> None: ...

    with pytest.raises(TypeError, match="not an Event"):
        app.worker("jobs")(wants_event)
    with pytest.raises(TypeError, match="gets a Message"):
        app.service("svc")(wants_event)

    async def async_wants_blocking(event: pigeon.sync.Event) -> None: ...

    with pytest.raises(TypeError, match=r"pigeon\.sync\.Event is for plain"):
        app.subscriber("a.>")(async_wants_blocking)
    # A plain handler may ask for either Event; it gets the blocking one.
    assert app.subscriber("a.>")(wants_event) is wants_event
