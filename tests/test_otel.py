"""OpenTelemetry spans through pigeon.otel, with opentelemetry-sdk's
in-memory exporter: send -> process and request -> serve are parent and
child on every transport (memory, tcp, NATS, RabbitMQ)."""

from __future__ import annotations

import asyncio

import pytest
from brokers import opened
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import pigeon
from pigeon.otel import OpenTelemetry
from pigeon.testing.conformance import unique, wait_until

WAIT = 30.0


def spans_kept() -> tuple[OpenTelemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetry(tracer_provider=provider), exporter


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def is_child(child: ReadableSpan, parent: ReadableSpan) -> bool:
    assert child.parent is not None and parent.context is not None and child.context is not None
    return (
        child.context.trace_id == parent.context.trace_id
        and child.parent.span_id == parent.context.span_id
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("url", ["memory://otel", "bind", "nats", "amqp"])
def test_send_process_request_serve_are_linked(url: str) -> None:
    middleware, exporter = spans_kept()
    first, second, service = unique("otel-a"), unique("otel-b"), unique("otel-svc")

    async def main() -> None:
        done = asyncio.Event()
        async with opened(url, middleware=[middleware]) as conn:

            async def hop(delivery: pigeon.Delivery) -> None:
                reply = await conn.request(service, "call", timeout=WAIT)
                assert reply.text == "CALL"
                await conn.send(second, "next")

            def last(delivery: pigeon.Delivery) -> None:  # plain: runs in a thread
                loop.call_soon_threadsafe(done.set)

            loop = asyncio.get_running_loop()
            await conn.consume(first, hop)
            await conn.consume(second, last)
            await conn.serve(service, lambda message: message.text.upper())
            await conn.send(first, "start")
            await asyncio.wait_for(done.wait(), WAIT)
            await wait_until(
                lambda: len(named(exporter, f"process {second}")) == 1, WAIT, "the last span"
            )

    asyncio.run(main())
    (send_first,) = named(exporter, f"send {first}")
    (process_first,) = named(exporter, f"process {first}")
    (request,) = named(exporter, f"request {service}")
    (serve,) = named(exporter, f"serve {service}")
    (send_second,) = named(exporter, f"send {second}")
    (process_second,) = named(exporter, f"process {second}")
    assert send_first.parent is None  # no context: a new trace
    assert is_child(process_first, send_first)
    assert is_child(request, process_first)
    assert is_child(serve, request)
    assert is_child(send_second, process_first)
    assert is_child(process_second, send_second)
    kinds = {
        send_first.kind: SpanKind.PRODUCER,
        process_first.kind: SpanKind.CONSUMER,
        request.kind: SpanKind.CLIENT,
        serve.kind: SpanKind.SERVER,
    }
    assert all(found == wanted for found, wanted in kinds.items())
    attributes = process_first.attributes or {}
    assert attributes["messaging.destination.name"] == first
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["pigeon.outcome"] == "acked"
    system = {"nats": "nats", "amqp": "rabbitmq"}.get(url, "pigeon")
    assert attributes["messaging.system"] == system


def test_a_failing_handler_and_a_publish_are_spans_too() -> None:
    middleware, exporter = spans_kept()

    async def main() -> None:
        async with opened("memory://otel-fail", middleware=[middleware]) as conn:

            async def fail(delivery: pigeon.Delivery) -> None:
                raise ValueError("no")

            retry = pigeon.RetryPolicy(max_attempts=1)
            await conn.consume("otel-fail", fail, retry=retry)
            await conn.subscribe("otel.news", lambda event: None)
            await conn.send("otel-fail", "x")
            await conn.publish("otel.news", "hello")
            await wait_until(
                lambda: (
                    named(exporter, "process otel-fail") and named(exporter, "process otel.news")
                ),
                WAIT,
                "both processed",
            )

    asyncio.run(main())
    (failed,) = named(exporter, "process otel-fail")
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["pigeon.outcome"] == "dead_lettered"
    (published,) = named(exporter, "publish otel.news")
    (event,) = named(exporter, "process otel.news")
    assert is_child(event, published)


@pytest.mark.parametrize("plain", [False, True])
def test_spans_made_in_a_handler_nest_under_its_process_span(plain: bool) -> None:
    middleware, exporter = spans_kept()
    tracer = middleware.tracer

    async def main() -> None:
        async with opened("memory://otel-nest", middleware=[middleware]) as conn:
            with tracer.start_as_current_span("setup"):
                # Started inside a span: still, each process span's parent
                # is the message's traceparent, not this span.
                if plain:

                    def work(delivery: pigeon.Delivery) -> None:
                        with tracer.start_as_current_span("inner"):
                            pass

                    await conn.consume("otel-nest", work)
                else:

                    async def work_async(delivery: pigeon.Delivery) -> None:
                        with tracer.start_as_current_span("inner"):
                            await conn.send("otel-nest-next", "x")

                    await conn.consume("otel-nest", work_async)
            with tracer.start_as_current_span("outer"):
                await conn.send("otel-nest", "x")
            await wait_until(lambda: named(exporter, "inner"), WAIT, "the inner span")

    asyncio.run(main())
    (outer,) = named(exporter, "outer")
    (send,) = named(exporter, "send otel-nest")
    (process,) = named(exporter, "process otel-nest")
    (inner,) = named(exporter, "inner")
    assert is_child(send, outer)
    assert is_child(process, send)
    assert is_child(inner, process)
    if not plain:
        (nested_send,) = named(exporter, "send otel-nest-next")
        assert is_child(nested_send, inner)
