"""``--pull URL=QUEUE``: read a plain PUSH peer and put each message in a queue."""

from __future__ import annotations

import asyncio

import zmq

from .._core.bridging import Malformed, plain_body
from ..errors import PigeonError, Timeout, TransportError
from ..message import BYTES, new_id
from .base import PlainBridge


class PullBridge(PlainBridge):
    """A plain PUSH peer feeds a queue (connects by default: the seed's
    fountain binds).

    Guarantee: a plain PUSH has no acks, so a message is at-most-once from
    the moment the peer sends it until the queue's host confirms it stored
    it: what sits in ZeroMQ's buffers or in this bridge when either dies is
    lost, and nobody can count it. From the confirm on, it is the queue's
    (at-least-once; durable if the host has a store). A send not confirmed
    in ``send_timeout`` is sent again with the same message id (the host
    de-duplicates), so a slow or absent host is backpressure, not loss.

    Bound: at most ``max_in_flight`` messages read but not yet confirmed;
    at the bound the bridge stops reading, ZeroMQ's receive buffer (also
    ``max_in_flight``) fills and the plain peer's send blocks.

    Counters: ``received``, ``passed`` (confirmed stored), ``malformed``
    (multipart or empty, dropped), ``dropped`` (refused for good, e.g. too
    large), ``send_retries``, ``unconfirmed`` (still unconfirmed at close).
    """

    send_timeout = 5.0

    async def start(self) -> PullBridge:
        self.counts.update(send_retries=0, unconfirmed=0)
        self._sock = self._open(zmq.PULL, self.spec.endpoints[0], RCVHWM=self.max_in_flight)
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        while True:
            frames = await self._receive(self._sock)
            body = plain_body(frames)
            if isinstance(body, Malformed):
                self._count_malformed(body)
                self._room.release()
                continue
            self._spawn(self._store(body))

    async def _store(self, body: bytes) -> None:
        message_id = new_id()  # one id for every retry: the host de-duplicates
        try:
            while True:
                try:
                    await self.conn.send(
                        self.spec.name,
                        body,
                        content_type=BYTES,
                        message_id=message_id,
                        timeout=self.send_timeout,
                    )
                except (Timeout, TransportError):
                    self.counts["send_retries"] += 1
                    continue
                except PigeonError:
                    # Refused for good (too large, forbidden, closed): never stored.
                    self.counts["dropped"] += 1
                    return
                self.counts["passed"] += 1
                return
        except asyncio.CancelledError:
            self.counts["unconfirmed"] += 1
            raise
        finally:
            self._room.release()

    async def _stop(self, timeout: float) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._wait_tasks(timeout)
