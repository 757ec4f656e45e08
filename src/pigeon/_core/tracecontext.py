"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the
``traceparent`` and ``tracestate`` headers as pure functions. No I/O, no
clock; random ids come from a ``rand(n) -> bytes`` passed in.

Rule 1: a ``traceparent`` is ``VERSION-TRACEID-PARENTID-FLAGS`` in lowercase
hex (2-32-16-2 digits). Version ``ff`` is invalid; version ``00`` is exactly
55 characters; a later version may be longer, with a ``-`` right after the
flags (spec section 3.2.4: parse what we know, ignore the rest).
Rule 2: an all-zero trace id or parent id is invalid.
Rule 3: what breaks rule 1 or 2 raises ``ValueError``; the adapter counts it
and goes on without a context (a bad header is never a delivery error).
Rule 4: a ``tracestate`` is kept only if it is printable ASCII of at most
``MAX_TRACESTATE`` characters (the spec's own bound); otherwise it is dropped
and the ``traceparent`` still holds.
Rule 5: a child keeps the trace id, flags and state and has a new span id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
MAX_TRACESTATE = 512

_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The trace a message belongs to and the span that sent it.

    Attributes:
        trace_id: 32 lowercase hex digits, the whole trace.
        span_id: 16 lowercase hex digits, the span that sent the message.
        flags: the trace flags (bit 0: sampled).
        state: the ``tracestate`` header, or "" when there is none.
    """

    trace_id: str
    span_id: str
    flags: int = 1
    state: str = ""

    @property
    def traceparent(self) -> str:
        """This context as a version-00 ``traceparent`` header value."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def child(self, rand: Callable[[int], bytes]) -> TraceContext:
        """The same trace with a new span id (Rule 5)."""
        return TraceContext(self.trace_id, new_span_id(rand), self.flags, self.state)


def _is_hex(text: str) -> bool:
    return all(c in _HEX for c in text)


def new_span_id(rand: Callable[[int], bytes]) -> str:
    """A span id that is not all zeros (Rule 2)."""
    while True:
        span = rand(8).hex()
        if span != _ZERO_SPAN:
            return span


def new_trace(rand: Callable[[int], bytes], *, sampled: bool = True) -> TraceContext:
    """The root of a new trace."""
    while True:
        trace = rand(16).hex()
        if trace != _ZERO_TRACE:
            return TraceContext(trace, new_span_id(rand), 1 if sampled else 0)


def parse_traceparent(value: str) -> TraceContext:
    """The context a ``traceparent`` value holds (Rules 1 and 2).

    Raises:
        ValueError: the value is malformed; the message says how.
    """
    if not isinstance(value, str) or len(value) < 55:
        raise ValueError("traceparent is shorter than 55 characters")
    version = value[:2]
    if not _is_hex(version) or version == "ff":
        raise ValueError(f"traceparent version {version!r} is not valid")
    if version == "00" and len(value) != 55:
        raise ValueError("a version-00 traceparent is exactly 55 characters")
    if len(value) > 55 and value[55] != "-":
        raise ValueError("a later-version traceparent has '-' after the flags")
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        raise ValueError("traceparent fields are not separated by '-'")
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id) and _is_hex(span_id) and _is_hex(flags)):
        raise ValueError("traceparent holds a character that is not lowercase hex")
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        raise ValueError("traceparent trace id and parent id must not be all zeros")
    return TraceContext(trace_id, span_id, int(flags, 16))


def usable_state(value: str | None) -> str | None:
    """``value`` if it may travel as a ``tracestate`` (Rule 4), else None."""
    if value is None or not isinstance(value, str) or len(value) > MAX_TRACESTATE:
        return None
    if not all(" " <= c <= "~" for c in value):
        return None
    return value
