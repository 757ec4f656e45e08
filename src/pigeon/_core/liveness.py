"""Peer liveness from heartbeats.

Rule 1: every frame from a peer counts as a sign of life.
Rule 2: a peer not heard from for ``interval * misses`` seconds is dead, and
is reported dead exactly once (until it is heard from again).
"""

from __future__ import annotations

from collections.abc import Hashable


class Liveness:
    """Tracks when each peer was last heard from."""

    def __init__(self, *, interval: float = 1.0, misses: int = 3) -> None:
        self.interval = interval
        self.misses = misses
        self._last_heard: dict[Hashable, float] = {}

    @property
    def grace(self) -> float:
        """Seconds of silence after which a peer is dead."""
        return self.interval * self.misses

    def heard(self, peer: Hashable, now: float) -> bool:
        """Record a sign of life; returns True when the peer is new (or back)."""
        new = peer not in self._last_heard
        self._last_heard[peer] = now
        return new

    def is_alive(self, peer: Hashable, now: float) -> bool:
        last = self._last_heard.get(peer)
        return last is not None and now - last <= self.grace

    def forget(self, peer: Hashable) -> None:
        self._last_heard.pop(peer, None)

    def reap(self, now: float) -> list[Hashable]:
        """Return (and forget) every peer silent for longer than the grace."""
        dead = [p for p, last in self._last_heard.items() if now - last > self.grace]
        for peer in dead:
            del self._last_heard[peer]
        return dead

    def peers(self) -> list[Hashable]:
        return list(self._last_heard)
