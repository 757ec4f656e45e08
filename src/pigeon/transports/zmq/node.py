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
from collections.abc import Callable
from typing import Any

import zmq

from ..._core import frames
from ..._core.frames import Consume, Hello, Reply
from ...errors import ClosedError, ConfigurationError, NotStartedError, Timeout, TransportError
from ...message import Message, new_id
from ..base import ConsumeOptions, Delivery, DeliverySink, ServiceHandler, Subscription
from ..host import QueueHost
from ..local import LocalServices, LocalSubscription
from . import admin
from .caller import Caller
from .config import NodeConfig, Waiters, shared_context
from .link import Link
from .outbox import DurableOutbox
from .router import RouterSide
from .sender import Sender


class _RemoteSubscription:
    def __init__(self, cancel: Callable[[str], None], queue: str) -> None:
        self._cancel = cancel
        self.queue = queue

    async def cancel(self) -> None:
        self._cancel(self.queue)


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
        if attempt_timeout is not None and not attempt_timeout > 0:
            raise ConfigurationError(
                f"attempt_timeout must be > 0 seconds, not {attempt_timeout!r}"
            )
        self.config = NodeConfig(
            node_id=f"{os.getpid()}-{new_id()}",
            heartbeat=heartbeat,
            heartbeat_misses=heartbeat_misses,
            max_message_size=max_message_size,
            outbox_limit=outbox_limit,
            connect_grace=connect_grace,
        )
        self.session = new_id()
        self.attempt_timeout = attempt_timeout
        self.outbox_path = os.fspath(outbox) if outbox is not None else None
        self.store_path = os.fspath(store) if store is not None else None
        self.synchronous = synchronous
        self.host = QueueHost(lease_ttl=lease_ttl, max_length=max_length)
        self.services = LocalServices()
        self.links: list[Link] = []
        # Woken when a send is confirmed or a Hello heard: waits on either are
        # events, not polls.
        self._progress = Waiters()
        self._heard = Waiters()
        self.sender = self._make_sender()
        self.caller = Caller(
            self.links, self.services, attempt_timeout=attempt_timeout, heard=self._heard
        )
        self.last_remote_error = ""
        self.router: RouterSide | None = None
        self.bound: list[str] = []
        self._sinks: dict[str, DeliverySink] = {}
        self._local_subs: list[Subscription] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False
        self._started = False
        self.restored = 0

    def _make_sender(self) -> Sender:
        return Sender(
            self.host,
            self.links,
            hosts_queues=bool(self.bind_addresses),
            max_message_size=self.config.max_message_size,
            progress=self._progress,
        )

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if self.store_path is not None:
            from ...store import SqliteStore

            store = await asyncio.to_thread(
                SqliteStore, self.store_path, synchronous=self.synchronous
            )
            self.host = QueueHost(
                lease_ttl=self.host.lease_ttl, max_length=self.host.max_length, store=store
            )
            self.sender = self._make_sender()
            self.restored = await asyncio.to_thread(self.host.restore)
        context = shared_context()
        if self.bind_addresses:
            self.router = RouterSide(
                self.config, context, hello=self.hello, host=self.host, services=self.services
            )
            for address in self.bind_addresses:
                try:
                    self.bound.append(self.router.bind(address))
                except zmq.ZMQError as exc:
                    await self.close()  # releases the store (and its lock) too
                    raise TransportError(f"cannot bind {address}: {exc}", address=address) from exc
            self.router.start()
            admin.register(self.services, self.host, self.stats)
        for address in self.connect_addresses:
            try:
                link = Link(
                    self.config,
                    address,
                    context,
                    hello=self.hello,
                    events=self,
                    progress=self._progress,
                    heard=self._heard,
                )
            except zmq.ZMQError as exc:
                await self.close()
                raise TransportError(
                    f"cannot connect to {address}: {exc}", address=address
                ) from exc
            self.links.append(link)
        if self.outbox_path is not None:
            outbox = await DurableOutbox.open(
                self.outbox_path,
                self.synchronous,
                self.sender.sending_link,
                limit=self.config.outbox_limit,
                progress=self._progress,
            )
            self.sender.outbox = outbox
            for link in self.links:
                link.durable = outbox
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._beat())
        self._started = True

    async def _beat(self) -> None:
        heartbeat, misses = self.config.heartbeat, self.config.heartbeat_misses
        while True:
            await asyncio.sleep(heartbeat)
            now = time.monotonic()
            for link in self.links:
                link.send_hello()
                if link.up and now - link.last_heard > heartbeat * misses:
                    link.mark_down("heartbeats missed")
            if self.router is not None:
                self.router.reap(now)

    def hello(self) -> Hello:
        return Hello(
            self.config.node_id,
            self.session,
            self.services.names(),
            hosts_queues=bool(self.bind_addresses),
            load=self.services.load(),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"node {self.url} is closed")
        if not self._started:
            raise NotStartedError(f"node {self.url} is not started; await its start() first")

    # -- queues ----------------------------------------------------------

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        if self._closed or not self._started:
            self._check_open()
        return self.sender.send_nowait(queue, message, fresh=fresh)

    def send_many(self, queue: str, messages: list[Message]) -> asyncio.Future[None]:
        """Like ``send_nowait`` for many fresh messages; one future for all."""
        if self._closed or not self._started:
            self._check_open()
        return self.sender.send_many(queue, messages)

    def withdraw(self, future: asyncio.Future[None]) -> bool:
        """Stop resending a send whose caller gave up on it (see ``Sender.withdraw``)."""
        return self.sender.withdraw(future)

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
        return _RemoteSubscription(self.cancel_remote, queue)

    def cancel_remote(self, queue: str) -> None:
        self._sinks.pop(queue, None)
        for link in self.links:
            if link.consumers.pop(queue, None) is not None:
                link.send_frame(frames.Cancel(queue))

    # -- what links tell the node (link.LinkEvents) ------------------------

    def delivered(self, link: Link, queue: str, messages: list[Message]) -> None:
        sink = self._sinks.get(queue)
        if sink is None:
            # Cancelled meanwhile: hand them straight back.
            settle = link.pending_settle(queue)
            settle.nacks.extend((m.id, 0.0, "") for m in messages)
            return
        settler = link.settler
        sink([Delivery(queue, m, settler) for m in messages])

    def replied(self, reply: Reply) -> None:
        self.caller.on_reply(reply)

    def remote_error(self, link: Link, reason: str) -> None:
        self.last_remote_error = f"{link.address}: {reason}"

    def went_down(self, link: Link) -> None:
        self.caller.server_lost(link)

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

    async def flush(self, timeout: float) -> None:
        """Wait until every link's outbox is confirmed.

        Raises:
            Timeout: sends are still unconfirmed after ``timeout`` seconds.
        """
        await self.sender.flush(time.monotonic() + timeout, timeout)

    # -- closing ---------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for unconfirmed sends, then close every socket.

        Sends still unconfirmed after that fail with ``TransportError`` and
        are counted in ``stats()["unconfirmed_at_close"]``; a send whose
        caller already saw it time out is not waited for nor failed again.
        """
        if self._closed:
            return
        self._closed = True
        try:
            await self.flush(timeout)
        except Timeout:
            pass  # counted and failed below (kept on disk with a durable outbox)
        if self.sender.outbox is not None:
            await self.sender.outbox.close(timeout)
        self.sender.settle_at_close()
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
        await self.sender.aclose(timeout)
        await self.host.aclose(timeout)

    def stats(self) -> dict[str, Any]:
        router = self.router
        sender = self.sender
        return {
            "sent": sender.sent,
            "unconfirmed": sum(len(link.outbox) for link in self.links),
            "unconfirmed_at_close": sender.unconfirmed_at_close,
            "withdrawn": sender.withdrawn,
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
            "outbox": sender.outbox.stats() if sender.outbox is not None else None,
            "queues": self.host.stats(),
        }
