"""A plain (def) App handler runs in a thread; the delivery it gets settles
for real from there: reject() dead-letters, nack() redelivers, ack() acks."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import pigeon
import pigeon.sync
from pigeon._core import headers
from pigeon.message import new_id
from pigeon.testing.conformance import wait_until

URLS: dict[str, Callable[[], dict[str, Any]]] = {
    "memory": lambda: {"url": f"memory://app-sync-{new_id()}"},
    "tcp": lambda: {"bind": "tcp://127.0.0.1:0", "heartbeat": 0.2},
}


@pytest.mark.parametrize("transport", URLS)
@pytest.mark.parametrize(
    "annotation", [pigeon.Delivery, pigeon.sync.Delivery], ids=["Delivery", "sync.Delivery"]
)
def test_plain_handler_reject_dead_letters(transport: str, annotation: type) -> None:
    app = pigeon.App(**URLS[transport]())
    seen: dict[str, Any] = {}

    def reject_it(delivery):  # noqa: ANN001,ANN202 - annotated below, per parameter
        seen["thread"] = threading.current_thread()
        seen["type"] = type(delivery)
        delivery.reject("not wanted")
        seen["settled"] = delivery.settled

    reject_it.__annotations__ = {"delivery": annotation, "return": None}
    app.worker("jobs")(reject_it)

    async def scenario() -> None:
        conn = await app.start()
        dead: list[pigeon.Message] = []
        try:
            await conn.consume(pigeon.dead_letter_queue("jobs"), lambda d: dead.append(d.message))
            await conn.send("jobs", "poison")
            await wait_until(lambda: len(dead) == 1, 5, "the dead letter")
            assert dead[0].text == "poison"
            assert dead[0].headers[headers.DEAD_REASON] == "not wanted"
            await asyncio.sleep(0.1)
            (worker,) = [w for w in conn.stats()["workers"] if w["queue"] == "jobs"]
            assert worker["acked"] == 0 and worker["received"] == 1
        finally:
            await app.stop()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unawaited settle coroutine would warn
        asyncio.run(scenario())
    assert seen["type"] is pigeon.sync.Delivery
    assert seen["thread"] is not threading.main_thread()
    assert seen["settled"] is True


def test_plain_handler_nack_then_ack_by_hand() -> None:
    app = pigeon.App(f"memory://app-sync-{new_id()}")
    attempts: list[int] = []

    @app.worker("jobs")
    def handle(delivery: pigeon.sync.Delivery) -> None:
        attempts.append(delivery.message.attempt)
        if len(attempts) == 1:
            delivery.nack(delay=0.05, reason="later")
        else:
            delivery.extend()
            delivery.ack()
            with pytest.raises(pigeon.LocalProtocolError):
                delivery.ack()

    async def scenario() -> None:
        conn = await app.start()
        try:
            await conn.send("jobs", "x")
            await wait_until(lambda: len(attempts) == 2, 5, "the redelivery")
            await asyncio.sleep(0.1)
            assert conn.stats()["workers"][0]["acked"] == 0  # settled by hand
            assert conn.stats()["queues"]["jobs"]["acked"] == 1
        finally:
            await app.stop()

    asyncio.run(scenario())
    assert attempts == [1, 2]


def test_handlers_that_cannot_get_what_they_ask_for_are_refused_at_once() -> None:
    app = pigeon.App("memory://app-refused")

    with pytest.raises(TypeError, match="gets a Message"):

        @app.service("svc")
        def wants_delivery(delivery: pigeon.Delivery) -> None: ...

    with pytest.raises(TypeError, match="pigeon.sync.Delivery is for plain"):

        @app.worker("q")
        async def blocking_in_async(delivery: pigeon.sync.Delivery) -> None: ...


def test_decorators_return_the_function_unchanged() -> None:
    app = pigeon.App("memory://app-same")

    def double(n: int) -> int:
        return n * 2

    async def process(word: str) -> None: ...

    assert app.service("double")(double) is double
    assert app.worker("words")(process) is process
    assert double(2) == 4
