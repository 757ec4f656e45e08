"""Request-reply on core NATS: servers of a service share a queue group.

The caller's deadline travels in the ``Pigeon-Deadline`` header (wall-clock
seconds); the server cancels the handler when it passes and does not answer,
since the caller has given up by then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ...errors import MessageTooLarge, PigeonError, Rejected
from ...message import Message, new_id
from ..base import ServiceHandler, run_service_handler
from . import envelope
from .errors import map_exceptions

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from .transport import NatsTransport

log = logging.getLogger("pigeon.nats")

QUEUE_GROUP = "pigeon"
_MAX_REASON = 4096


def decode_request(msg: Msg) -> Message:
    """The request envelope of a received NATS request."""
    return envelope.from_headers(msg.data, msg.headers, fallback_id=new_id())


def decode_reply(service: str, msg: Msg) -> Message:
    """The reply envelope, or the server's failure raised.

    Raises:
        Rejected: the server's handler failed the request.
    """
    headers = msg.headers or {}
    if envelope.ERROR in headers:
        raise Rejected(service, headers[envelope.ERROR])
    return envelope.from_headers(msg.data, headers, fallback_id=new_id())


class ServiceRegistration:
    """A service served on this connection; ``cancel`` stops answering."""

    def __init__(self, transport: NatsTransport, service: str, handler: ServiceHandler) -> None:
        self.transport = transport
        self.service = service
        self.subject = envelope.subject(transport.prefix, "svc", service)
        self.handler = handler
        self._sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Subscribe to the service subject in the shared queue group.

        Raises:
            TransportError: the subscription cannot be made.
        """
        with map_exceptions(f"serve {self.service!r}"):
            self._sub = await self.transport.nc.subscribe(
                self.subject, queue=QUEUE_GROUP, cb=self._on_request
            )
            # A PING round trip: once serve() returns, the server knows the
            # subscription, so a request right after finds a responder.
            await self.transport.nc.flush()

    async def _on_request(self, msg: Msg) -> None:
        # One task per request: nats-py runs a subscription's callbacks one
        # after another, and a slow handler must not hold up the next call.
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        counts = self.transport.counts
        request = decode_request(msg)
        remaining = None if request.deadline is None else request.deadline - time.time()
        outcome = await run_service_handler(self.handler, request, remaining)
        if outcome.expired:
            counts["requests_expired"] += 1  # the caller has given up: no answer
            return
        error, reply = outcome.error, outcome.reply
        if error:
            body, headers = b"", {envelope.ERROR: envelope.single_line(error)[:_MAX_REASON]}
        else:
            body, headers = reply.body, envelope.to_headers(reply, check=False)
        await self._send(msg.reply, body, headers)

    async def _send(self, inbox: str, body: bytes, headers: dict[str, str]) -> None:
        counts = self.transport.counts
        try:
            try:
                with map_exceptions(
                    f"reply for {self.service!r}",
                    size=len(body),
                    limit=self.transport.nc.max_payload,
                ):
                    await self.transport.nc.publish(inbox, body, headers=headers)
            except MessageTooLarge as exc:
                error = {envelope.ERROR: f"the reply is too large: {exc}"}
                with map_exceptions(f"reply for {self.service!r}"):
                    await self.transport.nc.publish(inbox, b"", headers=error)
            counts["replies"] += 1
        except PigeonError as exc:  # the caller times out; nothing else to tell
            counts["reply_failures"] += 1
            log.warning("%s", exc)

    async def cancel(self) -> None:
        """Stop answering and cancel the handlers still running."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                with map_exceptions(f"stop serving {self.service!r}"):
                    await sub.unsubscribe()
            except PigeonError:
                pass  # the connection is gone, and the subscription with it
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.transport.forget(self)
