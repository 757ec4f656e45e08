"""Sends to JetStream: pipelined, confirmed by pub acks, resent until confirmed.

Every send runs as its own task awaiting its pub ack, so many are in flight
at once. One that is not acknowledged (a timeout, a reconnect) is published
again with the same ``Nats-Msg-Id`` until ``send_timeout``, then its future
fails with TransportError; JetStream drops the duplicates.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from nats.aio.client import Client
from nats.js import JetStreamContext

from ...errors import Backpressure, PigeonError, Timeout, TransportError
from ...message import Message
from . import envelope
from .errors import map_exceptions
from .options import NatsOptions


class Publisher:
    """The sends of one connection that still await their pub ack.

    Args:
        nc: the connection (its ``max_payload`` bounds what can be sent).
        js: its JetStream context.
        options: the transport's options (stream, prefix, timeouts, outbox limit).
        counts: where ``sent``, ``confirmed``, ``send_retries``,
            ``send_failures`` and ``unconfirmed_at_close`` are counted.
    """

    def __init__(
        self, nc: Client, js: JetStreamContext, options: NatsOptions, counts: Counter[str]
    ) -> None:
        self.nc = nc
        self.js = js
        self.options = options
        self.counts = counts
        self._sends: dict[asyncio.Task[None], asyncio.Future[None]] = {}
        self._closed = False

    @property
    def unconfirmed(self) -> int:
        return len(self._sends)

    def send_nowait(self, queue: str, message: Message) -> asyncio.Future[None]:
        """Start publishing ``message`` to ``queue``; the future resolves on the pub ack.

        Raises:
            Backpressure: ``outbox_limit`` sends are awaiting their pub ack.
            ConfigurationError: the queue name or a header cannot travel over NATS.
        """
        if len(self._sends) >= self.options.outbox_limit:
            raise Backpressure("the NATS outbox", self.options.outbox_limit)
        subject = envelope.subject(self.options.prefix, "q", queue)
        headers = envelope.to_headers(message)
        headers[envelope.MSG_ID] = envelope.dedupe_id(queue, message.id)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        task = loop.create_task(self._publish(queue, subject, message.body, headers, future))
        self._sends[task] = future
        task.add_done_callback(self._sends.pop)
        self.counts["sent"] += 1
        return future

    async def _publish(
        self,
        queue: str,
        subject: str,
        body: bytes,
        headers: dict[str, str],
        future: asyncio.Future[None],
    ) -> None:
        options = self.options
        deadline = time.monotonic() + options.send_timeout
        pause = 0.05
        # max_payload counts the headers too, so a body just under the limit
        # can still be too large on the wire.
        wire = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 16
        while not future.done():
            try:
                with map_exceptions(
                    f"send to {queue!r}",
                    timeout=options.ack_timeout,
                    size=wire,
                    limit=self.nc.max_payload,
                ):
                    await self.js.publish(
                        subject,
                        body,
                        headers=dict(headers),
                        stream=options.stream,
                        timeout=options.ack_timeout,
                    )
            except (Timeout, TransportError) as exc:
                # Not confirmed (lost in a reconnect, JetStream not ready):
                # publish again; the same Nats-Msg-Id makes that safe.
                if time.monotonic() + pause >= deadline or self._closed:
                    self.counts["send_failures"] += 1
                    error = TransportError(
                        f"send to {queue!r} not confirmed within {options.send_timeout} s: {exc}"
                    )
                    error.__cause__ = exc
                    _fail(future, error)
                    return
                self.counts["send_retries"] += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
            except PigeonError as exc:  # too large, refused: retrying cannot help
                self.counts["send_failures"] += 1
                _fail(future, exc)
                return
            else:
                self.counts["confirmed"] += 1
                if not future.done():
                    future.set_result(None)

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until every send so far has its pub ack (or has failed).

        Raises:
            Timeout: some are still unconfirmed after ``timeout`` seconds.
        """
        futures = list(self._sends.values())
        if not futures:
            return
        _done, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            raise Timeout(f"{len(pending)} sends still unconfirmed after {timeout} s")

    async def close(self, url: str) -> None:
        """Stop resending and fail every send still unconfirmed.

        They fail with TransportError (counted in ``unconfirmed_at_close``);
        they may still have been stored, and a resend with the same id
        would be dropped as a duplicate.
        """
        self._closed = True
        for task, future in list(self._sends.items()):
            task.cancel()
            if _fail(future, TransportError(f"closed before {url} confirmed a send")):
                self.counts["unconfirmed_at_close"] += 1
        await asyncio.gather(*self._sends, return_exceptions=True)


def _fail(future: asyncio.Future[None], exc: BaseException) -> bool:
    """Fail ``future`` unless it is done already; True if it was failed here."""
    if future.done():
        return False
    future.set_exception(exc)
    # Mark it retrieved: a send_nowait caller may never look, and the loss is
    # counted in stats() rather than logged at garbage collection.
    future.exception()
    return True
