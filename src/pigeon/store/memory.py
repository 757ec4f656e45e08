"""A store that keeps everything in memory: same rules as SQLite, nothing on disk.

For tests and for hosts that choose not to be durable: everything is lost
when the process ends. It follows every rule in :mod:`pigeon.store.base`, so
a test written against it holds for :class:`~pigeon.store.sqlite.SqliteStore`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from ..errors import ConfigurationError, StoreError
from .base import (
    Ack,
    Dead,
    DeadLetter,
    Encoded,
    Op,
    Page,
    Put,
    Requeue,
    StoredMessage,
    check_ops,
    closed_error,
    decode_message,
    encode_message,
    encode_request,
)

__all__ = ["MemoryStore"]

Key = tuple[str, str]


class MemoryStore:
    """An in-memory :class:`~pigeon.store.base.Store`; thread-safe, not durable.

    Args:
        dedupe_window: seconds an acked id is still refused as a duplicate.
        clock: wall-clock source, replaceable in tests.

    Raises:
        ConfigurationError: ``dedupe_window`` is negative.
    """

    def __init__(
        self, *, dedupe_window: float = 120.0, clock: Callable[[], float] = time.time
    ) -> None:
        if dedupe_window < 0:
            raise ConfigurationError(f"dedupe_window must be >= 0, not {dedupe_window}")
        self._window = dedupe_window
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False
        # dicts keep insertion order: updating a value keeps its place (Requeue),
        # deleting and re-adding moves it to the end (Dead, Replay).
        # A live entry is (position, blob, ready_at); positions only grow.
        self._live: dict[Key, tuple[int, bytes, float]] = {}
        self._position = 0
        self._dead: dict[Key, tuple[bytes, str, float]] = {}
        self._tombstones: dict[Key, float] = {}
        self._last_prune = clock()
        self.refused_ops = 0

    def apply(self, ops: Sequence[Op]) -> list[bool]:
        """Apply ``ops`` in order, all or nothing.

        Returns:
            One bool per op, as :meth:`pigeon.store.base.Store.apply` says.

        Raises:
            TypeError: an item is not an op; nothing was applied.
            StoreError: an op cannot be stored; nothing was applied.
            ClosedError: the store was closed.
        """
        (result,) = self.apply_many([ops])
        if isinstance(result, StoreError):
            raise result
        return result

    def apply_many(self, requests: Sequence[Sequence[Op]]) -> list[list[bool] | StoreError]:
        """Apply requests in order; one that cannot be stored is refused alone.

        Returns:
            Per request, its results or the StoreError that refused it (see
            :meth:`pigeon.store.base.Store.apply_many`).

        Raises:
            TypeError: an item is not an op; nothing was applied.
            ClosedError: the store was closed.
        """
        for ops in requests:
            check_ops(ops)
        with self._lock:
            if self._closed:
                raise closed_error("memory store")
            outcomes: list[list[bool] | StoreError] = []
            encoded: list[list[Encoded] | None] = []
            for ops in requests:
                try:
                    encoded.append(encode_request(ops))
                except StoreError as exc:
                    self.refused_ops += len(ops)
                    encoded.append(None)
                    outcomes.append(exc)
                    continue
                outcomes.append([])
            now = self._clock()
            self._prune(now)
            for i, request in enumerate(encoded):
                if request is not None:
                    outcomes[i] = [self._apply_one(e, now) for e in request]
            return outcomes

    def _apply_one(self, encoded: Encoded, now: float) -> bool:
        # Nothing below can fail once the request encoded, so it is all or nothing.
        op = encoded.op
        if isinstance(op, Put):
            key = (op.queue, op.message.id)
            if key in self._live or key in self._dead:
                return False
            acked_at = self._tombstones.get(key)
            if acked_at is not None and now - acked_at <= self._window:
                return False
            self._tombstones.pop(key, None)
            self._live[key] = (self._next_position(), encoded.blob, 0.0)
            return True
        if isinstance(op, Ack):
            key = (op.queue, op.id)
            if self._live.pop(key, None) is None:
                return False
            if self._window > 0 and op.tombstone:
                self._tombstones[key] = now
            return True
        if isinstance(op, Requeue):
            key = (op.queue, op.message.id)
            live = self._live.get(key)
            if live is None:
                return False
            self._live[key] = (live[0], encoded.blob, op.ready_at)
            return True
        if isinstance(op, Dead):
            key = (op.queue, op.message.id)
            if self._live.pop(key, None) is None:
                return False
            self._dead[key] = (encoded.blob, op.reason, now)
            return True
        key = (op.queue, op.id)
        dead = self._dead.pop(key, None)
        if dead is None:
            return False
        message = decode_message(dead[0])
        message.attempt = 0
        self._live[key] = (self._next_position(), encode_message(message), 0.0)
        return True

    def _next_position(self) -> int:
        self._position += 1
        return self._position

    def _prune(self, now: float) -> None:
        # Lazy: a scan at most every half window keeps the cost per apply flat.
        if now - self._last_prune < self._window / 2:
            return
        self._last_prune = now
        cutoff = now - self._window
        self._tombstones = {k: t for k, t in self._tombstones.items() if t >= cutoff}

    def load(self) -> list[StoredMessage]:
        """Return every live message in insertion order.

        Raises:
            ClosedError: the store was closed.
        """
        with self._lock:
            self._check_open()
            return [
                StoredMessage(queue, decode_message(data), ready_at)
                for (queue, _), (_, data, ready_at) in self._live.items()
            ]

    def page(self, queue: str, after: int, *, limit: int, max_bytes: int) -> Page:
        """Return live messages of ``queue`` after position ``after``.

        See :meth:`pigeon.store.base.Store.page` (this store scans them all).

        Raises:
            ClosedError: the store was closed.
        """
        rows: list[tuple[int, StoredMessage]] = []
        size = 0
        with self._lock:
            self._check_open()
            for (q, _), (position, data, ready_at) in self._live.items():
                if q != queue or position <= after:
                    continue
                if len(rows) >= limit or (rows and size >= max_bytes):
                    return Page(rows, True)
                rows.append((position, StoredMessage(q, decode_message(data), ready_at)))
                size += len(data)
        return Page(rows, False)

    def position(self) -> int:
        """The position of the latest row written (0 for an empty store).

        Raises:
            ClosedError: the store was closed.
        """
        with self._lock:
            self._check_open()
            return self._position

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """Return the dead letters, of one queue or all, in the order they died.

        Raises:
            ClosedError: the store was closed.
        """
        with self._lock:
            self._check_open()
            return [
                DeadLetter(q, decode_message(data), reason, died_at)
                for (q, _), (data, reason, died_at) in self._dead.items()
                if queue is None or q == queue
            ]

    def counts(self) -> dict[str, dict[str, int]]:
        """Return ``{queue: {"ready": n, "dead": m}}`` for every non-empty queue.

        Raises:
            ClosedError: the store was closed.
        """
        with self._lock:
            self._check_open()
            counts: dict[str, dict[str, int]] = {}
            for kind, table in (("ready", self._live), ("dead", self._dead)):
                for queue, _ in table:
                    entry = counts.setdefault(queue, {"ready": 0, "dead": 0})
                    entry[kind] += 1
            return counts

    def stats(self) -> dict[str, Any]:
        """Return ``{"refused_ops": n}``: ops refused because they could not be stored."""
        return {"refused_ops": self.refused_ops}

    def close(self) -> None:
        """Close the store and drop its contents; closing twice is allowed.

        Raises:
            Nothing; the signature matches the other stores.
        """
        with self._lock:
            self._closed = True
            self._live.clear()
            self._dead.clear()
            self._tombstones.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error("memory store")

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
