"""W3C trace context parsing and children (pigeon._core.tracecontext)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon._core.tracecontext import (
    MAX_TRACESTATE,
    TraceContext,
    new_trace,
    parse_traceparent,
    usable_state,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
GOOD = f"00-{TRACE}-{SPAN}-01"


def counting_rand() -> object:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def test_a_valid_traceparent_round_trips() -> None:
    context = parse_traceparent(GOOD)
    assert context == TraceContext(TRACE, SPAN, 1)
    assert context.traceparent == GOOD


def test_a_later_version_keeps_what_it_knows() -> None:
    context = parse_traceparent(f"01-{TRACE}-{SPAN}-00-and-more")
    assert context == TraceContext(TRACE, SPAN, 0)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "shorter"),
        (GOOD[:-1], "shorter"),
        (GOOD + "x", "exactly 55"),
        (f"ff-{TRACE}-{SPAN}-01", "version"),
        (f"zz-{TRACE}-{SPAN}-01", "version"),
        (f"00-{TRACE.upper()}-{SPAN}-01", "lowercase hex"),
        (f"00-{'0' * 32}-{SPAN}-01", "zeros"),
        (f"00-{TRACE}-{'0' * 16}-01", "zeros"),
        (f"00_{TRACE}_{SPAN}_01", "separated"),
        (f"01-{TRACE}-{SPAN}-01x", "'-' after the flags"),
    ],
)
def test_malformed_traceparents_are_refused_with_a_reason(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_traceparent(value)


@given(st.text(max_size=80))
def test_any_text_parses_or_raises_value_error(value: str) -> None:
    try:
        context = parse_traceparent(value)
    except ValueError:
        return
    assert len(context.trace_id) == 32 and len(context.span_id) == 16


def test_a_child_keeps_the_trace_and_gets_a_new_span() -> None:
    rand = counting_rand()
    root = new_trace(rand)  # type: ignore[arg-type]
    child = root.child(rand)  # type: ignore[arg-type]
    assert child.trace_id == root.trace_id and child.flags == root.flags
    assert child.span_id != root.span_id and child.span_id != "0" * 16


def test_all_zero_ids_are_never_made() -> None:
    zeros = iter([bytes(16), b"\x01" * 16, bytes(8), b"\x02" * 8])
    made = new_trace(lambda n: next(zeros)[:n])
    assert made.trace_id == "01" * 16 and made.span_id == "02" * 8


def test_tracestate_is_kept_only_within_bounds() -> None:
    assert usable_state("congo=t61rcWkgMzE") == "congo=t61rcWkgMzE"
    assert usable_state("x" * (MAX_TRACESTATE + 1)) is None
    assert usable_state("bad\nline") is None
    assert usable_state(None) is None
