"""Peer liveness from heartbeats.

Rule 1: every frame from a peer counts as a sign of life.
Rule 2: a peer not heard from for its grace is dead, and is reported dead
exactly once (until it is heard from again).
Rule 3: a peer's grace is ``misses`` times the longer of our own interval and
the interval the peer said it beats at (``Hello.heartbeat``), so a peer that
beats slower than we do is not declared dead while alive. What a peer may
claim is capped at ``MAX_PEER_HEARTBEAT``: no claim keeps a silent peer's
leases held for longer than ``misses`` times that.
Rule 4: a stall of this node's own loop is not its peers' silence. The
heartbeat check runs once per interval; when it runs more than two
intervals after the last run, the loop was held up (a CPU-starved or paused
process, a long blocking call) while the peers' frames waited unread in
its sockets. The time past one interval is then excused to every peer
(:class:`OwnStalls` measures it, :meth:`Liveness.excuse` applies it): a
dead peer is found that much later, a live one is not declared dead.
"""

from __future__ import annotations

from collections.abc import Hashable

MAX_PEER_HEARTBEAT = 60.0  # seconds: the longest interval a peer may claim


def peer_grace(own: float, claimed: float, misses: int) -> float:
    """Seconds of silence after which a peer that beats every ``claimed``
    seconds (0: it did not say) is dead, for a node that beats every ``own``."""
    interval = max(own, min(claimed, MAX_PEER_HEARTBEAT)) if claimed > 0 else own
    return interval * misses


class Liveness:
    """Tracks when each peer was last heard from."""

    def __init__(self, *, interval: float = 1.0, misses: int = 3) -> None:
        self.interval = interval
        self.misses = misses
        self._last_heard: dict[Hashable, float] = {}
        self._grace: dict[Hashable, float] = {}  # peers that said their interval

    @property
    def grace(self) -> float:
        """Seconds of silence after which a peer that did not say its interval is dead."""
        return self.interval * self.misses

    def grace_of(self, peer: Hashable) -> float:
        return self._grace.get(peer, self.grace)

    def heard(self, peer: Hashable, now: float, *, interval: float | None = None) -> bool:
        """Record a sign of life; returns True when the peer is new (or back).

        ``interval`` is what the peer's Hello says it beats at (Rule 3).
        """
        new = peer not in self._last_heard
        self._last_heard[peer] = now
        if interval is not None:
            grace = peer_grace(self.interval, interval, self.misses)
            if grace == self.grace:
                self._grace.pop(peer, None)
            else:
                self._grace[peer] = grace
        return new

    def knows(self, peer: Hashable) -> bool:
        """Whether ``peer`` was heard from and not forgotten since."""
        return peer in self._last_heard

    def is_alive(self, peer: Hashable, now: float) -> bool:
        last = self._last_heard.get(peer)
        return last is not None and now - last <= self.grace_of(peer)

    def forget(self, peer: Hashable) -> None:
        self._last_heard.pop(peer, None)
        self._grace.pop(peer, None)

    def excuse(self, seconds: float, now: float) -> None:
        """Move every peer's last sign of life ``seconds`` later (Rule 4)."""
        last_heard = self._last_heard
        for peer, last in last_heard.items():
            last_heard[peer] = excused(last, seconds, now)

    def reap(self, now: float) -> list[Hashable]:
        """Return (and forget) every peer silent for longer than its grace."""
        grace, default = self._grace, self.grace
        dead = [p for p, last in self._last_heard.items() if now - last > grace.get(p, default)]
        for peer in dead:
            self.forget(peer)
        return dead

    def peers(self) -> list[Hashable]:
        return list(self._last_heard)


def excused(last: float, seconds: float, now: float) -> float:
    """A last sign of life at ``last`` with ``seconds`` of stall excused: never
    later than ``now`` (a peer read right after the stall is not given the
    stall again)."""
    return min(last + seconds, now)


class OwnStalls:
    """How late this node's own heartbeat checks run (Rule 4).

    ``tick(now)`` at each check returns the seconds to excuse to every peer:
    0 unless the check ran more than two intervals after the previous one,
    else how far past one interval it ran. Stalls are counted.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stalls = 0
        self.excused = 0.0  # seconds in all
        self._last: float | None = None

    def tick(self, now: float) -> float:
        last, self._last = self._last, now
        if last is None:
            return 0.0
        late = now - last - self.interval
        if late <= self.interval:
            return 0.0  # a check late by less than an interval is ordinary jitter
        self.stalls += 1
        self.excused += late
        return late
