"""Group commit: many waiting writers share one transaction and one fsync.

An fsync costs the same for one message as for a thousand, so one writer
thread takes everything pending (up to ``max_batch`` ops) and commits it with
a single :meth:`Store.apply_many`. Under light load a batch is one op and the
latency is one commit; under heavy load batches grow and throughput follows,
while every confirmed op is still on disk.

Rules:

- The writer thread never dies of a failure. Whatever goes wrong while a
  batch is applied (disk full, a read-only file, an I/O error, a value that
  cannot be encoded, a bug), the callers waiting on that batch get
  :class:`~pigeon.errors.StoreError` at once, naming the reason, it is
  counted in :attr:`GroupCommitter.errors`, and the next batch is tried
  normally. A store has no broken state: when the disk has room again, the
  next batch commits.
- A request (one ``submit`` or ``submit_many``) is all or nothing. One that
  cannot be stored on its own (an op that does not encode, a put below the
  store's disk-free floor) fails alone; the other requests of its batch are
  committed.
- A failed batch is not retried by the committer: its callers decide.
- Reads (``read``) run in line with writes: one sees every write enqueued
  before it and none enqueued after, and its answer reaches the event loop
  after theirs. A host reading its backlog back relies on that order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from ..errors import ClosedError, ConfigurationError, PigeonError, StoreError, Timeout
from .base import Op, Store, check_ops

__all__ = ["GroupCommitter"]

log = logging.getLogger("pigeon.store")


T = TypeVar("T")


class _Request:
    """One caller's ops (or read) and the future it awaits, on its own event loop."""

    __slots__ = ("ops", "read", "future")

    def __init__(
        self,
        ops: list[Op],
        future: asyncio.Future[Any],
        read: Callable[[Store], Any] | None = None,
    ) -> None:
        self.ops = ops
        self.read = read
        self.future = future


# (future, result, error): what one caller gets once its batch is done.
Outcome = tuple[asyncio.Future[Any], Any, StoreError | None]


def _resolve(outcomes: list[Outcome]) -> None:
    """Hand outcomes to their loops: one wake-up per loop per batch, not per op."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, group)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting any more


def _settle(outcomes: list[Outcome]) -> None:
    for future, result, error in outcomes:
        if future.done():  # the caller cancelled; the op may still have been committed
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _copy_error(cause: BaseException, message: str, path: str | None) -> StoreError:
    # One exception object per future: a shared one would collect every
    # awaiting task's traceback.
    error = StoreError(message, path=path)
    error.__cause__ = cause
    return error


class GroupCommitter:
    """Commits ops submitted from asyncio code in batches, on one writer thread.

    The committer does not own the store: closing it stops the writer, and
    the caller closes the store afterwards.

    Args:
        store: where batches are applied.
        max_batch: most ops per ``apply_many``; one ``submit_many`` is never
            split, so a batch may be larger when a single call brings more.

    Attributes:
        errors: requests (``submit``/``submit_many``/``enqueue`` calls, and
            reads) that failed with StoreError, refused alone or with their
            whole batch.
        last_error: the reason of the latest failure, or "".

    Raises:
        ConfigurationError: ``max_batch`` is less than 1.
    """

    def __init__(self, store: Store, *, max_batch: int = 1000) -> None:
        if max_batch < 1:
            raise ConfigurationError(f"max_batch must be >= 1, not {max_batch}")
        self._store = store
        self._max_batch = max_batch
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._closing = False
        self.errors = 0
        self.last_error = ""
        self._logged = ""
        self._thread = threading.Thread(target=self._run, name="pigeon-store-writer", daemon=True)
        self._thread.start()

    async def submit(self, op: Op) -> bool:
        """Commit one op and return its result once it is durable.

        Cancelling the caller does not withdraw the op: it may still commit.

        Raises:
            TypeError: ``op`` is not an op.
            StoreError: the op cannot be stored, or its batch failed.
            ClosedError: the committer was closed.
        """
        return (await self.submit_many([op]))[0]

    async def submit_many(self, ops: Iterable[Op]) -> list[bool]:
        """Commit ops together (same transaction, all or nothing) and return
        their results.

        Raises:
            TypeError: an item is not an op; nothing was submitted.
            StoreError: an op cannot be stored (nothing of this call was
                applied), or the batch holding them failed.
            ClosedError: the committer was closed.
        """
        return await self.enqueue(ops)

    def enqueue(self, ops: Iterable[Op]) -> asyncio.Future[list[bool]]:
        """Like ``submit_many``, but queued at once, in the caller's order,
        and answered through the returned future.

        Cancelling the future does not withdraw the ops: they may still commit.

        Raises:
            TypeError: an item is not an op; nothing was submitted.
            ClosedError: the committer was closed.
            StoreError: the writer thread is not running.
        """
        batch = list(ops)
        check_ops(batch)
        future: asyncio.Future[list[bool]] = self._queue(batch, None)
        return future

    def read(self, read: Callable[[Store], T]) -> asyncio.Future[T]:
        """Run ``read(store)`` on the writer thread, after every write
        enqueued before it; its result (or StoreError) comes through the
        returned future.

        Raises:
            ClosedError: the committer was closed.
            StoreError: the writer thread is not running.
        """
        future: asyncio.Future[T] = self._queue([], read)
        return future

    def _queue(self, ops: list[Op], read: Callable[[Store], Any] | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            if self._closing:
                raise ClosedError("group committer is closed")
            if not ops and read is None:
                future.set_result([])
                return future
            if not self._thread.is_alive():  # cannot happen; never wait forever if it does
                raise StoreError("store writer is not running")
            self._pending.append(_Request(ops, future, read))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return  # closing, and everything is committed
                batch = self._take()
            if batch[0].read is not None:
                self._read(batch[0])
            else:
                self._commit(batch)

    def _take(self) -> list[_Request]:
        # A read goes alone, and a batch of writes stops before one: that
        # keeps reads in line with the writes around them.
        batch = [self._pending.popleft()]
        if batch[0].read is not None:
            return batch
        size = len(batch[0].ops)
        pending = self._pending
        while pending and pending[0].read is None and size + len(pending[0].ops) <= self._max_batch:
            request = pending.popleft()
            batch.append(request)
            size += len(request.ops)
        return batch

    def _read(self, request: _Request) -> None:
        """Run one read and resolve its future; never raises."""
        assert request.read is not None
        try:
            result = request.read(self._store)
        except PigeonError as exc:
            message = str(exc) if isinstance(exc, StoreError) else f"store read failed: {exc}"
            self._fail([request], exc, message)
        except Exception as exc:  # a bug or an unforeseen error: fail the read, go on
            log.exception("store read failed unexpectedly")
            self._fail([request], exc, f"store read failed unexpectedly: {type(exc).__name__}")
        else:
            _resolve([(request.future, result, None)])

    def _commit(self, batch: list[_Request]) -> None:
        """Apply one batch and resolve every future of it; never raises."""
        outcomes: list[Outcome] = []
        try:
            try:
                results = self._store.apply_many([request.ops for request in batch])
            except PigeonError as exc:  # StoreError, or ClosedError if the store was closed
                message = str(exc) if isinstance(exc, StoreError) else f"store write failed: {exc}"
                self._fail(batch, exc, message)
                return
            except Exception as exc:  # a bug or an unforeseen error: fail the batch, go on
                log.exception("store write failed unexpectedly")
                message = f"store write failed unexpectedly: {type(exc).__name__}: {exc}"
                self._fail(batch, exc, message)
                return
            for request, result in zip(batch, results, strict=True):
                if isinstance(result, StoreError):
                    self._count(result, str(result))
                    error = _copy_error(result, str(result), result.path)
                    outcomes.append((request.future, None, error))
                else:
                    self._logged = ""  # a write went through: the next failure is news
                    outcomes.append((request.future, result, None))
        except BaseException as exc:
            # Even here (a wrong number of results, an error building them),
            # nobody may be left waiting for an answer.
            answered = {id(outcome[0]) for outcome in outcomes}
            rest = [request for request in batch if id(request.future) not in answered]
            self._fail(rest, exc, f"store write failed unexpectedly: {type(exc).__name__}")
            if not isinstance(exc, Exception):
                raise
        finally:
            _resolve(outcomes)

    def _count(self, cause: BaseException, message: str) -> None:
        with self._cond:
            self.errors += 1
            self.last_error = message
        if message != self._logged:  # a failure that repeats is logged once per spell
            self._logged = message
            log.warning("%s", message)

    def _fail(self, batch: list[_Request], cause: BaseException, message: str) -> None:
        path = getattr(cause, "path", None)
        for _ in batch:
            self._count(cause, message)
        _resolve([(r.future, None, _copy_error(cause, message, path)) for r in batch])

    def close(self, *, timeout: float = 30.0) -> None:
        """Commit what is pending, then stop the writer thread; idempotent.

        Raises:
            Timeout: the writer did not finish within ``timeout`` seconds
                (the store is stuck in a commit).
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is self._thread:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise Timeout(f"store writer did not finish within {timeout} s")

    async def aclose(self) -> None:
        """Like :meth:`close`, without blocking the event loop.

        Raises:
            Timeout: the writer did not finish within 30 seconds.
        """
        await asyncio.to_thread(self.close)

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> GroupCommitter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
