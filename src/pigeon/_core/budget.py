"""What one peer may have in a node's hands at once.

A node serves every peer from one event loop. Each peer has its own budget
of work the node holds for it and has not answered yet (sends being
stored, requests running), in items and in bytes.

Rule 1: past its budget a peer is told at once that the node is busy for
it (its sends are refused ``full``, so its producer backs off; its requests
are answered ``Busy``), while every other peer goes on: one peer cannot
take the node's memory or its store's writer for itself.
Rule 2: a peer holding nothing is always let in, so a single item larger
than the byte budget (but within the message size limit) still passes.
Rule 3: every refusal is counted.
"""

from __future__ import annotations

from collections.abc import Hashable

MAX_PEER_STORING = 10_000  # messages of one peer being stored at once
MAX_PEER_STORING_BYTES = 16 << 20
MAX_PEER_REQUESTS = 1_000  # requests of one peer running at once
MAX_PEER_REQUEST_BYTES = 64 << 20


class PeerBudget:
    """Items and bytes each peer has in the node's hands (see the module rules)."""

    __slots__ = ("max_items", "max_bytes", "refused", "_held")

    def __init__(self, max_items: int, max_bytes: int) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(
                f"a peer budget is at least 1 item and 1 byte, not {max_items}, {max_bytes}"
            )
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.refused = 0
        self._held: dict[Hashable, list[int]] = {}

    def take(self, peer: Hashable, items: int, size: int) -> bool:
        """Hold ``items`` of ``size`` bytes for ``peer``; False (counted) if over."""
        held = self._held.get(peer)
        if held is None:
            self._held[peer] = [items, size]  # Rule 2
            return True
        if held[0] + items > self.max_items or held[1] + size > self.max_bytes:
            self.refused += 1
            return False
        held[0] += items
        held[1] += size
        return True

    def give(self, peer: Hashable, items: int, size: int) -> None:
        """``items`` of ``peer`` were answered."""
        held = self._held.get(peer)
        if held is None:
            return
        held[0] -= items
        held[1] -= size
        if held[0] <= 0:
            del self._held[peer]

    def held(self, peer: Hashable) -> tuple[int, int]:
        """(items, bytes) ``peer`` has in the node's hands."""
        items, size = self._held.get(peer, (0, 0))
        return items, size

    def __len__(self) -> int:
        return len(self._held)
