"""Messages that must not be delivered before a time: the rules, sans-IO.

A sender asks with ``delay=`` (seconds from now) or ``not_before=`` (epoch
seconds); either becomes one header, ``x-pigeon-not-before``, holding the
wall-clock time as a decimal float. Every transport reads that header.

Rule 1: a sender gives at most one of ``delay`` and ``not_before``; a delay
is a finite number >= 0, a time a finite number; anything else is refused
before a message is made.
Rule 2: a sender refuses a time more than ``max_delay`` seconds ahead
(``DEFAULT_MAX_DELAY`` unless it says otherwise); a time in the past means
now and writes no header.
Rule 3: the header comes from peers, so a host reads it defensively: a value
that is not a finite number means "now" (counted as ``bad_not_before``),
and a time further ahead than the host's own ``max_delay`` is held only
``max_delay`` (counted as ``delay_clamped``). Nothing a peer writes holds a
message for ever.
Rule 4: a message is never handed out while ``wall < not_before``. How long
to wait is ``not_before - wall`` on whatever clock the caller waits with.

Nothing here reads a clock: callers pass ``now`` (wall-clock seconds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum

from . import headers
from .limits import DEFAULT_MAX_DELAY

__all__ = ["DEFAULT_MAX_DELAY", "NOT_BEFORE", "Reading", "not_before", "not_before_header", "read"]

NOT_BEFORE = headers.NOT_BEFORE


class Reading(Enum):
    """What a host made of a message's not-before header (Rule 3)."""

    NONE = "none"  # no header, or a time already passed
    WAIT = "wait"  # a time ahead, within the host's max_delay
    CLAMPED = "clamped"  # a time too far ahead: held max_delay only
    BAD = "bad"  # not a finite number: delivered now


def not_before_header(
    delay: float | None, not_before: float | None, now: float, max_delay: float
) -> dict[str, str]:
    """The header a sender writes for ``delay`` or ``not_before`` (Rules 1–2);
    empty when the message may go at once.

    Raises:
        ValueError: both given, a value that is not a finite number, a
            negative delay, or a time more than ``max_delay`` ahead (the
            message names the rule).
    """
    if delay is None and not_before is None:
        return {}
    if delay is not None and not_before is not None:
        raise ValueError("give delay= or not_before=, not both")
    if delay is not None:
        if not _number(delay) or not delay >= 0:
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        at = now + float(delay)
    else:
        if not _number(not_before):
            raise ValueError(
                f"not_before must be a finite time in seconds since the epoch, not {not_before!r}"
            )
        at = float(not_before)  # type: ignore[arg-type]
    if at - now > max_delay:
        raise ValueError(
            f"a message may be delayed at most max_delay={max_delay:g} seconds; "
            f"{at - now:.0f} s asked"
        )
    if at <= now:
        return {}
    return {headers.NOT_BEFORE: repr(at)}


def read(message_headers: Mapping[str, str], now: float, max_delay: float) -> tuple[Reading, float]:
    """How long a host holds a message (Rules 3–4): ``(reading, seconds)``,
    seconds 0.0 unless the reading is WAIT or CLAMPED."""
    raw = message_headers.get(headers.NOT_BEFORE)
    if raw is None:
        return Reading.NONE, 0.0
    try:
        at = float(raw)
    except (TypeError, ValueError):
        return Reading.BAD, 0.0
    if not math.isfinite(at):
        return Reading.BAD, 0.0
    wait = at - now
    if wait <= 0:
        return Reading.NONE, 0.0
    if wait > max_delay:
        return Reading.CLAMPED, max_delay
    return Reading.WAIT, wait


def not_before(message_headers: Mapping[str, str]) -> float:
    """The time a message asks to wait for, 0.0 for none or a bad value."""
    raw = message_headers.get(headers.NOT_BEFORE)
    if raw is None:
        return 0.0
    try:
        at = float(raw)
    except (TypeError, ValueError):
        return 0.0
    return at if math.isfinite(at) else 0.0


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
