"""A clock for tests that moves only when told: :class:`LoopClock` shifts a
running asyncio loop's clock, and pigeon's wall clock with it, so timers
due in the next hour fire now, in order, without real waiting.

Rule 1: time never goes back while the clock is installed; ``advance``
moves it forward from timer to timer, so each fires at its own time and
sees what the ones before it did.
Rule 2: after each step the loop runs until it is *idle*: no callback ready,
no timer due, no handler running in a thread. Only then is time moved
again, so nothing sees a later time than the work it started with.
Rule 3: nothing waits for ever: a loop that does not go idle within
``settle_timeout`` real seconds raises :class:`pigeon.errors.Timeout`
saying so.

It reads three things of the standard library's event loop that are not in
its public API (``_ready``, ``_scheduled``, and ``time``/``run_in_executor``
as instance attributes); :meth:`LoopClock.install` checks them first and
refuses a loop without them (uvloop) with a clear error.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from .. import _clock
from ..errors import ClosedError, ConfigurationError, Timeout

__all__ = ["LoopClock"]

DEFAULT_SETTLE_TIMEOUT = 30.0  # real seconds a settle may take before it fails
# Consecutive idle looks before the loop counts as idle: a callback a thread
# has just queued is seen on the next look.
_IDLE_LOOKS = 2


def check_settle_timeout(seconds: float) -> float:
    """``seconds`` if it is a usable ``settle_timeout``.

    Raises:
        ConfigurationError: not a positive, finite number.
    """
    if not isinstance(seconds, int | float) or not (0 < seconds < math.inf):
        raise ConfigurationError(
            f"settle_timeout must be a positive number of seconds, not {seconds!r}"
        )
    return float(seconds)


class LoopClock:
    """The clock of one running loop, moved by hand (see module docstring).

    Args:
        loop: the loop to shift (default: the running one).
        settle_timeout: real seconds a :meth:`settle` may take.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        settle_timeout: float = DEFAULT_SETTLE_TIMEOUT,
    ) -> None:
        self.settle_timeout = check_settle_timeout(settle_timeout)
        self.loop = loop or asyncio.get_running_loop()
        self.offset = 0.0  # seconds this clock is ahead of real time
        self.threads = 0  # thread jobs started on the loop and not yet done
        self._installed = False
        self._closed = False
        self._run_in_executor: Callable[..., Any] | None = None

    # -- installing --------------------------------------------------------

    def install(self) -> None:
        """Take over the loop's clock and count its thread jobs.

        Raises:
            ConfigurationError: the loop is not the standard library's.
            ClosedError: this clock was uninstalled (make a new one).
        """
        if self._closed:
            raise ClosedError("this test clock was closed; make a new one")
        loop = self.loop
        if not (hasattr(loop, "_ready") and hasattr(loop, "_scheduled")):
            raise ConfigurationError(
                f"a test clock needs the standard asyncio event loop, not {type(loop).__name__}"
            )
        if isinstance(getattr(loop, "time", None), _ShiftedTime):
            raise ConfigurationError("this loop already has a test clock")
        original = loop.run_in_executor
        self._run_in_executor = original

        def run_in_executor(executor: Any, func: Callable[..., Any], *args: Any) -> Any:
            future = original(executor, func, *args)
            self.threads += 1
            # Called back on the loop, before the task awaiting the job wakes:
            # while the count is above zero the loop is not idle (Rule 2).
            future.add_done_callback(self._thread_done)
            return future

        loop.time = _ShiftedTime(self)  # type: ignore[method-assign]
        loop.run_in_executor = run_in_executor  # type: ignore[method-assign, assignment]
        self._installed = True

    def uninstall(self) -> None:
        """Give the loop its own clock back, and wall time its real reading.

        Timers set at a shifted time fire that much later afterwards, so do
        this when the app under test has stopped.
        """
        if not self._installed:
            self._closed = True
            return
        self._installed = False
        self._closed = True
        for name in ("time", "run_in_executor"):
            self.loop.__dict__.pop(name, None)
        _clock.shift_wall(-self.offset)

    def _thread_done(self, _future: object) -> None:
        self.threads -= 1

    # -- reading -----------------------------------------------------------

    def time(self) -> float:
        """The loop's time now (monotonic seconds, shifted)."""
        return time.monotonic() + self.offset

    def wall(self) -> float:
        """Wall-clock time now, as pigeon reads it (epoch seconds, shifted)."""
        return _clock.wall()

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("this test clock is closed")
        if not self._installed:
            raise ConfigurationError("install() the test clock before moving it")

    def next_timer(self) -> float | None:
        """When the loop's earliest live timer is due, or None."""
        live = [h.when() for h in self.loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
        return min(live) if live else None

    def busy(self) -> bool:
        """Whether the loop has work now: a ready callback, a due timer, or a
        job in a thread."""
        if self.threads or self.loop._ready:  # type: ignore[attr-defined]
            return True
        due = self.next_timer()
        return due is not None and due <= self.time()

    # -- moving ------------------------------------------------------------

    def move_to(self, when: float) -> None:
        """Move time forward to loop time ``when`` (never back: Rule 1);
        nothing runs until the loop does."""
        step = when - self.time()
        if step > 0:  # Rule 1: never back
            self.offset += step
            _clock.shift_wall(step)

    async def settle(self) -> None:
        """Run the loop until it is idle (Rule 2).

        Raises:
            Timeout: still busy after ``settle_timeout`` real seconds.
            ClosedError: the clock is closed.
        """
        self._check()
        give_up = time.monotonic() + self.settle_timeout
        quiet = 0
        while quiet < _IDLE_LOOKS:
            await asyncio.sleep(0)
            if not self.busy():
                quiet += 1
                continue
            quiet = 0
            if time.monotonic() > give_up:
                raise Timeout(
                    f"the loop is still busy after {self.settle_timeout} s "
                    f"({self.threads} thread jobs running): a handler that never ends?"
                )
            if self.threads and not self.loop._ready:  # type: ignore[attr-defined]
                # Only threads run: wait for them without spinning the loop.
                await asyncio.sleep(0.001)

    async def advance(self, seconds: float) -> None:
        """Move time ``seconds`` forward, firing every timer due on the way
        at its own time, settling after each (Rules 1 and 2).

        Raises:
            ConfigurationError: ``seconds`` is negative or not a finite number.
            Timeout, ClosedError: as :meth:`settle`.
        """
        if not isinstance(seconds, int | float) or not (0 <= seconds < math.inf):
            raise ConfigurationError(
                f"advance() takes a finite number of seconds >= 0, not {seconds!r}"
            )
        self._check()
        target = self.time() + seconds
        await self.settle()
        while (due := self.next_timer()) is not None and due <= target:
            self.move_to(due)
            await self.settle()
        self.move_to(target)
        await self.settle()


class _ShiftedTime:
    """A loop's ``time`` method, shifted by its clock's offset."""

    __slots__ = ("clock",)

    def __init__(self, clock: LoopClock) -> None:
        self.clock = clock

    def __call__(self) -> float:
        return time.monotonic() + self.clock.offset
