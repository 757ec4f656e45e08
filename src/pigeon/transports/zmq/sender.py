"""The producer side of a node: where each send goes, and waiting for confirms.

The route is decided in one place (:meth:`Sender.route`):

- ``HOST``: this node binds, so it hosts the queue in memory; confirmed on
  the next loop iteration.
- ``HOST_DURABLE``: it hosts the queue in its store; confirmed once the group
  commit is on disk.
- ``LINK``: a remote node hosts it; confirmed when that host says so.
- ``OUTBOX``: as ``LINK``, through this node's durable outbox; confirmed once
  the send is on this node's disk.

A node that does not bind and has no link (discovery has found no node yet)
refuses a send at once with ``TransportError``: there is nowhere to put it.
When discovery removes a link, its unconfirmed sends move to the link sends
go to now (:meth:`Sender.rehome`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

import msgspec

from ..._core.limits import message_size
from ...errors import (
    AuthenticationError,
    Backpressure,
    MessageTooLarge,
    PigeonError,
    Timeout,
    TransportError,
)
from ...message import Message
from ..host import QueueHost
from .config import Waiters
from .link import Link
from .outbox import DurableOutbox


class Route(enum.Enum):
    HOST = enum.auto()
    HOST_DURABLE = enum.auto()
    LINK = enum.auto()
    OUTBOX = enum.auto()


class Sender:
    """Sends of one node (see the module docstring)."""

    def __init__(
        self,
        host: QueueHost,
        links: list[Link],
        *,
        hosts_queues: bool,
        max_message_size: int,
        progress: Waiters,
        no_link: Callable[[], str] = lambda: "no node to send to",
    ) -> None:
        self.host = host
        self._no_link = no_link  # why there is no link, for the TransportError
        self.links = links  # the node's own list
        self.hosts_queues = hosts_queues
        self.max_message_size = max_message_size
        self.outbox: DurableOutbox | None = None
        self._progress = progress  # woken when a link's outbox or the outbox's queue shrinks
        self._local_batches: dict[str, list[Message]] = {}
        self._local_batch_future: asyncio.Future[None] | None = None
        self._done_future: asyncio.Future[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self.sent = 0
        self.withdrawn = 0
        self.unconfirmed_at_close = 0
        self.kept_in_outbox = 0
        self.moved = 0  # unconfirmed sends of a removed link resent through another
        self.failed_on_removal = 0  # ... and those failed, with no other link to go to
        # Sends of a removed link that a durable outbox keeps while no link
        # is left: on disk, and sent when discovery finds a node.
        self._parked: list[tuple[str, Message, asyncio.Future[None]]] = []
        self._storing = 0  # local durable sends not yet committed (flush waits for them)

    def sending_link(self) -> Link | None:
        """The link sends go to: the first that reaches a host, else the first."""
        for link in self.links:
            if link.hosts_queues:
                return link
        return self.links[0] if self.links else None

    def route(self) -> tuple[Route, Link | None]:
        """Where a send goes now (the module docstring lists the routes)."""
        if self.hosts_queues:
            return (Route.HOST if self.host.committer is None else Route.HOST_DURABLE), None
        link = self.sending_link()
        if link is None:
            raise TransportError(self._no_link())
        return (Route.LINK if self.outbox is None else Route.OUTBOX), link

    def _check_sizes(self, messages: list[Message]) -> None:
        limit = self.max_message_size
        for message in messages:
            size = message_size(message.body, message.headers)
            if size > limit:
                raise MessageTooLarge(size, limit)

    def send_nowait(self, queue: str, message: Message, *, fresh: bool) -> asyncio.Future[None]:
        self._check_sizes([message])
        route, link = self.route()
        if route is Route.HOST and self.host.put(queue, message, fresh=fresh) is None:
            raise Backpressure(f"queue {queue!r}")
        self.sent += 1
        return self._dispatch(route, link, queue, [message])

    def send_many(self, queue: str, messages: list[Message]) -> asyncio.Future[None]:
        self._check_sizes(messages)
        route, link = self.route()
        if route is Route.HOST and self.host.put_fresh(queue, messages) < len(messages):
            raise Backpressure(f"queue {queue!r}")
        self.sent += len(messages)
        return self._dispatch(route, link, queue, messages)

    def _dispatch(
        self, route: Route, link: Link | None, queue: str, messages: list[Message]
    ) -> asyncio.Future[None]:
        if route is Route.HOST:  # already put by the caller
            return self._stored()
        if route is Route.HOST_DURABLE:
            return self._store_locally(queue, messages)
        assert link is not None
        if route is Route.OUTBOX:
            assert self.outbox is not None
            return self.outbox.accept(queue, messages)
        loop = asyncio.get_running_loop()
        if len(messages) == 1:
            future: asyncio.Future[None] = loop.create_future()
            link.enqueue(queue, messages[0], future)
            return future
        futures = []
        for message in messages:
            future = loop.create_future()
            link.enqueue(queue, message, future)
            futures.append(future)
        return asyncio.ensure_future(_gather(futures))

    def _store_locally(self, queue: str, messages: list[Message]) -> asyncio.Future[None]:
        # Sends made in one loop iteration share one group commit and one
        # future, resolved when that commit is on disk.
        if self._local_batch_future is None:
            loop = asyncio.get_running_loop()
            self._local_batch_future = loop.create_future()
            loop.call_soon(self._commit_local_batch)
        self._local_batches.setdefault(queue, []).extend(messages)
        self._storing += len(messages)
        return self._local_batch_future

    def _commit_local_batch(self) -> None:
        batches, self._local_batches = self._local_batches, {}
        future, self._local_batch_future = self._local_batch_future, None
        assert future is not None

        async def commit() -> None:
            try:
                for queue, messages in batches.items():
                    results = await self.host.put_many(queue, messages)
                    if None in results:
                        raise Backpressure(f"queue {queue!r}")
            except asyncio.CancelledError:
                if not future.done():
                    future.set_exception(
                        TransportError("the node closed before the send was stored")
                    )
                raise
            except Exception as exc:  # StoreError, Backpressure, closed meanwhile, or a bug
                if not future.done():
                    future.set_exception(exc)  # every send is answered, never left waiting
                return
            finally:
                self._storing -= sum(len(m) for m in batches.values())
                self._progress.wake()
            if not future.done():
                future.set_result(None)

        task = asyncio.ensure_future(commit())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _stored(self) -> asyncio.Future[None]:
        # Stored here and now. All such sends of one loop iteration share one
        # future (its result is None, so sharing is safe), resolved on the
        # next iteration: awaiting a confirm then yields to the loop, so a
        # producer that paces itself on confirms lets dispatch run.
        future = self._done_future
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._done_future = loop.create_future()
            loop.call_soon(self._resolve_stored)
        return future

    def _resolve_stored(self) -> None:
        future, self._done_future = self._done_future, None
        if future is not None and not future.done():
            future.set_result(None)

    # -- links that come and go (discovery) ---------------------------------

    def rehome(self, link: Link) -> None:
        """``link`` was removed: its unconfirmed sends go to the link sends go
        to now, with their ids and futures. Each is marked ``redelivered``:
        the removed node may have stored it, even handed it out, before it
        went, and another host cannot tell a resend from a new message, so
        the flag keeps its promise (never set on a message that may have
        been seen). With no link left they are failed with
        ``TransportError``, or, with a durable outbox, parked until a link
        comes (they are on disk either way)."""
        entries = list(link.outbox.values())
        link.outbox.clear()
        target = self.sending_link()
        for queue, message, future in entries:
            again = msgspec.structs.replace(message, redelivered=True)
            if target is not None:
                try:
                    target.enqueue(queue, again, future)
                    self.moved += 1
                    continue
                except (Backpressure, AuthenticationError) as exc:
                    error: PigeonError = exc
            else:
                error = TransportError(
                    f"{link.address} was removed before it confirmed a send to {queue!r}, "
                    "and no other node is known",
                    address=link.address,
                )
            if self.outbox is not None:
                self._parked.append((queue, again, future))
                continue
            self.failed_on_removal += 1
            if not future.done():
                future.set_exception(error)
        self._progress.wake()

    def park(self, queue: str, message: Message, future: asyncio.Future[None]) -> None:
        """Hold a send of the durable outbox while there is no link to send it
        through (it is on disk); ``link_added`` sends it."""
        self._parked.append((queue, message, future))
        self._progress.wake()

    def link_added(self) -> None:
        """A link was added: parked sends go to the link sends go to now."""
        target = self.sending_link()
        if target is None or not self._parked:
            return
        parked, self._parked = self._parked, []
        for queue, message, future in parked:
            try:
                target.enqueue(queue, message, future)
            except AuthenticationError:
                self._parked.append((queue, message, future))  # for another link
                continue
            self.moved += 1
        self._progress.wake()

    # -- confirms ----------------------------------------------------------

    def unconfirmed(self) -> int:
        waiting = self.outbox.waiting if self.outbox is not None else 0
        linked = sum(len(link.outbox) for link in self.links)
        return linked + waiting + self._storing + len(self._parked)

    async def flush(self, deadline: float, timeout: float) -> None:
        """Wait until every send is confirmed (``deadline`` on ``time.monotonic()``).

        Raises:
            Timeout: sends are still unconfirmed at the deadline.
        """
        if not await self._progress.wait_until(lambda: not self.unconfirmed(), deadline):
            unconfirmed = self.unconfirmed()
            raise Timeout(f"{unconfirmed} sends still unconfirmed after {timeout} s")

    def withdraw(self, future: asyncio.Future[None]) -> bool:
        """The caller gave up on the send behind ``future`` (it was told
        Timeout): stop resending it, and neither wait for it nor fail it
        again at close."""
        withdrawn = any(link.withdraw(future) for link in self.links)
        self.withdrawn += withdrawn
        return withdrawn

    def settle_at_close(self) -> None:
        """Sends still unconfirmed at close: kept on disk with a durable
        outbox (the next run resends them), failed and counted otherwise."""
        for link in self.links:
            link.flush()
            if self.outbox is not None:
                self.kept_in_outbox += len(link.outbox)
                link.outbox.clear()
            else:
                self.unconfirmed_at_close += link.fail_unconfirmed(_closed_before(link))
        self.kept_in_outbox += len(self._parked)  # (parked only with a durable outbox)
        self._parked.clear()

    async def aclose(self, timeout: float) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)


def _closed_before(link: Link) -> Callable[[str], PigeonError]:
    def error(queue: str) -> PigeonError:
        return TransportError(
            f"closed before {link.address} confirmed a send to {queue!r}", address=link.address
        )

    return error


async def _gather(futures: list[asyncio.Future[None]]) -> None:
    await asyncio.gather(*futures)
