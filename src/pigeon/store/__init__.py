"""Where queue hosts keep messages until they are acked: SQLite on disk, or memory.

See ``docs/durability.md`` for what each mode guarantees and can lose.
"""

from __future__ import annotations

from .base import Ack, Dead, DeadLetter, Op, Page, Put, Replay, Requeue, Store, StoredMessage
from .committer import GroupCommitter
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "Ack",
    "Dead",
    "DeadLetter",
    "GroupCommitter",
    "MemoryStore",
    "Op",
    "Page",
    "Put",
    "Replay",
    "Requeue",
    "SqliteStore",
    "Store",
    "StoredMessage",
]
