"""``request_all``: one request to every live server of a service.

The servers of a service compete for ``pigeon.svc.<service>`` (see
:mod:`.rpc`), so a request there reaches one of them. For ``request_all``:

Rule 1: every server also consumes a queue of its own,
``pigeon.all.<id>`` (classic, exclusive, auto-delete: it lives exactly as
long as the server), bound to the durable direct exchange ``pigeon.all``
with the service as key. A request published there is copied to every
live server, which answers it like any request (to ``reply_to``, with the
``correlation_id``).
Rule 2: the caller first counts the servers: the consumers of
``pigeon.svc.<service>`` (a passive declaration; the queue missing is
``NoResponders`` at once). It publishes with ``mandatory``: returned, no
server has a broadcast queue bound, ``NoResponders`` at once. Replies come
through direct reply-to, matched by correlation id, until that many came
or ``timeout`` passed.
Rule 3: a server whose handler failed gives no reply (its answer carries
``headers.ERROR``): it is counted (``request_all_rejected``), and ends the
wait like a reply. Fewer replies than ``min_replies``: ``Timeout`` (which
says how many servers failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from ...errors import NoResponders, PigeonError, Timeout
from ...message import Message, new_id
from .envelope import error_of, from_amqp, to_amqp
from .errors import map_exceptions
from .topics import BROADCAST_EXCHANGE, BROADCAST_PREFIX
from .topology import probe, service_queue

REPLY_TO = "amq.rabbitmq.reply-to"


async def listen(
    channel: AbstractRobustChannel,
    service: str,
    on_request: Callable[[AbstractIncomingMessage], Awaitable[Any]],
) -> str:
    """Rule 1, for one server: declare and consume its broadcast queue on
    ``channel`` (inside map_exceptions); return the queue's name."""
    exchange = await channel.declare_exchange(BROADCAST_EXCHANGE, "direct", durable=True)
    name = BROADCAST_PREFIX + new_id()
    # Classic: exclusive queues cannot be quorum queues.
    queue = await channel.declare_queue(
        name, exclusive=True, auto_delete=True, arguments={"x-queue-type": "classic"}
    )
    await queue.bind(exchange, service)
    await queue.consume(on_request)
    return name


class _Call:
    __slots__ = ("replies", "failures", "expected", "enough")

    def __init__(self) -> None:
        self.replies: list[Message] = []
        self.failures: list[str] = []
        self.expected = 0  # 0: not known, wait for the timeout
        self.enough = asyncio.Event()

    def check(self) -> None:
        if self.expected and len(self.replies) + len(self.failures) >= self.expected:
            self.enough.set()


class Broadcaster:
    """The caller's side (Rules 2 and 3): one channel consuming direct
    reply-to, on which the requests are published too.

    Args:
        connection: returns the connection (raises once closed).
        address: the broker's address, for errors.
        counts: the transport's counters (``request_all``...).
    """

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        address: str,
        counts: Counter[str],
    ) -> None:
        self.connection = connection
        self.address = address
        self.counts = counts
        self._channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()
        self._calls: dict[str, _Call] = {}

    async def _ready(self) -> AbstractRobustChannel:
        async with self._lock:
            if self._channel is None:
                with map_exceptions("open the broadcast reply channel", address=self.address):
                    channel = await self.connection().channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    await channel.declare_exchange(BROADCAST_EXCHANGE, "direct", durable=True)
                    queue = await channel.declare_queue(REPLY_TO, passive=True)
                    await queue.consume(self._on_reply, no_ack=True)
                self._channel = channel
            return self._channel

    async def _on_reply(self, incoming: AbstractIncomingMessage) -> None:
        call = self._calls.get(incoming.correlation_id or "")
        if call is None:
            self.counts["late_replies"] += 1
            return
        error = error_of(incoming)
        if error is None:
            call.replies.append(from_amqp(incoming))
        else:
            self.counts["request_all_rejected"] += 1
            call.failures.append(error)
        call.check()

    async def _servers(self, service: str) -> int:
        """The consumers of the service queue (Rule 2).

        Raises:
            NoResponders: the service queue does not exist.
        """
        declared = await probe(self.connection(), service_queue(service), self.address)
        if declared is None:  # nobody serves it (the queue lives while servers do)
            raise NoResponders(service)
        return declared.consumer_count or 0

    async def call(
        self, service: str, message: Message, timeout: float, min_replies: int
    ) -> list[Message]:
        """Ask every server of ``service``; see the module docstring.

        Raises:
            NoResponders: no server.
            Timeout: fewer than ``min_replies`` replies in ``timeout``.
            TransportError: the broker cannot be reached.
        """
        loop = asyncio.get_running_loop()
        ends = loop.time() + timeout
        call_id = message.id
        call = self._calls[call_id] = _Call()
        try:
            try:
                async with asyncio.timeout(timeout):
                    channel = await self._ready()
                    call.expected = await self._servers(service)
                    request = msgspec.structs.replace(message, deadline=time.time() + timeout)
                    outgoing = to_amqp(
                        request,
                        persistent=False,
                        reply_to=REPLY_TO,
                        correlation_id=call_id,
                        expiration=timeout,
                    )
                    exchange = await channel.get_exchange(BROADCAST_EXCHANGE, ensure=False)
                    with map_exceptions(
                        f"request {service!r} of all", address=self.address, service=service
                    ):
                        await exchange.publish(outgoing, service, mandatory=True)
                    self.counts["request_all"] += 1
                    call.check()
            except TimeoutError as exc:
                raise Timeout(
                    f"service {service!r}: the request to all servers was not sent "
                    f"within {timeout:.3f} s"
                ) from exc
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(ends):
                    await call.enough.wait()
        finally:
            self._calls.pop(call_id, None)
        replies = call.replies
        self.counts["request_all_replies"] += len(replies)
        if len(replies) >= min_replies:
            return replies
        failed = f" ({len(call.failures)} failed: {call.failures[0]})" if call.failures else ""
        raise Timeout(
            f"service {service!r}: {len(replies)} of the {min_replies} replies wanted came "
            f"within {timeout:.3f} s{failed}"
        )

    async def close(self) -> None:
        for call in self._calls.values():
            call.enough.set()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(PigeonError):
                with map_exceptions("close the broadcast reply channel", address=self.address):
                    await channel.close()
