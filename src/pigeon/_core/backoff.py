"""Retry policy: exponential backoff with jitter, and when to give up.

Rule 1: a failed attempt below ``max_attempts`` is retried after
``retry_delay``; the attempt that reaches ``max_attempts`` is dead-lettered.
Rule 2: the delay grows by ``factor`` per attempt, is capped at ``max_delay``
and is jittered downwards by up to ``jitter`` of itself, so a crowd of
failures does not retry in lock-step.
Rule 3: see :class:`TryWindow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a handler failure is retried.

    Attributes:
        max_attempts: deliveries before a failing message is dead-lettered.
        base_delay: seconds before the first retry.
        max_delay: the cap on any retry delay, in seconds.
        factor: growth of the delay per attempt.
        jitter: fraction (0..1) of the delay that is randomised away.
    """

    max_attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be an int >= 1, not {self.max_attempts!r}")
        # Written as "not (x >= 0)" so that NaN is refused too.
        if not (self.base_delay >= 0 and self.max_delay >= 0):
            raise ConfigurationError("retry delays must be numbers >= 0 seconds")
        if not (self.factor >= 1) or math.isinf(self.factor):
            raise ConfigurationError(f"factor must be >= 1, not {self.factor!r}")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"jitter must be within 0..1, not {self.jitter!r}")


@dataclass(frozen=True, slots=True)
class Retry:
    """Verdict: deliver again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Verdict: stop retrying; dead-letter with ``reason``."""

    reason: str


def retry_delay(policy: RetryPolicy, attempt: int, rand: float) -> float:
    """Seconds to wait after failed ``attempt`` (1-based); ``rand`` is in [0, 1)."""
    try:
        raw = policy.base_delay * policy.factor ** max(0, attempt - 1)
    except OverflowError:  # far past the cap anyway
        raw = policy.max_delay
    capped = min(policy.max_delay, raw)
    return capped * (1.0 - policy.jitter * rand)


def on_failure(policy: RetryPolicy, attempt: int, error: str, rand: float) -> Retry | DeadLetter:
    """Decide what happens to a message whose handler failed on ``attempt``."""
    if attempt >= policy.max_attempts:
        return DeadLetter(
            f"failed {attempt} of {policy.max_attempts} attempts; last error: {error}"
        )
    return Retry(retry_delay(policy, attempt, rand))


class TryWindow:
    """Rule 3: a step that fails for a moment (a broker still starting the
    queue it was asked for) is tried again, ``pause`` seconds apart, until
    ``seconds`` have passed since its first failure; then the failure
    stands. The caller decides which failures may pass, and counts tries."""

    __slots__ = ("pause", "seconds", "_ends")

    def __init__(self, seconds: float, pause: float) -> None:
        self.seconds = seconds
        self.pause = pause
        self._ends: float | None = None

    @property
    def opened(self) -> bool:
        """Whether a failure has been seen (the window runs)."""
        return self._ends is not None

    def left(self, now: float) -> float:
        """Seconds until the window closes (all of it before a failure)."""
        return self.seconds if self._ends is None else max(0.0, self._ends - now)

    def again(self, now: float) -> bool:
        """After a failure at ``now``: whether to try again (after ``pause``)."""
        if self._ends is None:
            self._ends = now + self.seconds
        return now < self._ends
