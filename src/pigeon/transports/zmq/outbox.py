"""A producer's durable outbox: store-and-forward on the producer's side.

With ``outbox=PATH`` a connecting node writes every send to a local SQLite
file before it goes on the wire, and the send's future resolves once that
write is on disk. From then on the message is pigeon's to deliver: it is
resent until the host confirms it (the host de-duplicates by id), kept
across a crash or restart of this process, and retried when the host
refuses it for being full or for a failed store. Only the host's confirm
removes it from the file.

What is on disk goes on the wire through the link sends go to at that
moment (links come and go with discovery); while there is none, it is
parked with the sender and sent when a link comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..._core.ops import Ack, Put
from ...errors import AuthenticationError, Backpressure, StoreError
from ...message import Message
from ...store import GroupCommitter, SqliteStore
from .config import Waiters
from .link import Link

Route = Callable[[], Link | None]
Park = Callable[[str, Message, "asyncio.Future[None]"], None]

RETRY_REFUSED_AFTER = 1.0  # seconds before a refused message is sent again


class DurableOutbox:
    """The durable outbox of one connecting node (see the module docstring)."""

    def __init__(
        self,
        store: SqliteStore,
        route: Route,
        *,
        limit: int,
        progress: Waiters,
        park: Park | None = None,
    ) -> None:
        self.store = store
        self._route = route  # the link sends go to now
        self._park = park  # holds a message while there is no link
        self.limit = limit
        self._progress = progress  # woken when ``waiting`` drops
        self.committer = GroupCommitter(store)
        self.waiting = 0  # accepted, not yet on disk
        self.counts = {
            "restored": 0,
            "refused_retried": 0,
            "refused_for_good": 0,
            "write_errors": 0,
        }
        self.last_refusal = ""
        self._tasks: set[asyncio.Future[Any]] = set()

    @classmethod
    async def open(
        cls,
        path: str,
        synchronous: str,
        route: Route,
        *,
        limit: int,
        progress: Waiters,
        park: Park | None = None,
    ) -> DurableOutbox:
        """Open the file and put back on the wire what an earlier run left.

        Raises:
            StoreError: the file is damaged or used by another process.
        """
        # No tombstones: the host de-duplicates; the outbox only forgets.
        store = await asyncio.to_thread(
            SqliteStore, path, synchronous=synchronous, dedupe_window=0.0
        )
        outbox = cls(store, route, limit=limit, progress=progress, park=park)
        for stored in await asyncio.to_thread(store.load):
            outbox.forward(stored.queue, stored.message)
            outbox.counts["restored"] += 1
        return outbox

    def forward(self, queue: str, message: Message) -> None:
        """Put a message that is on disk on the wire: through the link sends
        go to now, else parked until one comes (it stays on disk either way)."""
        link = self._route()
        if link is not None:
            try:
                link.enqueue(queue, message, _unawaited())
                return
            except AuthenticationError:
                pass  # that host refuses our key: kept for another link
        if self._park is not None:
            self._park(queue, message, _unawaited())

    def accept(self, queue: str, messages: list[Message]) -> asyncio.Future[None]:
        """Write ``messages`` to the outbox file; the future resolves once they
        are on disk, and they go on the wire then.

        Raises:
            Backpressure: the outbox holds ``outbox_limit`` messages already.
        """
        link = self._route()
        assert link is not None
        limit = self.limit
        if self.waiting + len(link.outbox) + len(messages) > limit:
            raise Backpressure("durable outbox", limit)
        self.waiting += len(messages)
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spawn(self._write_then_send(queue, messages, accepted))
        return accepted

    async def _write_then_send(
        self, queue: str, messages: list[Message], accepted: asyncio.Future[None]
    ) -> None:
        try:
            await self.committer.submit_many([Put(queue, m) for m in messages])
        except StoreError as exc:
            self.counts["write_errors"] += 1
            if not accepted.done():
                accepted.set_exception(exc)
            return
        finally:
            self.waiting -= len(messages)
            self._progress.wake()
        for message in messages:
            self.forward(queue, message)  # (the link may have gone meanwhile)
        if not accepted.done():
            accepted.set_result(None)

    def confirmed(self, queue: str, message_ids: list[str]) -> None:
        """The host stored these: the outbox forgets them."""
        self._spawn(self._forget(queue, message_ids))

    async def _forget(self, queue: str, message_ids: list[str]) -> None:
        try:
            await self.committer.submit_many(
                [Ack(queue, mid, tombstone=False) for mid in message_ids]
            )
        except StoreError:
            # Still on disk: resent after a restart and de-duplicated there.
            self.counts["write_errors"] += 1

    def refused(self, link: Link, queue: str, message: Message) -> None:
        """The host could not take it now (full, or its store failed): it
        stays in the outbox and is sent again a little later."""
        self.counts["refused_retried"] += 1
        loop = asyncio.get_running_loop()
        loop.call_later(RETRY_REFUSED_AFTER, self.forward, queue, message)

    def dropped(self, queue: str, message: Message, error: Exception) -> None:
        """The host will never take it (too large for it): counted, logged in
        ``stats()``, and removed from the outbox so it does not loop."""
        self.counts["refused_for_good"] += 1
        self.last_refusal = f"{message.id} for {queue!r}: {error}"
        self.confirmed(queue, [message.id])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout: float) -> None:
        """Finish pending writes, then close the file (what is unconfirmed
        stays in it for the next run)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        await asyncio.to_thread(self.committer.close, timeout=timeout)
        self.store.close()

    def stats(self) -> dict[str, int]:
        return {**self.counts, "waiting_for_disk": self.waiting}


def _unawaited() -> asyncio.Future[None]:
    # The caller's future resolved when the message reached the disk; the
    # host's confirm resolves this one, which nobody needs to await.
    return asyncio.get_running_loop().create_future()
