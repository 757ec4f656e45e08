"""Peers that do not speak pigeon: what they looked like, and what to answer.

A plain ZeroMQ socket can reach a pigeon node (or be reached by one) and
get nowhere: libzmq refuses some socket pairs at the handshake, and the
pairs it allows exchange frames that one side cannot read. Nothing here
waits in silence.

Rule 1: each foreign peer is counted and logged once (per connection for
a node that serves, per link for one that connects).
Rule 2: a peer that can read an answer gets one: a REQ (its message is an
empty delimiter then the body) gets ``[empty, REFUSAL]``, which it reads as
its reply; any other readable peer gets an ``Error`` frame.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable

REFUSAL = (
    b"this is a pigeon node: it speaks the pigeon protocol (one frame: version byte 0x01, "
    b"then a msgpack array), not REQ/REP; see docs/protocol.md"
)


class Foreign(enum.Enum):
    """How a peer showed it does not speak pigeon."""

    REQ = "REQ framing: an empty delimiter frame, then the body"
    MULTIPART = "a message of several frames (pigeon sends one)"
    NOT_PIGEON = "a first frame that is not a pigeon frame"
    HANDSHAKE = (
        "it dropped the ZeroMQ handshake (a socket type that cannot talk to this one, "
        "e.g. PUSH, or not ZeroMQ at all; or a client that closed before its handshake ended)"
    )
    SILENT = "it completed the ZeroMQ handshake but did not answer Hello (e.g. a REP or ROUTER)"


def classify(parts: list[bytes]) -> Foreign:
    """What a message of several parts from a peer looked like (without the
    ROUTER's routing id)."""
    if len(parts) >= 2 and parts[0] == b"":
        return Foreign.REQ
    return Foreign.MULTIPART


MAX_REMEMBERED = 10_000  # foreign peers remembered (to count each once)


class ForeignTally:
    """Counts foreign peers once each (Rule 1); remembers a bounded number."""

    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self.count = 0
        self.last = ""  # the last one: its address and what it looked like
        self._limit = limit
        self._seen: dict[Hashable, None] = {}

    def seen(self, peer: Hashable, address: str, kind: Foreign) -> bool:
        """Record a foreign peer; True the first time (then log it)."""
        if peer in self._seen:
            return False
        if len(self._seen) >= self._limit:
            # Forget the older half: a peer forgotten and seen again is
            # counted again, which over-counts, never hides one.
            keep = list(self._seen)[self._limit // 2 :]
            self._seen = dict.fromkeys(keep)
        self._seen[peer] = None
        self.count += 1
        self.last = f"{address or 'unknown address'}: {kind.value}"
        return True
