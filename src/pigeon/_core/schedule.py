"""Periodic work that runs once per period across every copy of an app.

A schedule is a name and a rule: every N seconds (periods aligned to the
epoch) or a cron expression (UTC, parsed by ``cronsim``). Each period has
one start time, the same in every copy, and one tick id made from the name
and that time.

Rule 1: every copy sends the tick of the next period, with its id, to the
queue ``pigeon.schedule.<name>``, ``lead`` seconds before the period starts
(at once if it starts up later than that). Since every copy sends the same
id, a host that drops resends by id (the ZeroMQ and memory hosts, JetStream's
``Nats-Msg-Id`` within its duplicate window) keeps one tick per period.
Rule 2: where the host keeps ids (``DEDUPE``), the tick is sent with
``not_before`` = the period's start: the host holds it until then, and one
copy (a competing consumer) gets it and runs the period.
Rule 3: where it does not (RabbitMQ, ``HOLD``), the queue has a single
active consumer: it gets every copy's tick at once, keeps the first of a
period unsettled until the period starts, settles the repeats at once
(counted as ``repeats``), and runs the period. If it dies, the broker hands
the unsettled tick to the next consumer, which runs it.
Rule 4: a copy sends ticks only for periods that start after now: a period
in which no copy ran is skipped, not made up later. A tick delivered late
(every copy busy, or a host that was down) still runs, once.
Rule 5: ``lead`` is half a period, at most ``MAX_LEAD`` seconds, so every
copy's tick of one period is sent within one duplicate window.

Rule 6: a tick is a peer's message: one whose start is not a finite time,
or lies further ahead than any copy sends a tick (``MAX_LEAD`` plus
``CLOCK_SLACK``), is not run (``tick_start_ok``); held, it would keep the
schedule's queue from every later period.

Nothing here reads a clock or does I/O: ``now`` is wall-clock seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from cronsim import CronSim, CronSimError

from .limits import MAX_SECONDS, check_name

QUEUE_PREFIX = "pigeon.schedule."
MAX_LEAD = 30.0  # seconds; below JetStream's default duplicate window (120 s)
MIN_EVERY = 0.01  # seconds: a shorter period is a mistake, not a schedule
CLOCK_SLACK = 30.0  # seconds copies' wall clocks may disagree (Rule 6)


class Mode(Enum):
    """How one tick per period is kept (Rules 2 and 3)."""

    DEDUPE = "dedupe"  # the host drops repeated ids; ticks wait with not_before
    HOLD = "hold"  # no de-duplication: a single active consumer holds the tick


@dataclass(frozen=True, slots=True)
class Schedule:
    """One schedule's rule: ``every`` seconds, or a ``cron`` expression."""

    name: str
    every: float | None = None
    cron: str | None = None

    @property
    def queue(self) -> str:
        """The queue its ticks go to."""
        return QUEUE_PREFIX + self.name

    def next_start(self, after: float) -> float:
        """The start of the first period that starts strictly after ``after``."""
        if self.every is not None:
            start = (math.floor(after / self.every) + 1) * self.every
            return start if start > after else start + self.every  # float rounding
        assert self.cron is not None
        moment = datetime.fromtimestamp(after, UTC).replace(microsecond=0)
        for fire in CronSim(self.cron, moment):
            start = fire.timestamp()
            if start > after:
                return start
        raise AssertionError("cronsim's iterator is endless")  # pragma: no cover

    def period(self, start: float) -> float:
        """The length of the period that starts at ``start``."""
        if self.every is not None:
            return self.every
        return self.next_start(start) - start

    def lead(self, start: float) -> float:
        """Rule 5: how long before ``start`` its tick is sent."""
        return min(self.period(start) / 2, MAX_LEAD)

    def tick_id(self, start: float) -> str:
        """The id every copy gives the tick of the period at ``start``."""
        return f"{self.name}@{round(start * 1000)}"


@dataclass(frozen=True, slots=True)
class Tick:
    """The next tick a copy sends: its period's ``start`` and when to send it."""

    start: float
    send_at: float
    message_id: str


def next_tick(schedule: Schedule, now: float, last_sent: float | None) -> Tick:
    """Rules 1 and 4: the tick to send next, given the last period this copy
    sent a tick for (None at start)."""
    after = now if last_sent is None else max(now, last_sent)
    start = schedule.next_start(after)
    return Tick(start, start - schedule.lead(start), schedule.tick_id(start))


class Repeats:
    """Rule 3: which periods a HOLD consumer has taken, so it settles the
    repeats of one period and runs it once. Bounded: periods older than the
    newest ``keep`` are forgotten (their repeats came long ago)."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        self._taken: dict[float, None] = {}

    def take(self, start: float) -> bool:
        """True the first time ``start`` is seen; False for a repeat."""
        if start in self._taken:
            return False
        self._taken[start] = None
        if len(self._taken) > self.keep:
            oldest = min(self._taken)
            del self._taken[oldest]
        return True


def tick_start_ok(start: float, now: float) -> bool:
    """Whether a tick that says its period starts at ``start`` may run (Rule 6)."""
    return math.isfinite(start) and start <= now + MAX_LEAD + CLOCK_SLACK


def check_every(name: str, seconds: object) -> Schedule:
    """A schedule every ``seconds``.

    Raises:
        ValueError: a bad name or a period that is not a number of seconds
            from ``MIN_EVERY`` to ``MAX_SECONDS``.
    """
    if (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not MIN_EVERY <= seconds <= MAX_SECONDS
    ):
        raise ValueError(
            f"schedule {name!r}: every must be {MIN_EVERY:g} to {MAX_SECONDS:g} seconds, "
            f"not {seconds!r}"
        )
    return Schedule(check_name(name, "schedule"), every=float(seconds))


def check_cron(name: str, expression: object) -> Schedule:
    """A schedule of a cron expression (five fields, UTC).

    Raises:
        ValueError: a bad name or expression (cronsim's reason kept).
    """
    if not isinstance(expression, str):
        raise ValueError(f"schedule {name!r}: a cron expression is a str, not {expression!r}")
    try:
        CronSim(expression, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ValueError(f"schedule {name!r}: bad cron expression {expression!r}: {exc}") from None
    return Schedule(check_name(name, "schedule"), cron=expression)
