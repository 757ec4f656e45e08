"""The host's policy for each queue: the node's defaults, and overrides by name.

Rule 1: a queue's policy is the node's defaults with one override applied:
the one for its exact name if there is one, else the first pattern that
matches, in the order they were given. In a pattern ``*`` stands for one
dot-separated segment and a final ``>`` for one or more.
Rule 2: overrides come from the node's configuration or from a peer with
admin rights (``pigeon.declare``); declaring a name again replaces its
override whole.
Rule 3: every value is checked before it is taken: a bad one is a
ValueError naming the queue and the field, and nothing changes.
Rule 4: no consumer changes any of it (see ``QueuePolicy``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from .limits import MAX_FRAME_ITEMS, MAX_NAME, MAX_SECONDS, QueuePolicy, check_name

# Fields an override may set, and the range each must be in.
INT_FIELDS = {
    "max_attempts": (0, 2**31 - 1),
    "max_prefetch": (1, MAX_FRAME_ITEMS),
    "max_length": (1, 2**62),
    "max_bytes": (1, 2**62),
}
SECONDS_FIELDS = ("lease_ttl", "max_lease_ttl", "max_delay")
FIELDS = frozenset(INT_FIELDS) | frozenset(SECONDS_FIELDS)
MAX_OVERRIDES = 10_000  # names and patterns one node keeps overrides for


def check_pattern(pattern: object) -> str:
    """``pattern`` if it is a queue name or a pattern of one.

    Raises:
        TypeError: not a str.
        ValueError: not a name, or a wildcard used where it may not be.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"a queue pattern must be a str, not {type(pattern).__name__}")
    if "*" not in pattern and ">" not in pattern:
        return check_name(pattern, "queue")
    segments = pattern.split(".")
    if len(pattern) > MAX_NAME or any(s == ">" for s in segments[:-1]):
        raise ValueError(f"queue pattern {pattern!r}: '>' may only be the last segment")
    for segment in segments:
        if segment not in ("*", ">"):
            check_name(segment, "queue pattern segment")
    return pattern


def matches(pattern: str, name: str) -> bool:
    """True if queue ``name`` matches ``pattern`` (Rule 1's wildcards)."""
    want, have = pattern.split("."), name.split(".")
    for i, segment in enumerate(want):
        if segment == ">":
            return len(have) > i
        if i >= len(have) or (segment != "*" and segment != have[i]):
            return False
    return len(want) == len(have)


def check_fields(queue: str, fields: Mapping[str, object]) -> dict[str, int | float]:
    """The override ``fields`` for ``queue``, each checked (Rule 3).

    Raises:
        ValueError: an unknown field, or a value of the wrong type or range.
    """
    checked: dict[str, int | float] = {}
    for name, value in fields.items():
        if name in INT_FIELDS:
            low, high = INT_FIELDS[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"queue {queue!r}: {name} must be an int {low} to {high}, not {value!r}"
                )
            checked[name] = value
        elif name in SECONDS_FIELDS:
            seconds = float(value) if isinstance(value, (int, float)) else math.nan
            if isinstance(value, bool) or not 0 < seconds <= MAX_SECONDS:  # NaN fails too
                raise ValueError(
                    f"queue {queue!r}: {name} must be 0 to {MAX_SECONDS:g} seconds, not {value!r}"
                )
            checked[name] = seconds
        else:
            known = ", ".join(sorted(FIELDS))
            raise ValueError(f"queue {queue!r}: unknown policy field {name!r} (known: {known})")
    return checked


class QueuePolicies:
    """The defaults and the overrides of one host (see the module rules)."""

    def __init__(
        self,
        default: QueuePolicy | None = None,
        overrides: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        self.default = default or QueuePolicy()
        self._overrides: dict[str, dict[str, int | float]] = {}
        self._cache: dict[str, QueuePolicy] = {}
        for pattern, fields in (overrides or {}).items():
            self.declare(pattern, fields)

    def declare(self, pattern: str, fields: Mapping[str, object]) -> QueuePolicy:
        """Set the override of ``pattern`` (Rule 2); returns the policy it makes.

        Raises:
            TypeError, ValueError: a bad pattern or field (Rule 3).
        """
        check_pattern(pattern)
        checked = check_fields(pattern, fields)
        if pattern not in self._overrides and len(self._overrides) >= MAX_OVERRIDES:
            raise ValueError(f"a node keeps at most {MAX_OVERRIDES} queue policies")
        policy = self._apply(checked)  # may raise: then nothing changed
        self._overrides[pattern] = checked
        self._cache.clear()
        return policy

    def _apply(self, fields: Mapping[str, int | float]) -> QueuePolicy:
        policy = dataclasses.replace(self.default, **fields)  # type: ignore[arg-type]
        if policy.max_lease_ttl < policy.lease_ttl:
            policy = dataclasses.replace(policy, max_lease_ttl=policy.lease_ttl)
        return policy

    def for_queue(self, name: str) -> QueuePolicy:
        """The policy of queue ``name`` (Rule 1)."""
        policy = self._cache.get(name)
        if policy is None:
            fields = self._overrides.get(name)
            if fields is None:
                fields = next(
                    (
                        f
                        for p, f in self._overrides.items()
                        if ("*" in p or ">" in p) and matches(p, name)
                    ),
                    {},
                )
            policy = self._apply(fields) if fields else self.default
            if len(self._cache) >= MAX_OVERRIDES:
                self._cache.clear()  # bounded: queues come and go
            self._cache[name] = policy
        return policy

    def overrides(self) -> dict[str, dict[str, int | float]]:
        """Every override, by name or pattern (for stats)."""
        return {pattern: dict(fields) for pattern, fields in self._overrides.items()}
