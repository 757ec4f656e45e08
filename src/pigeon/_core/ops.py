"""The operations a queue host writes to its store.

They are plain data: the core decides which op goes with which ledger event
(``persistence``), a store applies them (``pigeon.store``).
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from ..message import Message


class Put(msgspec.Struct, frozen=True):
    """Store a new message in ``queue``, ready at once."""

    queue: str
    message: Message


class Ack(msgspec.Struct, frozen=True):
    """Delete a live message for good and remember its id for the dedupe window.

    ``tombstone=False`` skips remembering it: for an id no producer can
    resend (minted by the host's own process), the tombstone is wasted work.
    """

    queue: str
    id: str
    tombstone: bool = True


class Requeue(msgspec.Struct, frozen=True):
    """A nack: store the message's new attempt/headers and when it is ready again."""

    queue: str
    message: Message
    ready_at: float


class Dead(msgspec.Struct, frozen=True):
    """Move a live message to the dead letters, keeping its headers and ``reason``."""

    queue: str
    message: Message
    reason: str


class Replay(msgspec.Struct, frozen=True):
    """Move a dead letter back to the live messages, ready at once, attempt 0."""

    queue: str
    id: str


Op: TypeAlias = Put | Ack | Requeue | Dead | Replay
