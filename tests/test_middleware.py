"""Middleware hooks and trace context propagation (without OpenTelemetry) on
every transport: memory, tcp (a binding node), NATS and RabbitMQ."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from brokers import opened

import pigeon
import pigeon.sync
from pigeon import tracing
from pigeon.testing.conformance import unique, wait_until

WAIT = 30.0
URLS = ["memory://mw", "bind", "nats", "amqp"]


class Recorder(pigeon.Middleware):
    """Writes down every hook call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.connected: list[pigeon.Connection] = []

    def on_connect(self, connection: pigeon.Connection) -> None:
        self.connected.append(connection)

    def before_handle(self, delivery: pigeon.Delivery) -> None:
        self.calls.append(("before_handle", delivery.message.text))

    def after_handle(
        self, delivery: pigeon.Delivery, outcome: pigeon.Outcome, seconds: float
    ) -> None:
        assert seconds >= 0.0
        self.calls.append(("after_handle", delivery.message.text, outcome))

    def on_retry(self, delivery: pigeon.Delivery, delay: float, error: str) -> None:
        self.calls.append(("on_retry", delivery.message.text, error))

    def on_dead_letter(self, delivery: pigeon.Delivery, reason: str) -> None:
        self.calls.append(("on_dead_letter", delivery.message.text))

    def on_send(self, queue: str, message: pigeon.Message) -> None:
        self.calls.append(("on_send", queue, message.text))

    def on_publish(self, topic: str, message: pigeon.Message) -> None:
        self.calls.append(("on_publish", topic))

    def before_request(self, service: str, message: pigeon.Message) -> None:
        self.calls.append(("before_request", service))

    def after_request(
        self, service: str, message: pigeon.Message, outcome: pigeon.RequestOutcome, seconds: float
    ) -> None:
        self.calls.append(("after_request", service, outcome))

    def before_serve(self, service: str, message: pigeon.Message) -> None:
        self.calls.append(("before_serve", service))

    def after_serve(
        self, service: str, message: pigeon.Message, outcome: pigeon.RequestOutcome, seconds: float
    ) -> None:
        self.calls.append(("after_serve", service, outcome))

    def named(self, hook: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] == hook]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("url", URLS)
def test_hooks_see_sends_handles_retries_dead_letters_and_requests(url: str) -> None:
    async def main() -> None:
        recorder = Recorder()
        queue, service = unique("mw-jobs"), unique("mw-svc")
        async with opened(url, middleware=[recorder]) as conn:
            assert recorder.connected == [conn]

            async def handle(delivery: pigeon.Delivery) -> None:
                if delivery.message.text == "bad":
                    raise ValueError("always bad")

            retry = pigeon.RetryPolicy(max_attempts=2, base_delay=0.01, jitter=0.0)
            await conn.consume(queue, handle, retry=retry)
            await conn.serve(service, lambda message: message.text.upper())
            await conn.send(queue, "good")
            await conn.send(queue, "bad")
            reply = await conn.request(service, "hi", timeout=WAIT)
            assert reply.text == "HI"
            with pytest.raises(pigeon.NoResponders):
                await conn.request(unique("nobody"), "x", timeout=5.0)
            await wait_until(
                lambda: len(recorder.named("after_handle")) == 3, WAIT, "three handled"
            )
        assert ("on_send", queue, "good") in recorder.calls
        assert ("on_send", queue, "bad") in recorder.calls
        assert ("after_handle", "good", pigeon.Outcome.ACKED) in recorder.calls
        assert ("after_handle", "bad", pigeon.Outcome.RETRIED) in recorder.calls
        assert ("after_handle", "bad", pigeon.Outcome.DEAD_LETTERED) in recorder.calls
        assert recorder.named("on_retry") == [("on_retry", "bad", "ValueError: always bad")]
        assert recorder.named("on_dead_letter") == [("on_dead_letter", "bad")]
        assert len(recorder.named("before_handle")) == 3
        assert ("after_request", service, pigeon.RequestOutcome.OK) in recorder.calls
        outcomes = [call[2] for call in recorder.named("after_request")]
        assert pigeon.RequestOutcome.NO_RESPONDERS in outcomes
        assert ("after_serve", service, pigeon.RequestOutcome.OK) in recorder.calls

    asyncio.run(main())


class Broken(pigeon.Middleware):
    def on_send(self, queue: str, message: pigeon.Message) -> None:
        raise RuntimeError("broken on_send")

    def before_handle(self, delivery: pigeon.Delivery) -> None:
        raise RuntimeError("broken before_handle")

    def after_handle(
        self, delivery: pigeon.Delivery, outcome: pigeon.Outcome, seconds: float
    ) -> None:
        raise RuntimeError("broken after_handle")


@pytest.mark.parametrize("url", ["memory://mw-broken", "bind"])
def test_a_hook_that_raises_is_counted_and_logged_and_loses_nothing(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> dict[str, Any]:
        recorder = Recorder()
        got: list[str] = []
        async with opened(url, middleware=[Broken(), recorder]) as conn:
            await conn.consume("mw-broken", lambda d: got.append(d.message.text))
            for n in range(20):
                await conn.send("mw-broken", str(n))
            await wait_until(lambda: len(got) == 20, WAIT, "20 handled")
            # The middleware after the broken one still ran every time.
            await wait_until(lambda: len(recorder.named("after_handle")) == 20, WAIT)
            return conn.stats()

    with caplog.at_level(logging.WARNING, logger="pigeon.middleware"):
        stats = asyncio.run(main())
    assert stats["hook_errors"] == 60  # three broken hooks, 20 messages
    warnings = [r for r in caplog.records if r.name == "pigeon.middleware"]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert "Broken.on_send raised" in warnings[0].getMessage()
    assert len(warnings) <= 10  # the first ones; the rest are counted only


def test_middleware_must_be_middleware() -> None:
    with pytest.raises(TypeError, match="pigeon.Middleware"):
        pigeon.connect("memory://x", middleware=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="pigeon.Middleware"):
        pigeon.App("memory://x", middleware=Recorder())  # type: ignore[arg-type]


def test_app_and_the_sync_twin_take_middleware() -> None:
    recorder = Recorder()
    with pigeon.sync.connect("memory://mw-sync", middleware=[recorder]) as conn:
        conn.send("mw-sync", "one")
    assert ("on_send", "mw-sync", "one") in recorder.calls

    app = pigeon.App("memory://mw-app")
    later = Recorder()
    app.use(later)
    done = threading.Event()

    @app.worker("mw-app")
    def work(text: str) -> None:
        done.set()

    async def main() -> None:
        conn = await app.start()
        try:
            await conn.send("mw-app", "x")
            await wait_until(done.is_set, WAIT, "handled")
            await wait_until(lambda: bool(later.named("after_handle")), WAIT)
        finally:
            await app.stop()

    asyncio.run(main())
    assert ("after_handle", "x", pigeon.Outcome.ACKED) in later.calls


# -- trace context without OpenTelemetry ------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("url", URLS)
def test_trace_context_follows_send_handle_send_and_request_reply(url: str) -> None:
    async def main() -> None:
        first, second, service = unique("tr-a"), unique("tr-b"), unique("tr-svc")
        seen: dict[str, tracing.TraceContext | None] = {}
        headers: dict[str, dict[str, str]] = {}
        done = asyncio.Event()
        async with opened(url) as conn:

            async def hop(delivery: pigeon.Delivery) -> None:
                seen["first"] = tracing.current()
                headers["first"] = dict(delivery.message.headers)
                await conn.send(second, "next")
                reply = await conn.request(service, "call", timeout=WAIT)
                assert reply.text == "answer"

            def last(delivery: pigeon.Delivery) -> None:  # a plain handler, in a thread
                seen["second"] = tracing.current()
                headers["second"] = dict(delivery.message.headers)
                done_soon()

            def serve(message: pigeon.Message) -> str:
                seen["served"] = tracing.current()
                return "answer"

            loop = asyncio.get_running_loop()

            def done_soon() -> None:
                loop.call_soon_threadsafe(done.set)

            await conn.consume(first, hop)
            await conn.consume(second, last)
            await conn.serve(service, serve)
            with tracing.trace() as root:
                await conn.send(first, "start")
            await asyncio.wait_for(done.wait(), WAIT)
            await wait_until(lambda: "served" in seen, WAIT, "served")
        for where in ("first", "second", "served"):
            context = seen[where]
            assert context is not None, where
            assert context.trace_id == root.trace_id, where
        spans = {seen[where].span_id for where in ("first", "second", "served")}  # type: ignore[union-attr]
        assert len(spans) == 3 and root.span_id not in spans  # a new span per hop
        assert headers["first"]["traceparent"].split("-")[1] == root.trace_id

    asyncio.run(main())


@pytest.mark.parametrize("url", ["memory://tr-pub", "bind"])
def test_trace_context_follows_publish_to_event(url: str) -> None:
    async def main() -> None:
        seen: list[tracing.TraceContext | None] = []
        async with opened(url) as conn:
            await conn.subscribe("trace.news", lambda event: seen.append(tracing.current()))
            with tracing.trace() as root:
                await conn.publish("trace.news", "hello")
            await wait_until(lambda: bool(seen), WAIT, "the event")
        assert seen[0] is not None and seen[0].trace_id == root.trace_id

    asyncio.run(main())


def test_untraced_messages_carry_no_traceparent_and_malformed_ones_are_counted() -> None:
    async def main() -> None:
        seen: list[tuple[tracing.TraceContext | None, dict[str, str]]] = []

        async def handle(delivery: pigeon.Delivery) -> None:
            seen.append((tracing.current(), dict(delivery.message.headers)))

        before = tracing.counts()["malformed_traceparent"]
        async with pigeon.connect("memory://tr-bad") as conn:
            await conn.consume("tr-bad", handle)
            await conn.send("tr-bad", "plain")
            await conn.send("tr-bad", "bad", headers={"traceparent": "00-zz-not-a-trace"})
            zeros = "00-" + "0" * 32 + "-" + "1" * 16 + "-01"
            await conn.send("tr-bad", "zeros", headers={"traceparent": zeros})
            await wait_until(lambda: len(seen) == 3, WAIT, "three handled")
            assert conn.stats()["tracing"]["malformed_traceparent"] == before + 2
        assert seen[0] == (None, {})  # nothing invented for untraced traffic
        assert seen[1][0] is None and seen[2][0] is None  # ignored, and handled

    asyncio.run(main())


def test_trace_context_follows_a_blocking_call_from_a_plain_handler() -> None:
    async def main() -> None:
        seen: list[tracing.TraceContext | None] = []
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as node:
            address = node.stats()["bound"][0]
            with pigeon.sync.connect(address) as blocking:

                def forward(delivery: pigeon.Delivery) -> None:  # in a thread
                    blocking.send("tr-sync-b", "forwarded")

                async def last(delivery: pigeon.Delivery) -> None:
                    seen.append(tracing.current())

                await node.consume("tr-sync-a", forward)
                await node.consume("tr-sync-b", last)
                with tracing.trace() as root:
                    await node.send("tr-sync-a", "start")
                await wait_until(lambda: bool(seen), WAIT, "the forwarded message")
        assert seen[0] is not None and seen[0].trace_id == root.trace_id

    asyncio.run(main())


def test_a_scatter_gather_short_of_replies_ends_in_timeout() -> None:
    async def main() -> None:
        recorder = Recorder()
        async with pigeon.connect("memory://mw-all", middleware=[recorder]) as conn:
            await conn.serve("mw-all", lambda message: "one")
            replies = await conn.request_all("mw-all", "x", timeout=1.0)
            assert [reply.text for reply in replies] == ["one"]
            with pytest.raises(pigeon.Timeout):
                await conn.request_all("mw-all", "x", timeout=0.5, min_replies=2)
        outcomes = [call[2] for call in recorder.named("after_request")]
        assert outcomes == [pigeon.RequestOutcome.OK, pigeon.RequestOutcome.TIMEOUT]

    asyncio.run(main())
