"""Request-reply on core NATS: servers of a service share a queue group.

The caller's deadline travels in the ``Pigeon-Deadline`` header (wall-clock
seconds); the server cancels the handler when it passes and does not answer,
since the caller has given up by then.

Every server also listens, outside the queue group, on the service's "all"
subject (``<prefix>.all.<service>``), so a request published there
(``call_all``) reaches every live server and each answers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ...errors import MessageTooLarge, NoResponders, PigeonError, Rejected, Timeout
from ...message import Message, new_id
from ..base import ServiceHandler, run_service_handler
from . import envelope
from .errors import map_exceptions

log = logging.getLogger("pigeon.nats")

QUEUE_GROUP = "pigeon"
_MAX_REASON = 4096
# A server's subscription is seen by every NATS server a request may come
# through only a moment after its serve() returned: through another server
# of a cluster it must cross the routes first, and nats-server 2.15 now and
# then answers "no responders" to a request made at once on the very same
# server (about 1 call in 20 right after serve(), in the cluster tests). A
# no-responders answer (nobody got the request, so nothing ran) is therefore
# asked again within this many seconds (and the call's timeout), pausing
# _RETRY_PAUSE, doubled each time: NoResponders still comes at once.
_NO_RESPONDERS_GRACE = 0.25
_RETRY_PAUSE = 0.01


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


async def call(
    nc: Client, counts: Counter[str], subject: str, service: str, message: Message, timeout: float
) -> Message:
    """Send a request to ``service`` on ``subject`` and wait for its reply.

    The request carries the earlier of its own deadline and ``timeout``
    from now, so the server can give up when the caller does.

    Raises:
        ConfigurationError: a header cannot travel over NATS.
        MessageTooLarge: the request is over the server's ``max_payload``.
        NoResponders: nobody serves it (nats-py's no-responders status,
            still after ``_NO_RESPONDERS_GRACE``).
        Timeout: no reply within ``timeout`` seconds.
        Rejected: the server's handler failed.
        TransportError: the connection is closed or lost.
    """
    deadline = time.time() + timeout
    if message.deadline is not None:
        deadline = min(deadline, message.deadline)
    headers = envelope.to_headers(msgspec.structs.replace(message, deadline=deadline))
    counts["requests"] += 1
    now = time.monotonic()
    ends, grace_ends = now + timeout, now + min(timeout, _NO_RESPONDERS_GRACE)
    pause = _RETRY_PAUSE
    while True:
        try:
            with map_exceptions(
                f"request {service!r}",
                service=service,
                timeout=timeout,
                size=len(message.body),
                limit=nc.max_payload,
            ):
                reply = await nc.request(
                    subject,
                    message.body,
                    timeout=max(ends - time.monotonic(), 0.001),
                    headers=headers,
                )
        except NoResponders:
            if time.monotonic() + pause > grace_ends:
                raise
            counts["no_responders_retries"] += 1
            await asyncio.sleep(pause)
            pause *= 2
            continue
        return decode_reply(service, reply)


async def call_all(
    nc: Client,
    counts: Counter[str],
    subject: str,
    service: str,
    message: Message,
    timeout: float,
    min_replies: int,
) -> list[Message]:
    """Ask every server of ``service`` (on its "all" ``subject``) and
    return the replies that came within ``timeout``.

    NATS cannot tell how many servers got the request, so this always waits
    the whole ``timeout``, except when nobody got it: the server's
    no-responders status then raises NoResponders at once (asked again
    within ``_NO_RESPONDERS_GRACE``, as ``call`` does). A server whose
    handler failed gives no reply, as on every transport: its answer (with
    ``Pigeon-Error``) is counted in ``request_all_rejected`` and left out.

    Raises:
        ConfigurationError: a header cannot travel over NATS.
        MessageTooLarge: the request is over the server's ``max_payload``.
        NoResponders: no server listens.
        Timeout: fewer than ``min_replies`` replies came in time (saying
            how many servers failed).
        TransportError: the connection is closed or lost.
    """
    deadline = time.time() + timeout
    if message.deadline is not None:
        deadline = min(deadline, message.deadline)
    headers = envelope.to_headers(msgspec.structs.replace(message, deadline=deadline))
    replies: list[Message] = []
    failed: list[str] = []
    nobody = asyncio.Event()

    async def on_reply(msg: Msg) -> None:
        got = msg.headers or {}
        status = got.get("Status")
        if status == "503" and not msg.data:
            nobody.set()  # no server got the request
            return
        if status is not None:
            counts["request_all_statuses"] += 1
            return
        if envelope.ERROR in got:
            counts["request_all_rejected"] += 1
            failed.append(got[envelope.ERROR])
            return
        counts["request_all_replies"] += 1
        replies.append(envelope.from_headers(msg.data, got, fallback_id=new_id()))

    what = f"request {service!r} from every server"
    with map_exceptions(what):
        sub = await nc.subscribe(nc.new_inbox(), cb=on_reply)
    counts["request_all"] += 1
    try:
        now = time.monotonic()
        ends, grace_ends = now + timeout, now + min(timeout, _NO_RESPONDERS_GRACE)
        pause = _RETRY_PAUSE
        while True:
            nobody.clear()
            with map_exceptions(what, size=len(message.body), limit=nc.max_payload):
                await nc.publish(subject, message.body, reply=sub.subject, headers=headers)
            try:
                async with asyncio.timeout(max(ends - time.monotonic(), 0.0)):
                    await nobody.wait()
            except TimeoutError:
                break  # the time is up: what came is the answer
            if time.monotonic() + pause > grace_ends:
                raise NoResponders(service)
            counts["no_responders_retries"] += 1
            await asyncio.sleep(pause)
            pause *= 2
    finally:
        try:
            with map_exceptions(what):
                await sub.unsubscribe()
        except PigeonError:
            pass  # the connection is gone, and the subscription with it
    if len(replies) < min_replies:
        why = f" ({len(failed)} servers failed it, the first: {failed[0]})" if failed else ""
        raise Timeout(
            f"service {service!r}: {len(replies)} replies within {timeout} s, fewer than "
            f"min_replies={min_replies}{why}"
        )
    return replies


class ServiceRegistration:
    """A service served on this connection; ``cancel`` stops answering.

    Args:
        nc: the connection requests arrive and replies leave on.
        counts: the counters to add to (``replies``, ``reply_failures``...).
        service: the service's name, answered on ``subject``.
        all_subject: where requests for every server come (no queue group).
        handler: what answers a request.
        on_cancel: told once the registration has stopped.
    """

    def __init__(
        self,
        nc: Client,
        counts: Counter[str],
        *,
        service: str,
        subject: str,
        handler: ServiceHandler,
        on_cancel: Callable[[ServiceRegistration], None],
        all_subject: str | None = None,
    ) -> None:
        self.nc = nc
        self.counts = counts
        self.service = service
        self.subject = subject
        self.all_subject = all_subject
        self.handler = handler
        self.on_cancel = on_cancel
        self._sub: Subscription | None = None
        self._all_sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Subscribe to the service subject in the shared queue group, and
        to its "all" subject alone.

        Raises:
            TransportError: the subscription cannot be made.
        """
        with map_exceptions(f"serve {self.service!r}"):
            self._sub = await self.nc.subscribe(
                self.subject, queue=QUEUE_GROUP, cb=self._on_request
            )
            if self.all_subject is not None:
                self._all_sub = await self.nc.subscribe(self.all_subject, cb=self._on_request)
            # A PING round trip: once serve() returns, the server knows the
            # subscription, so a request right after finds a responder.
            await self.nc.flush()

    async def _on_request(self, msg: Msg) -> None:
        # One task per request: nats-py runs a subscription's callbacks one
        # after another, and a slow handler must not hold up the next call.
        task = asyncio.get_running_loop().create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        if not msg.reply:
            return
        counts = self.counts
        request = decode_request(msg)
        remaining = None if request.deadline is None else request.deadline - time.time()
        outcome = await run_service_handler(self.handler, request, remaining)
        if outcome.expired:
            counts["expired_requests"] += 1  # the caller has given up: no answer
            return
        reply = outcome.reply
        if outcome.error or reply is None:
            error = outcome.error or "the handler gave no reply"
            body, headers = b"", {envelope.ERROR: envelope.single_line(error)[:_MAX_REASON]}
        else:
            body, headers = reply.body, envelope.to_headers(reply, check=False)
        await self._send(msg.reply, body, headers)

    async def _send(self, inbox: str, body: bytes, headers: dict[str, str]) -> None:
        counts = self.counts
        try:
            try:
                with map_exceptions(
                    f"reply for {self.service!r}",
                    size=len(body),
                    limit=self.nc.max_payload,
                ):
                    await self.nc.publish(inbox, body, headers=headers)
            except MessageTooLarge as exc:
                error = {envelope.ERROR: f"the reply is too large: {exc}"}
                with map_exceptions(f"reply for {self.service!r}"):
                    await self.nc.publish(inbox, b"", headers=error)
            counts["replies"] += 1
        except PigeonError as exc:  # the caller times out; nothing else to tell
            counts["reply_failures"] += 1
            log.warning("%s", exc)

    async def cancel(self) -> None:
        """Stop answering and cancel the handlers still running."""
        subs = [s for s in (self._sub, self._all_sub) if s is not None]
        self._sub = self._all_sub = None
        for sub in subs:
            try:
                with map_exceptions(f"stop serving {self.service!r}"):
                    await sub.unsubscribe()
            except PigeonError:
                pass  # the connection is gone, and the subscription with it
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.on_cancel(self)
