"""Runs an app's schedules (``@app.every``, ``@app.cron``) on a connection.

The decisions (period starts, tick ids, when to send, what a repeat is) are
in :mod:`pigeon._core.schedule`; this adapter reads the wall clock through
``pigeon._clock.wall``, waits on the event loop's clock, sends the ticks and
runs the handlers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from . import _clock
from ._core.schedule import Mode, Repeats, Schedule, next_tick, tick_start_ok
from .connection import Connection
from .errors import PigeonError
from .transports import Delivery

__all__ = ["Scheduler", "check_schedule_handler", "mode_for"]

log = logging.getLogger("pigeon.schedule")

LEASE_TTL = 60.0  # seconds a tick is leased; renewed while it waits and runs
SEND_RETRY = 0.5  # seconds between tries of a tick that could not be sent
TICK_CONCURRENCY = 8  # a HOLD consumer settles repeats while one tick waits


def mode_for(url: str) -> Mode:
    """RabbitMQ keeps no message ids; every other transport's host does."""
    scheme = url.partition(":")[0].lower()
    return Mode.HOLD if scheme in ("amqp", "amqps") else Mode.DEDUPE


def check_schedule_handler(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes the scheduled time (one parameter) or nothing.

    Raises:
        TypeError: it needs more than one argument.
    """
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) > 1:
        raise TypeError(
            f"scheduled function {fn.__name__} takes no argument or one (the scheduled "
            f"time), not {len(params)}"
        )
    return len(params) == 1 or any(
        p.kind is p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values()
    )


class Scheduler:
    """Sends each schedule's ticks and consumes them (see the core's rules)."""

    def __init__(
        self, conn: Connection, entries: list[tuple[Schedule, Callable[..., Any]]], mode: Mode
    ) -> None:
        self.conn = conn
        self.entries = entries
        self.mode = mode
        self.counts: dict[str, Counter[str]] = {s.name: Counter() for s, _ in entries}
        self._repeats = {s.name: Repeats() for s, _ in entries}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Consume every schedule's ticks, then start sending them.

        Raises:
            the errors of ``Connection.consume``.
        """
        for schedule, fn in self.entries:
            await self.conn.consume(
                schedule.queue,
                self._handler(schedule, fn),
                prefetch=2 * TICK_CONCURRENCY,
                concurrency=TICK_CONCURRENCY,
                lease_ttl=LEASE_TTL,
            )
        loop = asyncio.get_running_loop()
        for schedule, _ in self.entries:
            self._tasks.append(loop.create_task(self._send_ticks(schedule)))

    async def stop(self) -> None:
        """Send no more ticks (the connection's close drains the handlers)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per schedule: ticks ``sent``, periods ``ran``, ``failures``,
        ``repeats`` settled unrun, ``late_sends`` skipped, ``send_failures``."""
        return {name: dict(counts) for name, counts in self.counts.items()}

    # -- sending ---------------------------------------------------------

    async def _send_ticks(self, schedule: Schedule) -> None:
        counts = self.counts[schedule.name]
        last: float | None = None
        while True:
            tick = next_tick(schedule, _clock.wall(), last)
            wait = tick.send_at - _clock.wall()
            if wait > 0:
                await asyncio.sleep(wait)
            if _clock.wall() >= tick.start:
                # Overslept (a frozen process): the period has begun without
                # this copy's tick, and a late one could run it twice (Rule 4).
                counts["late_sends"] += 1
                last = tick.start
                continue
            try:
                await self.conn.send(
                    schedule.queue,
                    {"start": tick.start},
                    message_id=tick.message_id,
                    not_before=tick.start if self.mode is Mode.DEDUPE else None,
                    timeout=max(0.1, tick.start - _clock.wall()),
                )
            except PigeonError as exc:
                counts["send_failures"] += 1
                log.warning("schedule %r: tick not sent: %s", schedule.name, exc)
                await asyncio.sleep(SEND_RETRY)
                continue
            counts["sent"] += 1
            log.debug("schedule %r: tick %s sent", schedule.name, tick.message_id)
            last = tick.start

    # -- running ---------------------------------------------------------

    def _handler(self, schedule: Schedule, fn: Callable[..., Any]) -> Callable[[Delivery], Any]:
        counts = self.counts[schedule.name]
        repeats = self._repeats[schedule.name]
        takes_time = check_schedule_handler(fn)

        async def on_tick(delivery: Delivery) -> None:
            try:
                start = float(delivery.decode()["start"])
                if not tick_start_ok(start, _clock.wall()):
                    raise ValueError(f"a start out of range: {start}")
            except (PigeonError, KeyError, TypeError, ValueError):
                counts["malformed"] += 1
                await delivery.reject("not a schedule tick")
                return
            if self.mode is Mode.HOLD and not repeats.take(start):
                counts["repeats"] += 1
                log.debug("schedule %r: a repeat of the period at %s", schedule.name, start)
                await delivery.ack()
                return
            keeper = asyncio.get_running_loop().create_task(_keep_leased(delivery))
            try:
                wait = start - _clock.wall()
                if wait > 0:  # HOLD: the tick came early (Rule 3)
                    await asyncio.sleep(wait)
                await self._run(schedule, fn, takes_time, start)
            finally:
                keeper.cancel()
            await delivery.ack()

        return on_tick

    async def _run(
        self, schedule: Schedule, fn: Callable[..., Any], takes_time: bool, start: float
    ) -> None:
        counts = self.counts[schedule.name]
        args = (datetime.fromtimestamp(start, UTC),) if takes_time else ()
        counts["ran"] += 1
        log.debug("schedule %r: running the period at %s", schedule.name, start)
        try:
            if inspect.iscoroutinefunction(fn):
                await fn(*args)
            else:
                await asyncio.to_thread(fn, *args)
        except Exception as exc:  # the user's failure: counted, not retried
            counts["failures"] += 1
            log.warning("schedule %r: the run of %s failed: %r", schedule.name, args, exc)


async def _keep_leased(delivery: Delivery) -> None:
    """Renew a tick's lease while it waits and runs, so a long run is not
    handed to another copy (which would run the period again)."""
    while True:
        await asyncio.sleep(LEASE_TTL / 3)
        try:
            await delivery.extend()
        except PigeonError as exc:
            log.warning("a schedule tick's lease was not renewed: %s", exc)
