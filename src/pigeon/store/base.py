"""The store interface: the operations a queue host writes, and what it reads back.

A store keeps every message a queue host has accepted until it is acked, plus
its dead letters. The host batches operations and hands them to
:meth:`Store.apply`, which applies the whole batch in one transaction with one
commit: when ``apply`` returns, the batch is durable (as durable as the
store's mode promises) and the host may confirm it.

Rules every store follows:

1. Only :class:`Ack` deletes a message. Leases are not stored; a message that
   was handed out but not acked is still live in the store.
2. A message is keyed by ``(queue, id)``. A :class:`Put` of a key that is live,
   dead, or acked less than ``dedupe_window`` seconds ago is a duplicate: it
   changes nothing and returns False. Acked keys are remembered as tombstones
   so a producer resending after a restart does not bring them back.
3. ``load`` returns live messages in insertion order. A :class:`Requeue` keeps
   a message's place; :class:`Dead` and :class:`Replay` move it to the end of
   the dead letters or the live messages.
4. Ops in one batch apply in order, so a batch may put and ack the same id.
5. A store never writes what it could not read back. Every op is encoded and
   checked before the transaction; one that fails (an attempt count msgpack
   cannot hold, a string that is not UTF-8, a message the decoder would
   refuse) is refused with :class:`~pigeon.errors.StoreError` on its own, and
   :meth:`Store.apply_many` still applies the other requests of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import TracebackType
from typing import Any, NamedTuple, Protocol

import msgspec

from .._core.ops import Ack, Dead, Op, Put, Replay, Requeue
from ..errors import ClosedError, StoreError
from ..message import Message

__all__ = [
    "Ack",
    "Dead",
    "DeadLetter",
    "Encoded",
    "Op",
    "Page",
    "Put",
    "Replay",
    "Requeue",
    "Store",
    "StoredMessage",
    "check_ops",
    "encode_request",
]


_OP_TYPES = (Put, Ack, Requeue, Dead, Replay)


class StoredMessage(msgspec.Struct, frozen=True):
    """A live message as :meth:`Store.load` returns it.

    Attributes:
        queue: the queue it belongs to.
        message: the message as last written (by Put or Requeue).
        ready_at: wall-clock seconds when it may be delivered; 0.0 means now.
    """

    queue: str
    message: Message
    ready_at: float


class DeadLetter(msgspec.Struct, frozen=True):
    """A dead letter as :meth:`Store.dead_letters` returns it.

    Attributes:
        queue: the queue it died in.
        message: the message as it was when it died (headers included).
        reason: why it died.
        died_at: wall-clock seconds when it died.
    """

    queue: str
    message: Message
    reason: str
    died_at: float


class Page(NamedTuple):
    """Live messages of one queue read back in insertion order (:meth:`Store.page`).

    Attributes:
        rows: ``(position, stored message)`` pairs; a position orders rows
            in the whole store and only grows.
        more: live rows of the queue lie past the last one returned.
    """

    rows: list[tuple[int, StoredMessage]]
    more: bool


def check_ops(ops: Sequence[Op]) -> None:
    """Check that every item is an op, before anything is applied.

    Raises:
        TypeError: an item is not one of Put, Ack, Requeue, Dead, Replay.
    """
    for op in ops:
        if not isinstance(op, _OP_TYPES):
            raise TypeError(
                f"store ops must be Put, Ack, Requeue, Dead or Replay, not {type(op).__name__}"
            )


def closed_error(what: str) -> ClosedError:
    """Return the error for using a store after it was closed."""
    return ClosedError(f"{what} is closed")


# Stores keep messages as msgpack bytes: SQLite needs bytes anyway, and the
# memory store copies through the same codec so a caller mutating a message
# (its headers dict) after ``apply`` cannot change what the store holds.
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_message(message: Message) -> bytes:
    """Return the stored form of ``message``."""
    return _encoder.encode(message)


def decode_message(data: bytes) -> Message:
    """Return the message stored as ``data``.

    Raises:
        msgspec.DecodeError: ``data`` is not a stored message.
    """
    return _decoder.decode(data)


class Encoded(NamedTuple):
    """An op checked and encoded for a store, before any transaction.

    Attributes:
        op: the op.
        blob: the stored form of its message (Put, Requeue, Dead); empty for
            Ack and Replay.
    """

    op: Op
    blob: bytes = b""


def _op_key(op: Op) -> tuple[str, str]:
    return op.queue, (op.message.id if isinstance(op, (Put, Requeue, Dead)) else op.id)


# Queue names already known to be valid text: there are few, and every op has one.
_good_names: set[str] = set()


def _check_text(value: Any) -> None:
    if value not in _good_names:
        if not isinstance(value, str):
            raise TypeError(f"expected a str, not {type(value).__name__}")
        value.encode()  # UnicodeEncodeError for a lone surrogate: SQLite cannot bind it
        if len(_good_names) > 10_000:
            _good_names.clear()
        _good_names.add(value)


def _encode_op(op: Op) -> Encoded:
    _check_text(op.queue)
    kind = type(op)
    if kind is Ack or kind is Replay:
        op.id.encode()  # type: ignore[union-attr]
        return Encoded(op)
    if kind is Dead:
        op.reason.encode()  # type: ignore[union-attr]
    elif kind is Requeue and not math.isfinite(op.ready_at):  # type: ignore[union-attr]
        raise ValueError(f"ready_at must be a finite number, not {op.ready_at!r}")  # type: ignore[union-attr]
    blob = _encoder.encode(op.message)  # type: ignore[union-attr]
    # Rule 5: what the decoder would refuse (a bound the wire also checks)
    # must not reach the disk, or every later load of the store would fail.
    _decoder.decode(blob)
    return Encoded(op, blob)


def encode_request(ops: Sequence[Op]) -> list[Encoded]:
    """Check and encode the ops of one request, before any transaction.

    Raises:
        StoreError: an op cannot be stored (its message does not encode, or
            would not decode again, or a name is not valid text); the message
            says which op and why.
    """
    encoded = []
    for op in ops:
        try:
            encoded.append(_encode_op(op))
        except Exception as exc:  # any value that cannot be stored refuses this op alone
            queue, key = _op_key(op)
            raise StoreError(
                f"cannot store {type(op).__name__} of {key!r} in queue {queue!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return encoded


class Store(Protocol):
    """A durable (or, for tests, in-memory) store of queued messages."""

    def apply(self, ops: Sequence[Op]) -> list[bool]:
        """Apply ``ops`` in order, in one transaction with one commit.

        Args:
            ops: the batch; may be empty.

        Returns:
            One bool per op. For Put: True if the key was new, False if it is
            a duplicate. For the others: True if the key existed in the state
            the op needs (live for Ack/Requeue/Dead, dead for Replay).

        Raises:
            TypeError: an item is not an op; nothing was applied.
            StoreError: an op cannot be stored, or the batch could not be
                committed; nothing of it was applied. A later call tries
                again: a store has no broken state to reopen from.
            ClosedError: the store was closed.
        """
        ...

    def apply_many(self, requests: Sequence[Sequence[Op]]) -> list[list[bool] | StoreError]:
        """Apply several requests in order, in one transaction with one commit.

        Each request is all or nothing. A request that cannot be applied on
        its own (an op that cannot be encoded, a put refused by a disk-free
        floor) gets a :class:`~pigeon.errors.StoreError` in its place and
        changes nothing; the other requests are applied.

        Returns:
            Per request: its results (as :meth:`apply` returns them), or the
            error that refused it.

        Raises:
            TypeError: an item is not an op; nothing was applied.
            StoreError: the transaction failed (disk full, I/O error, ...);
                nothing of the batch was applied. Later calls try again.
            ClosedError: the store was closed.
        """
        ...

    def load(self) -> list[StoredMessage]:
        """Return every live (not dead) message, in insertion order.

        Raises:
            StoreError: the store could not be read.
            ClosedError: the store was closed.
        """
        ...

    def page(self, queue: str, after: int, *, limit: int, max_bytes: int) -> Page:
        """Return live messages of ``queue`` placed after position ``after``.

        A durable host reads its backlog back this way, a window at a time,
        instead of holding every body in memory. At most ``limit`` rows come
        back, and no more once their stored bytes reach ``max_bytes`` (at
        least one row is always returned if any is there).

        Raises:
            StoreError: the store could not be read, or a row fails its
                checksum or does not decode.
            ClosedError: the store was closed.
        """
        ...

    def position(self) -> int:
        """The position of the latest row written (0 for an empty store).

        Raises:
            StoreError: the store could not be read.
            ClosedError: the store was closed.
        """
        ...

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """Return the dead letters, of one queue or all, in the order they died.

        Raises:
            StoreError: the store could not be read.
            ClosedError: the store was closed.
        """
        ...

    def counts(self) -> dict[str, dict[str, int]]:
        """Return ``{queue: {"ready": n, "dead": m}}`` for every non-empty queue.

        Raises:
            StoreError: the store could not be read.
            ClosedError: the store was closed.
        """
        ...

    def stats(self) -> dict[str, Any]:
        """Return the store's counters (refused ops, write errors, quarantine, ...)."""
        ...

    def close(self) -> None:
        """Close the store; closing twice is allowed.

        Raises:
            StoreError: the store could not be closed cleanly.
        """
        ...

    def __enter__(self) -> Store: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
