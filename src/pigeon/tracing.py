"""Trace context carried in message headers (W3C ``traceparent`` and
``tracestate``), without OpenTelemetry.

While a handler runs a message that carried a ``traceparent``, that context
is the *current* one (a contextvar, so it follows ``async`` code and the
thread a plain handler runs in). A ``send``, ``publish`` or ``request`` made
then carries the same trace id with a new span id. A message without a
``traceparent`` is handled with no current context, and what its handler
sends carries none: pigeon never starts a trace by itself, so untraced
traffic pays nothing. Start one with :func:`trace`, or register
:class:`pigeon.otel.OpenTelemetry`, which starts spans (and traces) as
OpenTelemetry does.

A malformed ``traceparent`` is ignored and counted (:func:`counts`), never an
error; see ``pigeon._core.tracecontext`` for the rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token

from ._core import limits
from ._core.tracecontext import (
    TRACEPARENT,
    TRACESTATE,
    TraceContext,
    new_trace,
    parse_traceparent,
    usable_state,
)

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "TraceContext",
    "counts",
    "current",
    "set_current",
    "trace",
]

_current: ContextVar[TraceContext | None] = ContextVar("pigeon_trace", default=None)

# Process-wide, as the contextvar is: shown in Connection.stats()["tracing"].
_counts = {"malformed_traceparent": 0, "dropped_tracestate": 0, "no_room_for_traceparent": 0}


# The trace context of the handler running here, or of :func:`trace` (the
# contextvar's own getter: a send checks it, and a Python call would cost
# more than the check).
current: Callable[[], TraceContext | None] = _current.get


def set_current(context: TraceContext | None) -> Token[TraceContext | None]:
    """Make ``context`` the current one (a middleware's span, say) until the
    handler it runs for ends; returns the token to undo it with outside a
    handler (``_current.reset``)."""
    return _current.set(context)


@contextmanager
def trace(context: TraceContext | None = None) -> Iterator[TraceContext]:
    """Run the ``with`` block in ``context``, or in a new trace: what it
    sends carries that trace id::

        with pigeon.tracing.trace() as context:
            await conn.send("orders", order)
        print(context.trace_id)
    """
    context = context or new_trace(os.urandom)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def counts() -> dict[str, int]:
    """What was ignored: malformed ``traceparent`` headers, ``tracestate``
    headers over the bound, and contexts not sent for want of header room."""
    return dict(_counts)


def extract(headers: Mapping[str, str]) -> TraceContext | None:
    """The context ``headers`` carry; None (and counted) when malformed."""
    value = headers.get(TRACEPARENT)
    if value is None:
        return None
    try:
        context = parse_traceparent(value)
    except ValueError:
        _counts["malformed_traceparent"] += 1
        return None
    state = headers.get(TRACESTATE)
    if state is not None:
        kept = usable_state(state)
        if kept is None:
            _counts["dropped_tracestate"] += 1
        else:
            context = TraceContext(context.trace_id, context.span_id, context.flags, kept)
    return context


def write(headers: dict[str, str], context: TraceContext) -> None:
    """Put ``context`` into ``headers`` (its state too, if it has one)."""
    room = limits.MAX_HEADERS - len(headers) - (TRACEPARENT not in headers)
    if room < 0:
        _counts["no_room_for_traceparent"] += 1
        return
    headers[TRACEPARENT] = context.traceparent
    if context.state and (room > 0 or TRACESTATE in headers):
        headers[TRACESTATE] = context.state


def inject(headers: dict[str, str]) -> None:
    """Give an outgoing message's ``headers`` a child of the current
    context, unless they hold a ``traceparent`` already (set by the caller
    or a middleware) or nothing is current."""
    if TRACEPARENT in headers:
        return
    context = _current.get()
    if context is not None:
        write(headers, context.child(os.urandom))


def enter(headers: Mapping[str, str]) -> Token[TraceContext | None]:
    """Make the context ``headers`` carry current, for a handler about to run."""
    return _current.set(extract(headers) if headers else None)


def leave(token: Token[TraceContext | None]) -> None:
    """Undo :func:`enter` (and whatever a middleware set since)."""
    _current.reset(token)
