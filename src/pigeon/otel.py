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

"The current context" is OpenTelemetry's current span: while a handler
runs, its ``process`` or ``serve`` span (current in the handler, plain
``def`` ones in their thread too, so spans you start there nest under it),
else the span your code made current, else ``pigeon.tracing.current()``,
else none (a new trace). A ``process`` or ``serve`` span's parent is only
ever the message's ``traceparent`` (no ``traceparent``: a new trace).

A producing span's context travels in the message's ``traceparent`` (and
``tracestate``) header, so the consumer's span is the producer's child on
every transport. ``send`` and ``publish`` spans end when the message is
handed to the transport.
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
        # Open spans, and the token of each that was made current.
        self._open: dict[Any, tuple[Span, object | None]] = {}

    def on_connect(self, connection: Connection) -> None:
        self.system = _system(connection.transport.url)

    def _parent(self) -> otel_context.Context | None:
        """Where a producing span (send, publish, request) hangs."""
        if trace.get_current_span().get_span_context().is_valid:
            return None  # OpenTelemetry's own current span
        return _to_otel(tracing.current())

    @staticmethod
    def _remote_parent() -> otel_context.Context:
        """Where a consuming span (process, serve) hangs: the context the
        message carried (the worker made it pigeon's current one), never
        whatever span happened to be current where the worker started."""
        return _to_otel(tracing.current()) or otel_context.Context()

    def _attributes(self, operation: str, destination: str, message: Message) -> dict[str, Any]:
        return {
            "messaging.system": self.system,
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.destination.name": destination,
            "messaging.message.id": message.id,
            "messaging.message.body.size": len(message.body),
        }

    def _hold(self, key: Any, span: Span, *, current: bool = False) -> None:
        """Keep ``span`` open under ``key``; ``current``: make it the
        current span until it ends (in this context: the handler's)."""
        if len(self._open) >= MAX_OPEN_SPANS:
            oldest = next(iter(self._open))
            self._open.pop(oldest)[0].end()
            self.dropped += 1
        token = otel_context.attach(trace.set_span_in_context(span)) if current else None
        self._open[key] = (span, token)
        if current:
            tracing.set_current(_to_pigeon(span) or tracing.current())

    def _release(self, key: Any) -> Span | None:
        """The span kept under ``key``, no longer current."""
        found = self._open.pop(key, None)
        if found is None:
            return None
        span, token = found
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
        return span

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
            context=self._remote_parent(),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        self._hold(delivery, span, current=True)

    def after_handle(self, delivery: Delivery, outcome: Outcome, seconds: float) -> None:
        span = self._release(delivery)
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
            context=self._remote_parent(),
            kind=SpanKind.SERVER,
            attributes=self._attributes("process", service, message),
        )
        self._hold(("serve", message.id), span, current=True)

    def after_serve(
        self, service: str, message: Message, outcome: RequestOutcome, seconds: float
    ) -> None:
        self._end(("serve", message.id), outcome)

    def _end(self, key: Any, outcome: RequestOutcome) -> None:
        span = self._release(key)
        if span is None:
            return
        span.set_attribute("pigeon.outcome", outcome.value)
        if outcome is not RequestOutcome.OK:
            span.set_status(Status(StatusCode.ERROR, outcome.value))
        span.end()
