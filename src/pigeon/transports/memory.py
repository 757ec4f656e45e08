"""``memory://NAME``: every connection to the same name in this process shares
one in-memory host. Same semantics as the other transports (credit, leases,
redelivery, dead letters, request-reply), nothing durable."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._core.topics import Retention
from ..errors import Backpressure, ClosedError, MessageTooLarge, NotStartedError
from ..message import Message, new_id
from .base import ConsumeOptions, DeliverySink, ServiceHandler, SubscribeOptions, Subscription
from .host import QueueHost
from .local import LocalServices, LocalSubscription, LocalTopicSubscription
from .topic_host import TopicHost


class _Hub:
    def __init__(self, max_length: int | None) -> None:
        self.host = QueueHost(max_length=max_length)
        self.topics = TopicHost(self.host, source=f"memory-{new_id()}")
        self.services = LocalServices()
        self.users = 0


_hubs: dict[str, _Hub] = {}


class MemoryTransport:
    """In-process transport; see the module docstring."""

    def __init__(
        self, url: str, *, max_message_size: int = 4 << 20, max_length: int | None = None
    ) -> None:
        self.url = url
        self.name = url.partition("://")[2] or "default"
        self.max_message_size = max_message_size
        self._max_length = max_length
        self._hub: _Hub | None = None
        self._subscriptions: list[Subscription] = []
        self._closed = False
        self.sent = 0

    async def start(self) -> None:
        hub = _hubs.get(self.name)
        if hub is None:
            hub = _hubs[self.name] = _Hub(self._max_length)
        hub.users += 1
        self._hub = hub

    def _live_hub(self) -> _Hub:
        if self._hub is None:
            if self._closed:
                raise ClosedError(f"transport {self.url} is closed")
            raise NotStartedError(f"transport {self.url} is not started; await its start() first")
        return self._hub

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        hub = self._live_hub()
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if hub.host.put(queue, message, fresh=fresh) is None:
            future.set_exception(Backpressure(f"queue {queue!r}"))
        else:
            self.sent += 1
            future.set_result(None)
        return future

    async def flush(self, timeout: float) -> None:
        """Sends are stored as they are made; nothing to wait for."""
        self._live_hub()

    async def consume(
        self, queue: str, sink: DeliverySink, options: ConsumeOptions
    ) -> Subscription:
        sub = LocalSubscription(self._live_hub().host, queue, sink, options)
        self._subscriptions.append(sub)
        return sub

    async def request(self, service: str, message: Message, *, timeout: float) -> Message:
        return await self._live_hub().services.call(service, message, timeout=timeout)

    async def serve(self, service: str, handler: ServiceHandler) -> Subscription:
        registration = self._live_hub().services.add(service, handler)
        self._subscriptions.append(registration)
        return registration

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        hub = self._live_hub()
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        published = hub.topics.publish(topic, message)
        if published.full is not None:
            raise Backpressure(f"a 'block' subscriber of topic {topic!r}", published.full.buffer)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def subscribe(
        self,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
    ) -> Subscription:
        sub = LocalTopicSubscription(self._live_hub().topics, pattern, sink, options, on_disconnect)
        self._subscriptions.append(sub)
        return sub

    async def retain(self, pattern: str, retention: Retention) -> None:
        self._live_hub().topics.retain(pattern, retention)

    async def request_all(
        self, service: str, message: Message, *, timeout: float, min_replies: int
    ) -> list[Message]:
        return await self._live_hub().services.call_all(service, message, timeout=timeout)

    async def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        hub, self._hub = self._hub, None
        if hub is None:
            return
        for sub in self._subscriptions:
            await sub.cancel()
        self._subscriptions.clear()
        hub.users -= 1
        if hub.users == 0:
            hub.host.close()
            _hubs.pop(self.name, None)

    def stats(self) -> dict[str, Any]:
        hub = self._hub
        return {
            "sent": self.sent,
            "expired_requests": hub.services.expired_requests if hub else 0,
            "queues": hub.host.stats() if hub else {},
            "topics": hub.topics.stats() if hub else {},
        }
