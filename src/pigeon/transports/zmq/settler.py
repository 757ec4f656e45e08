"""Settling deliveries a remote host leased to this node.

A worker's acks, nacks, rejects and extends are batched into one Settle
frame per queue per loop iteration, on the link they came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..._core.frames import Settle
from ..base import Delivery


class SettleBuffer(Protocol):
    """The part of a link a settler writes into."""

    remote_session: str
    stale_settles: int

    def pending_settle(self, queue: str) -> Settle:
        """The Settle frame for ``queue`` that leaves at the end of this iteration."""
        ...


class LinkSettler:
    """Batches a worker's settles into one Settle frame per queue per iteration.

    One settler serves the deliveries of one link while it is up. When the
    link is lost, so are they: the host gives them to others once it too has
    missed our heartbeats. ``lose`` tells whoever ``watch``-es, so a worker
    stops running them for nothing.
    """

    __slots__ = ("link", "session", "lost", "_watchers")

    def __init__(self, link: SettleBuffer, session: str) -> None:
        self.link = link
        self.session = session
        self.lost = False
        self._watchers: list[Callable[[LinkSettler], None]] = []

    def watch(self, on_lost: Callable[[LinkSettler], None]) -> None:
        """Call ``on_lost(self)`` when this settler's link is lost (at once
        if it is already)."""
        if self.lost:
            on_lost(self)
        elif on_lost not in self._watchers:
            self._watchers.append(on_lost)

    def lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        watchers, self._watchers = self._watchers, []
        for on_lost in watchers:
            on_lost(self)

    def _pending(self, delivery: Delivery) -> Settle | None:
        if self.session != self.link.remote_session:
            # That host restarted: it no longer knows this lease.
            self.link.stale_settles += 1
            return None
        return self.link.pending_settle(delivery.queue)

    def ack(self, delivery: Delivery) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.acks.append(delivery.message.id)

    def nack(self, delivery: Delivery, delay: float, reason: str) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.nacks.append((delivery.message.id, delay, reason))

    def reject(self, delivery: Delivery, reason: str) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.rejects.append((delivery.message.id, reason))

    def extend(self, delivery: Delivery) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.extends.append(delivery.message.id)
