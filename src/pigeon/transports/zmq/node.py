"""A pigeon node over ZeroMQ: hosts queues and services on its bind
addresses, and reaches other nodes through links to their addresses.

Where a queue lives: a node that binds hosts the queues it is sent to (the
seed's fountain binds, its processors connect). A node that only connects
sends to, and consumes from, the nodes it connects to.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import zmq

from ..._core import frames
from ..._core.frames import Consume, Hello, Reply
from ...errors import (
    Backpressure,
    ClosedError,
    ConfigurationError,
    DeliveryError,
    MessageTooLarge,
    PigeonError,
    StoreError,
    Timeout,
    TransportError,
)
from ...message import Message, new_id
from ..base import ConsumeOptions, Delivery, DeliverySink, ServiceHandler, Subscription
from ..host import QueueHost
from ..local import LocalServices, LocalSubscription
from . import admin
from .caller import Caller
from .link import Link
from .outbox import DurableOutbox
from .router import REFUSED_FULL, REFUSED_STORE, RouterSide

_context: zmq.Context[zmq.Socket[bytes]] | None = None


def shared_context() -> zmq.Context[zmq.Socket[bytes]]:
    """One zmq context per process, so ``inproc://`` works between nodes."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.Context()
    return _context


class _RemoteSubscription:
    def __init__(self, node: ZmqTransport, queue: str) -> None:
        self.node = node
        self.queue = queue

    async def cancel(self) -> None:
        self.node.cancel_remote(self.queue)


class ZmqTransport:
    """The brokerless transport; see the module docstring.

    Args:
        connect: addresses of nodes to reach.
        bind: addresses to serve on (this node then hosts queues).
        heartbeat: seconds between heartbeats; a peer is dead after
            ``heartbeat_misses`` of them pass in silence.
        max_message_size: largest body accepted, in bytes.
        outbox_limit: sends awaiting confirmation per link before ``send``
            raises :class:`~pigeon.errors.Backpressure`.
        connect_grace: how long a request waits for a new link's handshake
            before deciding that nobody offers the service.
        store: path of a SQLite file: the queues this node hosts become
            durable (a send is confirmed once it is on disk; messages survive
            a crash and come back marked redelivered). Needs ``bind``.
        outbox: path of a SQLite file that makes this producer's outbox
            durable: a send is confirmed once it is on disk here, and is
            delivered (resent after a restart of this process, retried while
            the host is away or full) until the host has stored it.
        attempt_timeout: seconds after which a call whose server has not
            answered is also sent to another server, with the same request id
            (the first reply wins). None: only when the server is lost.
        synchronous: ``"full"`` (default: every confirm is fsynced) or
            ``"normal"`` (survives a process crash, may lose the last
            confirms on power loss).
    """

    def __init__(
        self,
        connect: list[str],
        bind: list[str],
        *,
        heartbeat: float = 1.0,
        heartbeat_misses: int = 3,
        max_message_size: int = 4 << 20,
        outbox_limit: int = 100_000,
        connect_grace: float = 0.5,
        lease_ttl: float = 30.0,
        max_length: int | None = None,
        store: str | os.PathLike[str] | None = None,
        synchronous: str = "full",
        attempt_timeout: float | None = None,
        outbox: str | os.PathLike[str] | None = None,
    ) -> None:
        if outbox is not None and bind:
            raise ConfigurationError(
                "outbox= is for a node that sends to others; a node with bind= stores "
                "what it is sent with store="
            )
        if store is not None and not bind:
            raise ConfigurationError(
                "store= makes the queues a node hosts durable; give it bind= addresses too"
            )
        if synchronous not in ("full", "normal"):
            raise ConfigurationError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.url = " ".join([*connect, *(f"bind:{b}" for b in bind)])
        self.connect_addresses = list(connect)
        self.bind_addresses = list(bind)
        self.heartbeat = heartbeat
        self.heartbeat_misses = heartbeat_misses
        self.max_message_size = max_message_size
        self.outbox_limit = outbox_limit
        self.connect_grace = connect_grace
        self.node_id = f"{os.getpid()}-{new_id()}"
        self.session = new_id()
        if attempt_timeout is not None and not attempt_timeout > 0:
            raise ConfigurationError(
                f"attempt_timeout must be > 0 seconds, not {attempt_timeout!r}"
            )
        self.attempt_timeout = attempt_timeout
        self.outbox_path = os.fspath(outbox) if outbox is not None else None
        self.outbox: DurableOutbox | None = None
        self.store_path = os.fspath(store) if store is not None else None
        self.synchronous = synchronous
        self.host = QueueHost(lease_ttl=lease_ttl, max_length=max_length)
        self._local_batches: dict[str, list[Message]] = {}
        self._local_batch_future: asyncio.Future[None] | None = None
        self.services = LocalServices()
        self.caller = Caller(self)
        self.last_remote_error = ""
        self.links: list[Link] = []
        self.router: RouterSide | None = None
        self.bound: list[str] = []
        self._sinks: dict[str, DeliverySink] = {}
        self._local_subs: list[Subscription] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False
        self._started = False
        self._done_future: asyncio.Future[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self.restored = 0
        self.sent = 0

    # -- lifecycle -------------------------------------------------------

    def tune(self, sock: zmq.Socket[bytes]) -> None:
        """Socket options every pigeon socket gets."""
        sock.setsockopt(zmq.LINGER, 0)  # delivery is ours to ensure, never linger's
        # Credit and outbox limits bound every flow; socket HWMs would only drop.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size * 2 + (1 << 16))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)

    async def start(self) -> None:
        if self.store_path is not None:
            from ...store import SqliteStore

            store = await asyncio.to_thread(
                SqliteStore, self.store_path, synchronous=self.synchronous
            )
            self.host = QueueHost(
                lease_ttl=self.host.lease_ttl, max_length=self.host.max_length, store=store
            )
            self.restored = await asyncio.to_thread(self.host.restore)
        context = shared_context()
        if self.bind_addresses:
            self.router = RouterSide(self, context)
            for address in self.bind_addresses:
                try:
                    self.bound.append(self.router.bind(address))
                except zmq.ZMQError as exc:
                    await self.close()  # releases the store (and its lock) too
                    raise TransportError(f"cannot bind {address}: {exc}", address=address) from exc
            self.router.start()
            admin.register(self)
        for address in self.connect_addresses:
            try:
                link = Link(self, address, context)
            except zmq.ZMQError as exc:
                await self.close()
                raise TransportError(
                    f"cannot connect to {address}: {exc}", address=address
                ) from exc
            self.links.append(link)
        if self.outbox_path is not None:
            self.outbox = await DurableOutbox.open(self, self.outbox_path, self.synchronous)
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._beat())
        self._started = True

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            for link in self.links:
                link.send_hello()
                if link.up and now - link.last_heard > self.heartbeat * self.heartbeat_misses:
                    link.mark_down("heartbeats missed")
            if self.router is not None:
                self.router.reap(now)

    def hello(self) -> Hello:
        return Hello(
            self.node_id,
            self.session,
            self.services.names(),
            hosts_queues=bool(self.bind_addresses),
            load=self.services.load(),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"node {self.url} is closed")
        if not self._started:
            raise ClosedError(f"node {self.url} is not started")

    # -- queues ----------------------------------------------------------

    def sending_link(self) -> Link | None:
        """The link sends go to: the first that reaches a host, else the first."""
        for link in self.links:
            if link.hosts_queues:
                return link
        for link in self.links:  # none is up: the outbox waits for the first
            return link
        return None

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        if self._closed or not self._started:
            self._check_open()
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        link = None if self.bind_addresses else self.sending_link()
        if link is None and self.host.committer is not None:
            self.sent += 1
            return self._store_locally(queue, message)
        if link is None:
            if self.host.put(queue, message, fresh=fresh) is None:
                raise Backpressure(f"queue {queue!r}", self.host.max_length or 0)
            self.sent += 1
            return self._stored()
        self.sent += 1
        if self.outbox is not None:
            return self.outbox.accept(queue, [message])
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link.enqueue(queue, message, future)
        return future

    def send_many(self, queue: str, messages: list[Message]) -> asyncio.Future[None]:
        """Like ``send_nowait`` for many fresh messages; one future for all."""
        if self._closed or not self._started:
            self._check_open()
        limit = self.max_message_size
        for message in messages:
            if len(message.body) > limit:
                raise MessageTooLarge(len(message.body), limit)
        link = None if self.bind_addresses else self.sending_link()
        self.sent += len(messages)
        if link is not None and self.outbox is not None:
            return self.outbox.accept(queue, messages)
        if link is not None:
            futures = []
            for message in messages:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                link.enqueue(queue, message, future)
                futures.append(future)
            return asyncio.ensure_future(_gather(futures))
        if self.host.committer is not None:
            for message in messages:
                stored = self._store_locally(queue, message)
            return stored if messages else self._stored()
        if self.host.put_fresh(queue, messages) < len(messages):
            raise Backpressure(f"queue {queue!r}", self.host.max_length or 0)
        return self._stored()

    def _store_locally(self, queue: str, message: Message) -> asyncio.Future[None]:
        # Sends made in one loop iteration share one group commit and one
        # future, resolved when that commit is on disk.
        if self._local_batch_future is None:
            loop = asyncio.get_running_loop()
            self._local_batch_future = loop.create_future()
            loop.call_soon(self._commit_local_batch)
        self._local_batches.setdefault(queue, []).append(message)
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
                        raise Backpressure(f"queue {queue!r}", self.host.max_length or 0)
            except (StoreError, Backpressure) as exc:
                if not future.done():
                    future.set_exception(exc)
                return
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

    def refusal(self, queue: str, reason: str) -> PigeonError:
        """The error a producer gets for a host's Refuse reason."""
        if reason.startswith(REFUSED_FULL):
            return Backpressure(f"queue {queue!r} on its host", 0)
        if reason.startswith(REFUSED_STORE):
            return StoreError(f"the host could not store a message for {queue!r}: {reason}")
        return DeliveryError(f"host refused a message for queue {queue!r}: {reason}")

    async def consume(
        self, queue: str, sink: DeliverySink, options: ConsumeOptions
    ) -> Subscription:
        self._check_open()
        if self.bind_addresses or not self.links:
            sub = LocalSubscription(self.host, queue, sink, options)
            self._local_subs.append(sub)
            if not self.links:
                return sub
        self._sinks[queue] = sink
        consume = Consume(queue, options.prefetch, options.lease_ttl, options.max_attempts)
        for link in self.links:
            link.consumers[queue] = consume
            link.send_frame(consume)
        return _RemoteSubscription(self, queue)

    def cancel_remote(self, queue: str) -> None:
        self._sinks.pop(queue, None)
        for link in self.links:
            if link.consumers.pop(queue, None) is not None:
                link.send_frame(frames.Cancel(queue))

    def deliver(self, link: Link, queue: str, messages: list[Message]) -> None:
        sink = self._sinks.get(queue)
        if sink is None:
            # Cancelled meanwhile: hand them straight back.
            settle = link.pending_settle(queue)
            settle.nacks.extend((m.id, 0.0, "") for m in messages)
            return
        settler = link.settler
        sink([Delivery(queue, m, settler) for m in messages])

    # -- request-reply ---------------------------------------------------

    async def serve(self, service: str, handler: ServiceHandler) -> Subscription:
        self._check_open()
        registration = self.services.add(service, handler)
        # Advertise at once rather than at the next heartbeat.
        for link in self.links:
            link.send_hello()
        if self.router is not None:
            self.router.announce()
        return registration

    async def request(self, service: str, message: Message, *, timeout: float) -> Message:
        self._check_open()
        return await self.caller.request(service, message, timeout=timeout)

    def on_reply(self, link: Link, reply: Reply) -> None:
        self.caller.on_reply(reply)

    def on_remote_error(self, link: Link, reason: str) -> None:
        self.last_remote_error = f"{link.address}: {reason}"

    def link_down(self, link: Link, why: str) -> None:
        self.caller.server_lost(link)

    async def flush(self, timeout: float) -> None:
        """Wait until every link's outbox is confirmed.

        Raises:
            Timeout: sends are still unconfirmed after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while any(link.outbox for link in self.links) or (self.outbox and self.outbox.waiting):
            if time.monotonic() >= deadline:
                unconfirmed = sum(len(link.outbox) for link in self.links)
                raise Timeout(f"{unconfirmed} sends still unconfirmed after {timeout} s")
            await asyncio.sleep(0.001)

    # -- closing ---------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for unconfirmed sends, then close every socket.

        Sends still unconfirmed after that fail with ``TransportError`` and
        are counted in ``stats()["unconfirmed_at_close"]``.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self.flush(timeout)
        except Timeout:
            pass  # counted and failed below (kept on disk with a durable outbox)
        if self.outbox is not None:
            await self.outbox.close(timeout)
        for link in self.links:
            link.flush()
        self.unconfirmed_at_close = 0
        for link in self.links:
            if self.outbox is not None:
                # Kept on disk: the next run of this producer resends them.
                self.kept_in_outbox = len(link.outbox)
                link.outbox.clear()
                continue
            for queue, _message, future in link.outbox.values():
                self.unconfirmed_at_close += 1
                if not future.done():
                    future.set_exception(
                        TransportError(
                            f"closed before {link.address} confirmed a send to {queue!r}",
                            address=link.address,
                        )
                    )
            link.outbox.clear()
        for queue in list(self._sinks):
            self.cancel_remote(queue)
        for link in self.links:
            link.flush()
        for sub in self._local_subs:
            await sub.cancel()
        # Let the Cancel frames leave before the sockets close (LINGER is 0).
        await asyncio.sleep(0)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self.caller.close()
        for link in self.links:
            link.close()
        if self.router is not None:
            self.router.close()
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)
        await self.host.aclose(timeout)

    def stats(self) -> dict[str, Any]:
        router = self.router
        return {
            "sent": self.sent,
            "unconfirmed": sum(len(link.outbox) for link in self.links),
            "unconfirmed_at_close": getattr(self, "unconfirmed_at_close", 0),
            "request_retries": self.caller.correlator.retries,
            "late_replies": self.caller.correlator.late_replies,
            "last_remote_error": self.last_remote_error,
            "stale_settles": sum(link.stale_settles for link in self.links),
            "protocol_errors": sum(link.protocol_errors for link in self.links)
            + (router.protocol_errors if router else 0),
            "malformed_frames": sum(link.pump.malformed for link in self.links)
            + (router.pump.malformed if router and router.pump else 0),
            "peers_lost": router.peers_lost if router else 0,
            "reply_cache_hits": router.replies.hits if router else 0,
            "links": {link.address: {"up": link.up} for link in self.links},
            "bound": list(self.bound),
            "durable": self.store_path is not None,
            "restored": self.restored,
            "store_errors": self.host.store_errors,
            "outbox": self.outbox.stats() if self.outbox is not None else None,
            "queues": self.host.stats(),
        }


async def _gather(futures: list[asyncio.Future[None]]) -> None:
    await asyncio.gather(*futures)
