"""Rates per second from two readings of the counters ``queues()`` answers.

Rule 1: a rate needs the counter in both readings and a positive interval;
otherwise it is None (unknown), never 0.
Rule 2: a counter that went down means its host restarted (counters start
again from 0): the rate is unknown for that interval, not negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RATE_FIELDS = ("received", "acked")


def rate(before: Any, after: Any, seconds: float) -> float | None:
    """``(after - before) / seconds`` for two counter readings (Rules 1, 2)."""
    if not isinstance(before, int) or not isinstance(after, int) or not seconds > 0:
        return None
    if after < before:
        return None
    return (after - before) / seconds


def queue_rates(
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
    seconds: float,
    fields: tuple[str, ...] = RATE_FIELDS,
) -> dict[str, dict[str, float | None]]:
    """For each queue in ``after``: ``{"<field>_per_s": rate}`` over the
    ``seconds`` between the readings (a queue new since ``before``: None)."""
    out: dict[str, dict[str, float | None]] = {}
    for name, now in after.items():
        then = before.get(name, {})
        out[name] = {
            f"{field}_per_s": rate(then.get(field), now.get(field), seconds) for field in fields
        }
    return out


class QueueRates:
    """The rates of each reading of ``queues()`` since the one before it
    (the first reading's: None, Rule 1); ``now`` is a monotonic clock's."""

    def __init__(self) -> None:
        self._before: Mapping[str, Mapping[str, Any]] = {}
        self._then: float | None = None

    def update(
        self, queues: Mapping[str, Mapping[str, Any]], now: float
    ) -> dict[str, dict[str, float | None]]:
        seconds = 0.0 if self._then is None else now - self._then
        rates = queue_rates(self._before, queues, seconds)
        self._before, self._then = queues, now
        return rates
