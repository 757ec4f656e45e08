"""Group commit: many waiting writers share one transaction and one fsync.

An fsync costs the same for one message as for a thousand, so one writer
thread takes everything pending (up to ``max_batch`` ops) and commits it with
a single :meth:`Store.apply`. Under light load a batch is one op and the
latency is one commit; under heavy load batches grow and throughput follows,
while every confirmed op is still on disk.

Rule: a failed batch is never retried. Its callers and everyone still
waiting get :class:`~pigeon.errors.StoreError`, and so does every later
submit, until the store is reopened and a new committer made.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterable
from types import TracebackType

from ..errors import ClosedError, ConfigurationError, PigeonError, StoreError, Timeout
from .base import Op, Store, check_ops

__all__ = ["GroupCommitter"]


class _Request:
    """One caller's ops and the future it awaits, on its own event loop."""

    __slots__ = ("ops", "future")

    def __init__(self, ops: list[Op], future: asyncio.Future[list[bool]]) -> None:
        self.ops = ops
        self.future = future


# (future, result, error): what one caller gets once its batch is done.
Outcome = tuple[asyncio.Future[list[bool]], list[bool] | None, StoreError | None]


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
            future.set_result(result or [])


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
        max_batch: most ops per ``apply``; one ``submit_many`` is never split,
            so a batch may be larger when a single call brings more.

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
        self._error: StoreError | None = None
        self._thread = threading.Thread(target=self._run, name="pigeon-store-writer", daemon=True)
        self._thread.start()

    async def submit(self, op: Op) -> bool:
        """Commit one op and return its result once it is durable.

        Cancelling the caller does not withdraw the op: it may still commit.

        Raises:
            TypeError: ``op`` is not an op.
            StoreError: the commit failed, or an earlier one did.
            ClosedError: the committer was closed.
        """
        return (await self.submit_many([op]))[0]

    async def submit_many(self, ops: Iterable[Op]) -> list[bool]:
        """Commit ops together (same transaction) and return their results.

        Raises:
            TypeError: an item is not an op; nothing was submitted.
            StoreError: the commit failed, or an earlier one did.
            ClosedError: the committer was closed.
        """
        batch = list(ops)
        check_ops(batch)
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._error is not None:
                raise _copy_error(
                    self._error, f"store refuses writes: {self._error}", self._error.path
                )
            if self._closing:
                raise ClosedError("group committer is closed")
            if not batch:
                return []
            future: asyncio.Future[list[bool]] = loop.create_future()
            self._pending.append(_Request(batch, future))
            self._cond.notify()
        return await future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return  # closing, and everything is committed
                batch = self._take()
            if not self._commit(batch):
                return

    def _take(self) -> list[_Request]:
        batch = [self._pending.popleft()]
        size = len(batch[0].ops)
        while self._pending and size + len(self._pending[0].ops) <= self._max_batch:
            request = self._pending.popleft()
            batch.append(request)
            size += len(request.ops)
        return batch

    def _commit(self, batch: list[_Request]) -> bool:
        """Apply one batch and resolve its futures; False once the store failed."""
        ops = [op for request in batch for op in request.ops]
        settled = False
        try:
            try:
                results = self._store.apply(ops)
            except PigeonError as exc:  # StoreError, or ClosedError if the store was closed
                self._fail(batch, exc)
                settled = True
                return False
            outcomes: list[Outcome] = []
            start = 0
            for request in batch:
                outcomes.append((request.future, results[start : start + len(request.ops)], None))
                start += len(request.ops)
            _resolve(outcomes)
            settled = True
            return True
        finally:
            if not settled:
                # apply raised something unexpected: it propagates and ends the
                # thread, but nobody may be left waiting for an answer.
                self._fail(batch, StoreError("store writer failed unexpectedly"))

    def _fail(self, batch: list[_Request], cause: BaseException) -> None:
        path = getattr(cause, "path", None)
        with self._cond:
            self._error = _copy_error(cause, str(cause), path)
            batch = batch + list(self._pending)
            self._pending.clear()
        message = f"store write failed: {cause}"
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
