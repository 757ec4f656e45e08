"""OpenTelemetry spans for pigeon (extra ``otel``: ``opentelemetry-api``).

:class:`OpenTelemetry` is a middleware that makes a span for each message
and call, with the messaging semantic conventions' attribute names, using
the global tracer provider unless given one:

=====================  ===========  ==================================
span                   kind         parent
=====================  ===========  ==================================
``send QUEUE``         PRODUCER     the current context
``publish TOPIC``      PRODUCER     the current context
``process QUEUE``      CONSUMER     the message's ``traceparent``
``request SERVICE``    CLIENT       the current context
``serve SERVICE``      SERVER       the request's ``traceparent``
=====================  ===========  ==================================

"The current context" is the handler's (``pigeon.tracing.current()``: a
``process`` or ``serve`` span) while one runs, else OpenTelemetry's own
current span, else none (a new trace). The span's context travels in the
message's ``traceparent`` (and ``tracestate``) header, so the consumer's
span is the producer's child on every transport. ``send`` and ``publish``
spans end when the message is handed to the transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import tracing
from ._extras import install_hint
from .message import Message
from .middleware import Middleware, Outcome, RequestOutcome
from .transports import Delivery

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import (
        NonRecordingSpan,
        Span,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"pigeon.otel needs opentelemetry-api: {install_hint('otel')}") from exc

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["OpenTelemetry"]

# Spans open at once (a process span lives while its handler runs; a
# request span until its reply): past this, the oldest are ended early and
# counted in ``OpenTelemetry.dropped``.
MAX_OPEN_SPANS = 10_000

_SYSTEMS = {"nats": "nats", "amqp": "rabbitmq", "amqps": "rabbitmq"}


def _system(url: str) -> str:
    """``messaging.system``: the broker's well-known name, else "pigeon"."""
    scheme = url.removeprefix("bind:").partition("://")[0]
    return _SYSTEMS.get(scheme, "pigeon")


def _to_pigeon(span: Span) -> tracing.TraceContext | None:
    found = span.get_span_context()
    if not found.is_valid:
        return None
    state = found.trace_state.to_header() if found.trace_state else ""
    return tracing.TraceContext(
        format(found.trace_id, "032x"), format(found.span_id, "016x"), int(found.trace_flags), state
    )


def _to_otel(context: tracing.TraceContext | None) -> otel_context.Context | None:
    """An OpenTelemetry context whose current span is the remote ``context``."""
    if context is None:
        return None
    state = TraceState.from_header([context.state]) if context.state else None
    remote = SpanContext(
        int(context.trace_id, 16),
        int(context.span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(context.flags),
        trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(remote))


class OpenTelemetry(Middleware):
    """Spans for sends, publishes, handles, requests and serves (see the
    module docstring).

    Args:
        tracer_provider: where spans go (default: the global provider).
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        from . import __version__

        self.tracer = trace.get_tracer("pigeon", __version__, tracer_provider)
        self.system = "pigeon"
        self.dropped = 0
        self._open: dict[Any, Span] = {}

    def on_connect(self, connection: Connection) -> None:
        self.system = _system(connection.transport.url)

    def _parent(self) -> otel_context.Context | None:
        here = tracing.current()
        if here is not None:
            return _to_otel(here)
        return None  # OpenTelemetry's own current context, if any

    def _attributes(self, operation: str, destination: str, message: Message) -> dict[str, Any]:
        return {
            "messaging.system": self.system,
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": destination,
            "messaging.message.id": message.id,
            "messaging.message.body.size": len(message.body),
        }

    def _hold(self, key: Any, span: Span) -> None:
        if len(self._open) >= MAX_OPEN_SPANS:
            oldest = next(iter(self._open))
            self._open.pop(oldest).end()
            self.dropped += 1
        self._open[key] = span

    def _produce(self, name: str, operation: str, destination: str, message: Message) -> None:
        span = self.tracer.start_span(
            f"{name} {destination}",
            context=self._parent(),
            kind=SpanKind.PRODUCER,
            attributes=self._attributes(operation, destination, message),
        )
        made = _to_pigeon(span)
        if made is not None:
            tracing.write(message.headers, made)
        span.end()

    def on_send(self, queue: str, message: Message) -> None:
        self._produce("send", "send", queue, message)

    def on_publish(self, topic: str, message: Message) -> None:
        self._produce("publish", "publish", topic, message)

    def before_handle(self, delivery: Delivery) -> None:
        topic = getattr(delivery, "topic", "") or delivery.queue
        attributes = self._attributes("process", topic, delivery.message)
        attributes["messaging.message.delivery_attempt"] = delivery.message.attempt
        span = self.tracer.start_span(
            f"process {topic}",
            context=self._parent(),  # the message's traceparent (set by the worker)
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        self._hold(delivery, span)
        tracing.set_current(_to_pigeon(span) or tracing.current())

    def after_handle(self, delivery: Delivery, outcome: Outcome, seconds: float) -> None:
        span = self._open.pop(delivery, None)
        if span is None:
            return
        span.set_attribute("pigeon.outcome", outcome.value)
        if outcome in (Outcome.RETRIED, Outcome.DEAD_LETTERED, Outcome.ERROR):
            span.set_status(Status(StatusCode.ERROR, outcome.value))
        span.end()

    def before_request(self, service: str, message: Message) -> None:
        span = self.tracer.start_span(
            f"request {service}",
            context=self._parent(),
            kind=SpanKind.CLIENT,
            attributes=self._attributes("request", service, message),
        )
        made = _to_pigeon(span)
        if made is not None:
            tracing.write(message.headers, made)
        self._hold(("request", message.id), span)

    def after_request(
        self, service: str, message: Message, outcome: RequestOutcome, seconds: float
    ) -> None:
        self._end(("request", message.id), outcome)

    def before_serve(self, service: str, message: Message) -> None:
        span = self.tracer.start_span(
            f"serve {service}",
            context=self._parent(),  # the request's traceparent (set by the server)
            kind=SpanKind.SERVER,
            attributes=self._attributes("process", service, message),
        )
        self._hold(("serve", message.id), span)
        tracing.set_current(_to_pigeon(span) or tracing.current())

    def after_serve(
        self, service: str, message: Message, outcome: RequestOutcome, seconds: float
    ) -> None:
        self._end(("serve", message.id), outcome)

    def _end(self, key: Any, outcome: RequestOutcome) -> None:
        span = self._open.pop(key, None)
        if span is None:
            return
        span.set_attribute("pigeon.outcome", outcome.value)
        if outcome is not RequestOutcome.OK:
            span.set_status(Status(StatusCode.ERROR, outcome.value))
        span.end()
