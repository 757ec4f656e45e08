"""A pigeon node over ZeroMQ: hosts queues and services on its bind
addresses, and reaches other nodes through links to their addresses.

Where a queue lives: a node that binds hosts the queues it is sent to (the
seed's fountain binds, its processors connect). A node that only connects
sends to, and consumes from, the nodes it connects to.

Which nodes it links to: the URLs it was given, and those its discovery
source lists (``discover=``), whose links come and go with the source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..._core.discovery import is_ipv6
from ..._core.frames import Cancel, Consume, Frame, Hello, Reply, Request, Subscribe, Verdict
from ..._core.limits import MAX_NAME, MAX_SERVICES
from ..._core.liveness import OwnStalls
from ..._core.liveness import excused as liveness_excused
from ..._core.topics import Retention
from ...errors import (
    Backpressure,
    ClosedError,
    ConfigurationError,
    NotStartedError,
    Rejected,
    Timeout,
    TransportError,
)
from ...message import Message, make_message, new_id
from ...security.acl_file import load_acl
from .. import topic_store
from ..base import (
    ConsumeOptions,
    DeliverySink,
    ServiceHandler,
    SubscribeOptions,
    Subscription,
)
from ..host import QueueHost
from ..local import LocalServices, LocalSubscription, LocalTopicSubscription
from ..topic_host import DURABLE_PREFIX, OWN_PREFIX, TopicHost
from . import admin, security
from .caller import Caller, await_handshakes
from .config import NodeConfig, Waiters, shared_context
from .consumers import RemoteConsumers
from .discovery import Discovery
from .link import Link
from .options import NodeOptions
from .outbox import DurableOutbox
from .responder import Responder
from .router import RouterSide
from .sender import Sender
from .stats import node_stats
from .topic_side import publish_queue
from .zap import Domain, ZapHandler

# Seconds a closing node keeps its connections open after its last reply,
# for callers to read it (see ZmqTransport._let_replies_be_read).
REPLY_GRACE = 0.25


class ZmqTransport:
    """The brokerless transport; see the module docstring.

    Args:
        connect: addresses of nodes to reach.
        bind: addresses to serve on (this node then hosts queues).
        discover: a source of more addresses to reach (see
            :mod:`pigeon.transports.zmq.discovery`).
        options: see :class:`NodeOptions`.

    Raises:
        ConfigurationError: options that do not go together or are out of range.
        TypeError: an option this transport does not know.
    """

    def __init__(self, connect: list[str], bind: list[str], **options: Any) -> None:
        opts = NodeOptions(**options)
        opts.check(bind)
        source = opts.discovery_source()
        where = [*connect, *([f"discover:{source}"] if source is not None else [])]
        self.url = " ".join([*where, *(f"bind:{b}" for b in bind)])
        self.connect_addresses = list(connect)
        self.bind_addresses = list(bind)
        self.config = NodeConfig(
            node_id=f"{os.getpid()}-{new_id()}",
            heartbeat=opts.heartbeat,
            heartbeat_misses=opts.heartbeat_misses,
            max_message_size=opts.max_message_size,
            outbox_limit=opts.outbox_limit,
            connect_grace=opts.connect_grace,
        )
        self.security = security.resolve(
            where,  # (what it reads of them: whether this node connects at all)
            bind,
            node_id=self.config.node_id,
            key=opts.key,
            server_key=opts.server_key,
            allow=opts.allow,
            insecure=opts.insecure,
        )
        self.session = new_id()
        self.outbox_path = os.fspath(opts.outbox) if opts.outbox is not None else None
        self.store_path = os.fspath(opts.store) if opts.store is not None else None
        self.synchronous = opts.synchronous
        self.store_options = opts.store_options()
        self.policies = opts.queue_policies()
        self.host = QueueHost(
            policies=self.policies,
            max_queues=opts.max_queues,
            max_memory=opts.max_memory,
        )
        self.topics = TopicHost(self.host, source=self.session)
        self._subscriptions = 0  # own subscriptions made, for their queue names
        self.services = LocalServices()
        # Answering calls that nodes we connect to relay here, one per link.
        self._relayed: dict[Link, Responder] = {}
        self.links: list[Link] = []
        self._retiring: set[Link] = set()  # removed by discovery, closing
        self.discovery = (
            Discovery(
                source, self, fixed=self.connect_addresses, nameserver=opts.discovery_nameserver()
            )
            if source is not None
            else None
        )
        # Woken when a send is confirmed or a Hello heard: waits on either are
        # events, not polls.
        self._progress = Waiters()
        self._heard = Waiters()
        self.sender = self._make_sender()
        self.caller = Caller(
            self.links, self.services, attempt_timeout=opts.attempt_timeout, heard=self._heard
        )
        verdict_timeout = opts.heartbeat * opts.heartbeat_misses
        self.consumers = RemoteConsumers(self.links, verdict_timeout=verdict_timeout)
        self.last_remote_error = ""
        self.router: RouterSide | None = None
        self.zap: Domain | None = None
        self.bound: list[str] = []
        self._local_subs: list[Subscription] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.own_stalls = OwnStalls(self.config.heartbeat)
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
            no_link=self._no_link,
        )

    def _no_link(self) -> str:
        """Why a node that does not bind has nowhere to send (only discovery
        can leave it without links)."""
        why = "no node to send to: discovery has found none"
        error = self.discovery.roster.last_error if self.discovery is not None else ""
        return f"{why} ({error})" if error else why

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Open the store, bind and connect.

        Raises:
            TransportError: an address cannot be bound or connected.
            AuthenticationError: every node this one connects to refused its
                key at the handshake (keys only).
            StoreError: the store cannot be opened.
        """
        if self.store_path is not None:
            from ...store import SqliteStore

            store = await asyncio.to_thread(
                SqliteStore, self.store_path, synchronous=self.synchronous, **self.store_options
            )
            self.host = QueueHost(
                store=store,
                policies=self.policies,
                max_queues=self.host.table.max_queues,
                max_memory=self.host.table.max_memory,
            )
            self.sender = self._make_sender()
            self.topics = TopicHost(self.host, source=self.session)
            self.restored = await asyncio.to_thread(self.host.restore, topic_store.HIDDEN)
            self.topics.restore(await asyncio.to_thread(topic_store.load, store))
        if self.bind_addresses:
            await self._bind(shared_context())
        for address in self.connect_addresses:
            try:
                self.links.append(self._open_link(address))
            except TransportError:
                await self.close()
                raise
        if self.discovery is not None:
            # Before the outbox opens: what it resends needs a link to go to.
            await self.discovery.start()
        if self.outbox_path is not None:
            outbox = await DurableOutbox.open(
                self.outbox_path,
                self.synchronous,
                self.sender.sending_link,
                limit=self.config.outbox_limit,
                progress=self._progress,
                park=self.sender.park,
            )
            self.sender.outbox = outbox
            for link in self.links:
                link.durable = outbox
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._beat())
        self._started = True
        if self.security.client is not None and self.links:
            await self._first_handshakes()

    def _open_link(self, address: str) -> Link:
        """Raises:
        TransportError: libzmq refused the address.
        """
        config = self.config
        if is_ipv6(address):
            config = dataclasses.replace(config, ipv6=True)
        try:
            return Link(
                config,
                address,
                shared_context(),
                hello=self.hello,
                events=self,
                progress=self._progress,
                heard=self._heard,
                curve=self.security.client,
            )
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot connect to {address}: {exc}", address=address) from exc

    # -- what discovery changes (discovery.LinkTable) ----------------------

    def add_link(self, address: str) -> None:
        """A node discovery found: link to it. Its Hello tells which services
        it offers; the queues this node consumes are asked of it then.

        Raises:
            TransportError: libzmq refused the address.
        """
        if self._closed or any(link.address == address for link in self.links):
            return
        link = self._open_link(address)
        link.durable = self.sender.outbox
        self.consumers.attach(link)
        self.links.append(link)
        self.sender.link_added()

    def remove_link(self, address: str) -> None:
        """A node discovery no longer lists: its link is closed as a lost
        peer's is. Calls waiting on it move to other servers, its
        unconfirmed sends are resent through another link or failed
        (``Sender.rehome``), and its host is told to give our leases to
        other consumers now rather than after missed heartbeats."""
        link = next((link for link in self.links if link.address == address), None)
        if link is None:
            return
        self.links.remove(link)
        for queue in list(link.consumers):
            link.send_frame(Cancel(queue))
        self.consumers.detach(link)
        link.mark_down("removed by discovery")
        self.sender.rehome(link)
        # Closed a moment later, so the Cancel frames leave first (LINGER is 0).
        self._retiring.add(link)
        asyncio.get_running_loop().call_later(_RETIRE_AFTER, self._retire, link)

    def _retire(self, link: Link) -> None:
        if link in self._retiring:
            self._retiring.discard(link)
            link.close()

    async def _bind(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        curve = self.security.server
        if curve is not None:
            acl = self.security.acl
            assert acl is not None
            self.zap = ZapHandler.of(context).register(curve.domain, acl.knows)
        config = self.config
        if any(is_ipv6(address) for address in self.bind_addresses):
            config = dataclasses.replace(config, ipv6=True)
        self.router = RouterSide(
            config,
            context,
            hello=self.hello,
            host=self.host,
            services=self.services,
            curve=curve,
            acl=self.security.acl,
            topics=self.topics,
        )
        for address in self.bind_addresses:
            try:
                self.bound.append(self.router.bind(address))
            except zmq.ZMQError as exc:
                await self.close()  # releases the store (and its lock) too
                raise TransportError(f"cannot bind {address}: {exc}", address=address) from exc
        self.router.start()
        admin.register(self.services, self.host, self.stats, self.topics)

    async def _first_handshakes(self) -> None:
        # With keys, a refused key is the likeliest first mistake: say so at
        # once rather than at the first send. A node that is not up yet is
        # not waited for beyond connect_grace.
        def settled() -> bool:
            return all(link.up or link.auth_error is not None for link in self.links)

        await self._heard.wait_until(settled, time.monotonic() + self.config.connect_grace)
        errors = [link.auth_error for link in self.links]
        if all(error is not None for error in errors):
            await self.close()
            assert errors[0] is not None
            raise errors[0]

    def reload_acl(self) -> int:
        """Read the ACL file again (e.g. on SIGHUP) without dropping links.

        Returns how many consumers lost their grant (their leases went back).

        Raises:
            AclError: the new file is malformed; the old ACL stays in force.
        """
        path, router, zap = self.security.allow_path, self.router, self.zap
        if path is None or router is None or zap is None:
            raise ConfigurationError("this node has no ACL file to reload (allow= was not given)")
        acl = load_acl(path)
        self.security.acl = acl
        zap.allows = acl.knows
        return router.reload(acl)

    async def _beat(self) -> None:
        heartbeat, misses = self.config.heartbeat, self.config.heartbeat_misses
        while True:
            await asyncio.sleep(heartbeat)
            now = time.monotonic()
            # This loop's own stall is no silence of the peers (liveness Rule 4).
            if excused := self.own_stalls.tick(now):
                for link in self.links:
                    link.last_heard = liveness_excused(link.last_heard, excused, now)
                if self.router is not None:
                    self.router.liveness.excuse(excused, now)
            for link in self.links:
                link.send_hello()
                link.check_silent(now)
                if link.up and now - link.last_heard > link.grace(heartbeat, misses):
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
            heartbeat=self.config.heartbeat,
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
        # A node with a discovery source consumes from the hosts it finds,
        # even while it has found none.
        remote_only = not self.links and self.discovery is None
        if self.bind_addresses or remote_only:
            sub = LocalSubscription(self.host, queue, sink, options)
            self._local_subs.append(sub)
            if remote_only:
                return sub
        consume = Consume(queue, options.prefetch, options.lease_ttl, options.max_attempts)
        return await self.consumers.consume(queue, sink, consume)

    # -- topics ----------------------------------------------------------
    #
    # A node that binds hosts topics as it hosts queues; a node that only
    # connects publishes to, and subscribes at, the node its sends go to.

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        if self._closed or not self._started:
            self._check_open()
        if self.bind_addresses:
            self.sender._check_sizes([message])
            published = self.topics.publish(topic, message, fresh=True)
            if published.full is not None:
                full = published.full.buffer
                raise Backpressure(f"a 'block' subscriber of topic {topic!r}", full)
            self.sender.sent += 1
            if published.stored is not None:
                return published.stored  # on disk first (a durable node)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        queue = publish_queue(topic)
        if len(queue) > MAX_NAME:
            raise ConfigurationError(
                f"topic {topic!r} is too long to publish through another node "
                f"(at most {MAX_NAME - len(queue) + len(topic)} characters)"
            )
        return self.sender.send_nowait(queue, message, fresh=True)

    async def subscribe(
        self,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> Subscription:
        self._check_open()
        if self.bind_addresses or not self.links:
            sub = LocalTopicSubscription(self.topics, pattern, sink, options, on_disconnect)
            self._local_subs.append(sub)
            return sub

        # In place when this returns: wait for a host to say Hello (as a
        # request waits for its servers), then for its Verdict.
        def hosting() -> bool:
            return any(link.up and link.hosts_queues for link in self.links)

        await await_handshakes(self.links, self._heard, hosting, time.monotonic() + 60.0)
        link = next((link for link in self.links if link.up and link.hosts_queues), None)
        if link is None:
            raise TransportError(
                "no node that hosts topics answered to subscribe at "
                f"({', '.join(link.address for link in self.links)})"
            )
        self._subscriptions += 1
        if options.name is not None:
            queue = DURABLE_PREFIX + options.name
        else:
            queue = f"{OWN_PREFIX}{self.session}.{self._subscriptions}"
        start = options.start
        subscribe = Subscribe(
            queue,
            pattern,
            options.policy.value,
            options.buffer,
            start.from_seq,
            start.from_time,
            start.last,
            start.last_per_subject,
        )
        consume = options.consume
        return await self.consumers.consume(
            queue,
            sink,
            Consume(queue, consume.prefetch, consume.lease_ttl, consume.max_attempts),
            subscribe=subscribe,
            link=link,
            on_cut=on_disconnect,
        )

    async def retain(self, pattern: str, retention: Retention) -> None:
        self._check_open()
        if self.bind_addresses or not self.links:
            self.topics.retain(pattern, retention)
            return
        # Asked of the node that hosts the topics (its admin grant, with keys).
        request = admin.RetainRequest(
            pattern, retention.max_count, retention.max_bytes, retention.max_age
        )
        try:
            await self.caller.request(admin.RETAIN_SERVICE, make_message(request), timeout=10.0)
        except Rejected as exc:
            raise ConfigurationError(f"the topics' node refused retain(): {exc.reason}") from None

    async def request_all(
        self, service: str, message: Message, *, timeout: float, min_replies: int
    ) -> list[Message]:
        self._check_open()
        return await self.caller.request_all(service, message, timeout=timeout)

    # -- what links tell the node (link.LinkEvents) ------------------------

    def delivered(self, link: Link, queue: str, messages: list[Message]) -> None:
        self.consumers.delivered(link, queue, messages)

    def verdict(self, link: Link, verdict: Verdict) -> None:
        self.consumers.verdict(link, verdict)

    def replied(self, reply: Reply) -> None:
        self.caller.on_reply(reply)

    def requested(self, link: Link, request: Request) -> None:
        # A node this one connects to relays calls to our services (we
        # serve behind it): answered like calls that reach our own port.
        responder = self._relayed.get(link)
        if responder is None:

            def answer(_peer: bytes, frame: Frame) -> None:
                link.send_frame(frame)

            responder = self._relayed[link] = Responder(self.services, answer)
        responder.on_request(b"", request)

    def remote_error(self, link: Link, reason: str) -> None:
        self.last_remote_error = f"{link.address}: {reason}"

    def went_down(self, link: Link) -> None:
        self.caller.server_lost(link)
        self.consumers.link_changed()
        if self.discovery is not None and link in self.links:
            self.discovery.link_lost()  # a name may point elsewhere now

    # -- request-reply ---------------------------------------------------

    async def serve(self, service: str, handler: ServiceHandler) -> Subscription:
        self._check_open()
        if service not in self.services.names() and len(self.services.names()) >= MAX_SERVICES:
            raise ConfigurationError(f"a node serves at most {MAX_SERVICES} services")
        # Advertised at once, and again when it is withdrawn (a server
        # draining), rather than at the next heartbeat.
        registration = self.services.add(service, handler, on_change=self._advertise)
        self._advertise()
        return registration

    async def _let_replies_be_read(self, grace: float) -> None:
        """Keep the connections open ``grace`` seconds after the last answer
        sent: a caller's socket throws away frames it has not read yet when
        its connection drops (IMMEDIATE), and a reply lost so makes the
        caller run the call again on another server."""
        responders = [*self._relayed.values()]
        if self.router is not None:
            responders.append(self.router.responder)
        last = max((r.last_answer for r in responders), default=0.0)
        wait = last + grace - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _advertise(self) -> None:
        """Tell every peer now which services this node offers."""
        if self._closed:
            return
        for link in self.links:
            link.send_hello()
        if self.router is not None:
            self.router.announce()

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
        if self.discovery is not None:
            await self.discovery.close()  # no link comes or goes from here on
        try:
            await self.flush(timeout)
        except Timeout:
            pass  # counted and failed below (kept on disk with a durable outbox)
        if self.sender.outbox is not None:
            await self.sender.outbox.close(timeout)
        self.sender.settle_at_close()
        self.consumers.cancel_all()
        for link in self.links:
            link.flush()
        for sub in self._local_subs:
            await sub.cancel()
        # Let the Cancel frames leave before the sockets close (LINGER is 0).
        await asyncio.sleep(0)
        await self._let_replies_be_read(min(REPLY_GRACE, timeout))
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self.caller.close()
        for responder in self._relayed.values():
            responder.close()
        for link in [*self.links, *self._retiring]:
            link.close()
        self._retiring.clear()
        if self.router is not None:
            self.router.close()
            _remove_ipc_files(self.bound)
        if self.security.server is not None:
            ZapHandler.of(shared_context()).unregister(self.security.server.domain)
        await self.sender.aclose(timeout)
        await self.host.aclose(timeout)

    def stats(self) -> dict[str, Any]:
        return node_stats(self)


_RETIRE_AFTER = 0.1  # seconds a removed link stays open for its last frames


def _remove_ipc_files(addresses: list[str]) -> None:
    """Remove the socket files of the ipc:// addresses this node bound:
    libzmq leaves them behind when the socket closes, and a directory such
    as /tmp would fill with them."""
    for address in addresses:
        if not address.startswith("ipc://"):
            continue
        path = address.removeprefix("ipc://")
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):  # never a file someone else put there
                os.unlink(path)
        except OSError:
            pass  # already gone, or not ours to remove
