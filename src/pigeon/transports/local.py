"""In-process pieces shared by the memory and ZeroMQ transports: local
consumers of a :class:`QueueHost`, and a table of local services."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from .._core.policy import least_loaded
from .._core.service_stats import ServiceCounts
from ..errors import NoResponders, Rejected, Timeout
from ..message import Message
from .base import (
    ConsumeOptions,
    Delivery,
    DeliverySink,
    HandlerOutcome,
    ServiceHandler,
    SubscribeOptions,
    run_service_handler,
)
from .host import QueueHost
from .topic_host import TopicHost


class HostSettler:
    """Settles deliveries of a local consumer straight into the host."""

    __slots__ = ("host", "consumer")

    def __init__(self, host: QueueHost, consumer: Hashable) -> None:
        self.host = host
        self.consumer = consumer

    def ack(self, delivery: Delivery) -> None:
        self.host.settle(delivery.queue, self.consumer, acks=[delivery.message.id])

    def nack(self, delivery: Delivery, delay: float, reason: str) -> None:
        self.host.settle(
            delivery.queue, self.consumer, nacks=[(delivery.message.id, delay, reason)]
        )

    def reject(self, delivery: Delivery, reason: str) -> None:
        self.host.settle(delivery.queue, self.consumer, rejects=[(delivery.message.id, reason)])

    def extend(self, delivery: Delivery) -> None:
        self.host.settle(delivery.queue, self.consumer, extends=[delivery.message.id])


class LocalSubscription:
    """A local consumer of a host queue."""

    def __init__(self, host: QueueHost, queue: str, sink: DeliverySink, options: ConsumeOptions):
        self.host = host
        self.queue = queue
        self.settler = HostSettler(host, self)

        def deliver(queue: str, messages: list[Message]) -> None:
            settler = self.settler
            sink([Delivery(queue, m, settler) for m in messages])

        host.subscribe(
            queue,
            self,
            deliver,
            prefetch=options.prefetch,
            lease_ttl=options.lease_ttl,
        )

    async def drain(self) -> None:
        self.host.drain(self.queue, self)

    async def cancel(self) -> None:
        self.host.unsubscribe(self.queue, self)


class LocalTopicSubscription:
    """A subscriber in the process whose node hosts the topics: its
    subscription's queue, consumed like any local queue."""

    def __init__(
        self,
        topics: TopicHost,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> None:
        self.topics = topics
        self.queue = topics.subscribe(
            pattern,
            name=options.name,
            policy=options.policy,
            buffer=options.buffer,
            start=options.start,
        )
        self._consumer = LocalSubscription(topics.host, self.queue, sink, options.consume)
        topics.consumed(self.queue, self._consumer)
        self._told = on_disconnect
        topics.listen(self.queue, on_disconnect)

    async def drain(self) -> None:
        await self._consumer.drain()

    async def cancel(self) -> None:
        await self._consumer.cancel()
        self.topics.unlisten(self.queue, self._told)
        self.topics.left(self.queue, self._consumer, lost=False)


@dataclass(eq=False)
class _LocalServer:
    handler: ServiceHandler
    outstanding: int = 0


def _outstanding(server: _LocalServer) -> int:
    return server.outstanding


class LocalServices:
    """Services served in this process, least-outstanding first."""

    def __init__(self) -> None:
        self._servers: dict[str, list[_LocalServer]] = {}
        self._rotation = itertools.count()
        # Calls whose deadline passed before their handler started or while
        # it ran: nobody waits for their answer.
        self.expired_requests = 0
        self.counts = ServiceCounts()  # calls, errors and latency of each service

    def servers(self, service: str) -> int:
        """How many handlers here serve ``service``."""
        return len(self._servers.get(service, ()))

    def stats(self) -> dict[str, dict[str, Any]]:
        """Calls, errors and latency percentiles of each service called here."""
        return self.counts.snapshot()

    def names(self) -> list[str]:
        return sorted(self._servers)

    def offers(self, service: str) -> bool:
        return bool(self._servers.get(service))

    def add(
        self,
        service: str,
        handler: ServiceHandler,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> _ServiceRegistration:
        """Serve ``service`` here; ``on_change`` is called when it is withdrawn."""
        server = _LocalServer(handler)
        self._servers.setdefault(service, []).append(server)
        return _ServiceRegistration(self, service, server, on_change)

    def remove(self, service: str, server: _LocalServer) -> None:
        servers = self._servers.get(service, [])
        if server in servers:
            servers.remove(server)
        if not servers:
            self._servers.pop(service, None)

    def load(self) -> int:
        return sum(s.outstanding for servers in self._servers.values() for s in servers)

    async def call(self, service: str, message: Message, *, timeout: float | None) -> Message:
        """Run a local server's handler on ``message``; ``timeout`` None means
        the caller enforces the deadline (by cancelling the call).

        Raises:
            NoResponders: nobody here serves ``service``.
            Timeout: the handler took longer than ``timeout``.
            Rejected: the handler raised.
        """
        servers = self._servers.get(service)
        if not servers:
            raise NoResponders(service)
        server = least_loaded(servers, _outstanding, next(self._rotation))
        assert server is not None  # servers is not empty
        started = time.perf_counter()
        try:
            outcome = await self._run(server, message, timeout)
        except asyncio.CancelledError:  # its caller's deadline passed
            self.counts.record(service, time.perf_counter() - started, failed=True)
            raise
        self.counts.record(
            service,
            time.perf_counter() - started,
            failed=bool(outcome.error or outcome.expired or outcome.reply is None),
        )
        return self._answer(service, outcome, timeout)

    async def call_all(self, service: str, message: Message, *, timeout: float) -> list[Message]:
        """Run every local server's handler on ``message``; the replies of
        those that answered in time, in no set order.

        Raises:
            NoResponders: nobody here serves ``service``.
        """
        servers = list(self._servers.get(service) or ())
        if not servers:
            raise NoResponders(service)
        outcomes = await asyncio.gather(*(self._run(s, message, timeout) for s in servers))
        replies = []
        for outcome in outcomes:
            try:
                replies.append(self._answer(service, outcome, timeout))
            except (NoResponders, Timeout, Rejected):
                continue  # a server that failed is not a reply; the caller counts what came
        return replies

    @staticmethod
    async def _run(server: _LocalServer, message: Message, timeout: float | None) -> HandlerOutcome:
        server.outstanding += 1
        try:
            return await run_service_handler(server.handler, message, timeout)
        finally:
            server.outstanding -= 1

    def _answer(self, service: str, outcome: HandlerOutcome, timeout: float | None) -> Message:
        if outcome.stopped:  # cut short by a drain: the caller may go elsewhere
            raise NoResponders(service)
        if outcome.expired:
            self.expired_requests += 1
            raise Timeout(f"service {service!r} did not answer within {timeout} s")
        if outcome.error or outcome.reply is None:
            raise Rejected(service, outcome.error or "the handler gave no reply")
        return outcome.reply


class _ServiceRegistration:
    def __init__(
        self,
        table: LocalServices,
        service: str,
        server: _LocalServer,
        on_change: Callable[[], None] | None,
    ) -> None:
        self._table = table
        self._service = service
        self._server = server
        self._on_change = on_change

    async def cancel(self) -> None:
        self._table.remove(self._service, self._server)
        if self._on_change is not None:
            self._on_change()
