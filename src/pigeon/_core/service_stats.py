"""What a host counts of the services it serves or relays: calls, errors and
latency percentiles, in bounded memory.

Rule 1: latencies go into fixed buckets (each 1.25x wider than the one
before, from 10 µs to about 10 minutes, then one overflow bucket); a
percentile is the upper edge of the bucket it falls in, so it is never more
than 25% above the true value, and memory does not grow with calls.
Rule 2: at most ``max_services`` names are counted; calls to further ones
are counted in ``untracked`` only (names come from peers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

BASE = 1e-5  # seconds: the first bucket's upper edge
GROWTH = 1.25
BUCKETS = 80  # BASE * GROWTH**79 is about 450 s; beyond: the overflow bucket
MAX_SERVICES = 1000


def bucket_of(seconds: float) -> int:
    """The bucket a latency of ``seconds`` falls in (Rule 1)."""
    if not seconds > BASE:  # also a NaN or a negative clock step
        return 0
    return min(BUCKETS, math.ceil(math.log(seconds / BASE, GROWTH)))


def upper_edge(bucket: int) -> float:
    """The largest latency in ``bucket``, in seconds (inf for the overflow)."""
    return math.inf if bucket >= BUCKETS else BASE * GROWTH**bucket


@dataclass(slots=True)
class ServiceTally:
    """One service's counters."""

    calls: int = 0
    errors: int = 0  # the handler failed or the call timed out
    buckets: list[int] = field(default_factory=lambda: [0] * (BUCKETS + 1))

    def record(self, seconds: float, *, failed: bool) -> None:
        self.calls += 1
        self.errors += failed
        self.buckets[bucket_of(seconds)] += 1

    def percentile(self, fraction: float) -> float | None:
        """The latency (seconds) below which ``fraction`` of calls fell, or
        None before any call."""
        if self.calls == 0:
            return None
        rank = max(1, math.ceil(fraction * self.calls))
        seen = 0
        for bucket, count in enumerate(self.buckets):
            seen += count
            if seen >= rank:
                return upper_edge(bucket)
        return math.inf  # not reached: the buckets hold every call

    def snapshot(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        return {
            "calls": self.calls,
            "errors": self.errors,
            "p50_ms": _ms(p50),
            "p99_ms": _ms(p99),
        }


def _ms(seconds: float | None) -> float | None:
    if seconds is None or math.isinf(seconds):
        return None if seconds is None else -1.0  # -1: beyond the last bucket
    return round(seconds * 1000, 3)


class ServiceCounts:
    """Tallies by service name (Rule 2)."""

    def __init__(self, max_services: int = MAX_SERVICES) -> None:
        self.max_services = max_services
        self.tallies: dict[str, ServiceTally] = {}
        self.untracked = 0  # calls to names beyond max_services

    def record(self, service: str, seconds: float, *, failed: bool) -> None:
        tally = self.tallies.get(service)
        if tally is None:
            if len(self.tallies) >= self.max_services:
                self.untracked += 1
                return
            tally = self.tallies[service] = ServiceTally()
        tally.record(seconds, failed=failed)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: tally.snapshot() for name, tally in sorted(self.tallies.items())}
