"""``--push URL=QUEUE``: consume a queue and push each message to plain PULL peers."""

from __future__ import annotations

import time

import zmq

from .._core.bridging import Malformed
from ..transports import Delivery
from .base import PlainBridge, ready


class PushBridge(PlainBridge):
    """A queue feeds plain PULL peers (binds by default: the seed's
    processors connect).

    Guarantee: a delivery is acked only once ZeroMQ took it for a connected
    PULL peer, so until then it is the queue's (at-least-once: a bridge
    that dies has its deliveries redelivered). After the send it is
    at-most-once: a plain PULL has no acks, and what sits in a peer's
    buffers when it dies is lost. With no PULL peer, or peers that do not
    keep up, the send waits (its lease extended), the bridge holds at most
    ``max_in_flight`` deliveries and the rest stays in the queue:
    backpressure, not loss. ZeroMQ deals the messages round-robin over the
    connected peers, as a plain PUSH does.

    Counters: ``received``, ``passed`` (sent and acked), ``malformed``
    (empty bodies, which no plain peer could tell from nothing: dead-lettered
    with a reason), ``dropped`` (always 0: nothing is acked unsent),
    ``send_waits`` (times a send waited ``send_timeout`` for a peer).
    """

    send_timeout = 1.0
    lease_ttl = 30.0

    async def start(self) -> PushBridge:
        self.counts.update(send_waits=0)
        # A small send buffer: a message is handed to ZeroMQ only when a peer
        # can take it, so little sits where nobody acks it.
        self._sock = self._open(zmq.PUSH, self.spec.endpoints[0], SNDHWM=1)
        self._worker = await self.conn.consume(
            self.spec.name, self._send, prefetch=self.max_in_flight, lease_ttl=self.lease_ttl
        )
        return self

    async def _send(self, delivery: Delivery) -> None:
        self.counts["received"] += 1
        body = delivery.body
        if not body:
            self._count_malformed(Malformed.EMPTY)
            await delivery.reject(reason="empty body: a plain ZeroMQ peer cannot receive it")
            return
        await self._room.acquire()
        try:
            extended = time.monotonic()
            while True:
                if await ready(self._sock, self.send_timeout, zmq.POLLOUT):
                    try:
                        await self._sock.send(body, zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    self.counts["passed"] += 1
                    return  # returning acks
                self.counts["send_waits"] += 1
                if time.monotonic() - extended > self.lease_ttl / 3:
                    await delivery.extend()
                    extended = time.monotonic()
        finally:
            self._room.release()

    async def _stop(self, timeout: float) -> None:
        # Waiting deliveries are handed back to the queue, not dropped.
        await self._worker.drain(grace=timeout)
