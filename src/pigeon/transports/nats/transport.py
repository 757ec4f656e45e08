"""``nats://HOST:PORT``: work queues on JetStream, request-reply on core NATS.

Queues live in one work-queue stream (``PIGEON_Q`` on ``pigeon.q.>`` unless
configured), created when missing. Each queue has one durable pull consumer
shared by all of its workers; JetStream keeps the leases (ack wait), counts
deliveries and redelivers. Services are core NATS subjects answered by a
queue group. Options may also be given in the URL's query string, e.g.
``nats://127.0.0.1:4222?stream=JOBS&prefix=jobs``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import msgspec
import nats
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from ..._core import policy
from ..._core.ledger import dead_letter_queue
from ...errors import (
    Backpressure,
    ClosedError,
    ConfigurationError,
    MessageTooLarge,
    PigeonError,
    Timeout,
    TransportError,
)
from ...message import Message
from ..base import ConsumeOptions, DeliverySink, ServiceHandler, Subscription
from . import envelope, service
from .errors import map_exceptions
from .options import parse as parse_options
from .pull import PullConsumer

log = logging.getLogger("pigeon.nats")


class NatsTransport:
    """The NATS transport; see the module docstring.

    Args:
        url: ``nats://HOST:PORT`` (several servers separated by commas), with
            options in the query string if wanted.
        options: see :class:`~pigeon.transports.nats.options.NatsOptions`.

    Raises:
        ConfigurationError: an option is unknown or cannot work (nats-py
            missing is reported by the package's stand-in).
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.servers, self.options = parse_options(url, options)
        self.stream = self.options.stream
        self.prefix = self.options.prefix
        self.max_message_size = self.options.max_message_size or (1 << 20)
        self.pull_expires = self.options.pull_expires
        self.nc: Any = None
        self.js: Any = None
        self.counts: Counter[str] = Counter()
        self._consumers: list[PullConsumer] = []
        self._services: list[service.ServiceRegistration] = []
        self._sends: dict[asyncio.Task[None], asyncio.Future[None]] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Connect, check the payload limit, and create the stream if missing.

        Raises:
            TransportError: no server reachable, or JetStream unavailable.
            ConfigurationError: ``max_message_size`` is above the server's
                ``max_payload``, or the stream exists but does not fit.
        """
        with map_exceptions(f"connect to {self.url}", timeout=self.options.connect_timeout):
            self.nc = await nats.connect(
                self.servers,
                name=self.options.name,
                connect_timeout=self.options.connect_timeout,
                reconnect_time_wait=self.options.reconnect_wait,
                max_reconnect_attempts=1,
                allow_reconnect=True,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        # Give up at start when no server answers (nats-py would retry the
        # first connect forever with -1), but once connected never stop
        # reconnecting: nats-py reads this option on every reconnect.
        self.nc.options["max_reconnect_attempts"] = -1
        try:
            self._check_payload_limit()
            self.js = self.nc.jetstream(timeout=self.options.ack_timeout)
            await self._ensure_stream()
        except BaseException:
            await self.nc.close()
            raise

    def _check_payload_limit(self) -> None:
        limit = self.nc.max_payload
        if self.max_message_size > limit:
            if self.options.max_message_size is not None:
                raise ConfigurationError(
                    f"max_message_size {self.max_message_size} is above the server's "
                    f"max_payload of {limit} bytes"
                )
            self.max_message_size = limit

    async def _ensure_stream(self) -> None:
        subjects = [f"{self.prefix}.q.>"]
        with map_exceptions(f"create stream {self.stream}"):
            try:
                info = await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                info = await self.js.add_stream(
                    StreamConfig(
                        name=self.stream,
                        subjects=subjects,
                        retention=RetentionPolicy.WORK_QUEUE,
                        storage=StorageType.FILE,
                        duplicate_window=self.options.duplicate_window,
                    )
                )
        config = info.config
        wrong = config.retention != RetentionPolicy.WORK_QUEUE
        if wrong or subjects[0] not in (config.subjects or []):
            raise ConfigurationError(
                f"stream {self.stream} exists but is not a work-queue stream on {subjects[0]}"
            )

    async def ensure_consumer(self, queue: str, subject: str, options: ConsumeOptions) -> None:
        """Create the queue's durable consumer, or update its ack wait and limits.

        Workers of one queue share the consumer, so the last one to start
        sets its ``lease_ttl``.

        Raises:
            TransportError: JetStream is unreachable or failed.
            ConfigurationError: JetStream refused the configuration.
        """
        config = ConsumerConfig(
            durable_name=envelope.durable_name(queue),
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=options.lease_ttl,
            max_ack_pending=max(self.options.max_ack_pending, options.prefetch),
            max_deliver=-1,
        )
        with map_exceptions(f"create the consumer of {queue!r}"):
            await self.js.add_consumer(self.stream, config)

    def _live(self) -> Any:
        if self._closed:
            raise ClosedError(f"transport {self.url} is closed")
        if self.nc is None:
            raise ClosedError(f"transport {self.url} is not started")
        return self.nc

    async def _on_error(self, exc: Exception) -> None:
        self.counts["connection_errors"] += 1
        log.debug("nats: %r", exc)

    async def _on_disconnected(self) -> None:
        self.counts["disconnects"] += 1

    async def _on_reconnected(self) -> None:
        self.counts["reconnects"] += 1
        for consumer in self._consumers:
            consumer.wake(reconnected=True)

    # -- work queues -----------------------------------------------------

    def _check_size(self, message: Message) -> None:
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)

    def send_nowait(
        self, queue: str, message: Message, *, fresh: bool = False
    ) -> asyncio.Future[None]:
        """Publish to JetStream; the future resolves on the pub ack.

        Sends run concurrently (pipelined). One that is not acknowledged (a
        timeout, a reconnect) is published again with the same
        ``Nats-Msg-Id`` until ``send_timeout``, then fails with
        TransportError.

        Raises:
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over ``max_message_size``.
            Backpressure: ``outbox_limit`` sends are awaiting their pub ack.
            ConfigurationError: the queue name or a header cannot travel over NATS.
        """
        self._live()
        self._check_size(message)
        if len(self._sends) >= self.options.outbox_limit:
            raise Backpressure("the NATS outbox", self.options.outbox_limit)
        subject = envelope.subject(self.prefix, "q", queue)
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
        deadline = time.monotonic() + self.options.send_timeout
        pause = 0.05
        # max_payload counts the headers too, so a body just under the limit
        # can still be too large on the wire.
        wire = len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 16
        while not future.done():
            try:
                with map_exceptions(
                    f"send to {queue!r}",
                    timeout=self.options.ack_timeout,
                    size=wire,
                    limit=self.nc.max_payload,
                ):
                    await self.js.publish(
                        subject,
                        body,
                        headers=dict(headers),
                        stream=self.stream,
                        timeout=self.options.ack_timeout,
                    )
            except (Timeout, TransportError) as exc:
                # Not confirmed (lost in a reconnect, JetStream not ready):
                # publish again; the same Nats-Msg-Id makes that safe.
                if time.monotonic() + pause >= deadline or self._closed:
                    self.counts["send_failures"] += 1
                    error = TransportError(
                        f"send to {queue!r} not confirmed within "
                        f"{self.options.send_timeout} s: {exc}"
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

    async def publish_dead_letter(
        self, queue: str, message: Message, reason: str, attempts: int
    ) -> None:
        """Store a dead letter of ``queue`` in its dead-letter queue.

        Raises:
            TransportError: JetStream did not confirm it.
            Timeout: no pub ack in time.
        """
        dead = msgspec.structs.replace(
            message,
            headers=policy.dead_letter_headers(
                message.headers, queue, envelope.single_line(reason), attempts
            ),
        )
        headers = envelope.to_headers(dead, check=False)
        headers[envelope.REDELIVERED] = "1"  # it was seen, as on the other transports
        dead_queue = dead_letter_queue(queue)
        headers[envelope.MSG_ID] = envelope.dedupe_id(dead_queue, message.id)
        subject = envelope.subject(self.prefix, "q", dead_queue)
        with map_exceptions(f"dead-letter to {queue!r}", timeout=self.options.ack_timeout):
            await self.js.publish(subject, message.body, headers=headers, stream=self.stream)

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until every send so far has its pub ack (or has failed).

        Raises:
            Timeout: some are still unconfirmed after ``timeout`` seconds.
        """
        self._live()
        await self._wait_sends(timeout)

    async def _wait_sends(self, timeout: float) -> None:  # noqa: ASYNC109
        futures = list(self._sends.values())
        if not futures:
            return
        _done, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            raise Timeout(f"{len(pending)} sends still unconfirmed after {timeout} s")

    async def consume(
        self, queue: str, sink: DeliverySink, options: ConsumeOptions
    ) -> Subscription:
        """Start a pull loop for one worker on the queue's shared consumer.

        Raises:
            ClosedError: the transport is closed.
            ConfigurationError: the queue name cannot be a subject, or
                JetStream refused the consumer.
            TransportError: JetStream is unreachable.
        """
        self._live()
        consumer = PullConsumer(self, queue, sink, options)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    def forget(self, subscription: Any) -> None:
        """Drop a cancelled consumer or service registration."""
        for table in (self._consumers, self._services):
            if subscription in table:
                table.remove(subscription)

    # -- request-reply ---------------------------------------------------

    async def request(
        self,
        service_name: str,
        message: Message,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Message:
        """Call a service over core NATS; the deadline travels with the call.

        Raises:
            ClosedError: the transport is closed.
            MessageTooLarge: the body is over ``max_message_size``.
            NoResponders: nobody serves it (nats-py's no-responders status).
            Timeout: no reply within ``timeout`` seconds.
            Rejected: the server's handler failed.
        """
        nc = self._live()
        self._check_size(message)
        subject = envelope.subject(self.prefix, "svc", service_name)
        deadline = time.time() + timeout
        if message.deadline is not None:
            deadline = min(deadline, message.deadline)
        headers = envelope.to_headers(msgspec.structs.replace(message, deadline=deadline))
        self.counts["requests"] += 1
        with map_exceptions(
            f"request {service_name!r}",
            service=service_name,
            timeout=timeout,
            size=len(message.body),
            limit=nc.max_payload,
        ):
            reply = await nc.request(subject, message.body, timeout=timeout, headers=headers)
        return service.decode_reply(service_name, reply)

    async def serve(self, service_name: str, handler: ServiceHandler) -> Subscription:
        """Answer ``service_name`` in the shared queue group.

        Raises:
            ClosedError: the transport is closed.
            ConfigurationError: the name cannot be a subject.
            TransportError: the subscription cannot be made.
        """
        self._live()
        registration = service.ServiceRegistration(self, service_name, handler)
        await registration.start()
        self._services.append(registration)
        return registration

    # -- closing ---------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait up to ``timeout`` for pub acks, then stop everything.

        Sends still unconfirmed then fail with TransportError (counted in
        ``stats()["unconfirmed_at_close"]``); they may still have been
        stored, and a resend with the same id would be dropped as a duplicate.
        """
        if self._closed or self.nc is None:
            self._closed = True
            return
        try:
            await self._wait_sends(timeout)
        except Timeout:
            pass  # failed and counted below
        self._closed = True
        for task, future in list(self._sends.items()):
            task.cancel()
            if _fail(future, TransportError(f"closed before {self.url} confirmed a send")):
                self.counts["unconfirmed_at_close"] += 1
        await asyncio.gather(*self._sends, return_exceptions=True)
        for subscription in [*self._consumers, *self._services]:
            await subscription.cancel()
        nc, self.nc = self.nc, None
        try:
            with map_exceptions("close"):
                if nc.is_connected:
                    await nc.flush(timeout=max(0.1, min(timeout, 1.0)))  # settles still buffered
        except PigeonError:
            pass  # nothing more can be done for them: JetStream redelivers
        if not nc.is_connected and getattr(nc, "_pending_data_size", 0):
            # nats-py's close() writes what it buffered during an outage to
            # the lost socket and raises before releasing its subscriptions
            # and socket; those commands cannot reach a server anyway.
            nc._pending = []
            nc._pending_data_size = 0
        try:
            with map_exceptions("close"):
                await nc.close()
        except PigeonError as exc:
            log.debug("closing the NATS connection: %s", exc)

    def stats(self) -> dict[str, Any]:
        """Counters: sent, confirmed, send_retries, send_failures, delivered,
        redelivered, acked, nacked, dead_lettered, settle_failures,
        requests, replies, disconnects, reconnects, and more."""
        return {
            **self.counts,
            "unconfirmed": len(self._sends),
            "connected": bool(self.nc is not None and self.nc.is_connected),
            "stream": self.stream,
            "consumers": len(self._consumers),
        }


def _fail(future: asyncio.Future[None], exc: BaseException) -> bool:
    if future.done():
        return False
    future.set_exception(exc)
    # Mark it retrieved: a send_nowait caller may never look, and the loss is
    # counted in stats() rather than logged at garbage collection.
    future.exception()
    return True
