"""The recent history of each queue the dashboard draws as sparklines, and
the rates it shows, without I/O (``now`` is passed in).

Rules:
1. A queue keeps at most ``points`` samples; the oldest goes first.
2. At most ``max_queues`` queues keep samples (the first by name); the
   rest are shown with their rates but no history, and counted in
   ``untracked``. (The last counters of every queue are kept for its
   rates: as many as the system itself holds, which bounds them.)
3. A queue missing from a poll is forgotten: the history holds only what
   the system still has.
4. A rate is ``pigeon.admin.rates.rate`` of a counter between two polls
   (the one ``pigeon queues --watch`` shows): unknown, not negative, for
   the poll after a counter went down (the node restarted).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ..admin.rates import rate

# What a sample keeps: gauges as they were, counters as rates.
GAUGES = ("ready", "in_flight", "dead")
COUNTERS = ("received", "acked")
SERIES = (*GAUGES, *(f"{name}_rate" for name in COUNTERS))


class QueueHistory:
    """Samples of every followed queue, one per poll."""

    def __init__(self, *, points: int = 120, max_queues: int = 1000) -> None:
        if points < 2 or max_queues < 1:
            raise ValueError("a history needs at least 2 points and 1 queue")
        self.points = points
        self.max_queues = max_queues
        self.untracked = 0
        self._samples: dict[str, deque[tuple[float | None, ...]]] = {}
        self._last: dict[str, tuple[float, dict[str, Any]]] = {}

    def add(self, now: float, queues: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Record one poll of ``queues``; returns each queue's rates
        (``received_rate``, ``acked_rate``: None until two polls are known)."""
        followed = sorted(queues)[: self.max_queues]
        self.untracked = len(queues) - len(followed)
        for gone in set(self._samples) - set(followed):  # rule 3
            del self._samples[gone]
        for gone in set(self._last) - set(queues):
            del self._last[gone]
        rates: dict[str, dict[str, Any]] = {}
        for name, fields in queues.items():
            before = self._last.get(name)
            rates[name] = {
                f"{counter}_rate": (
                    rate(before[1].get(counter), fields.get(counter), now - before[0])
                    if before
                    else None
                )
                for counter in COUNTERS
            }
            self._last[name] = (now, {c: fields.get(c) for c in COUNTERS})
        for name in followed:
            fields = queues[name]
            sample = tuple(_number(fields.get(g)) for g in GAUGES) + tuple(
                rates[name][f"{c}_rate"] for c in COUNTERS
            )
            self._samples.setdefault(name, deque(maxlen=self.points)).append(sample)
        return rates

    def series(self) -> dict[str, dict[str, list[float | None]]]:
        """Each followed queue's samples, one list per field, oldest first."""
        return {
            name: {field: [s[i] for s in samples] for i, field in enumerate(SERIES)}
            for name, samples in self._samples.items()
        }


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None
