"""The async API: :func:`connect` gives a :class:`Connection`, whose verbs are
the same on every transport: ``send``, ``consume``, ``request``, ``serve``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator, Iterable, Sequence
from time import perf_counter
from typing import Any

from . import _clock, tracing
from ._core import delay as not_before_rules
from ._core import limits, topics
from ._core.backoff import RetryPolicy
from .errors import (
    Backpressure,
    ClosedError,
    ConfigurationError,
    NoResponders,
    NotStartedError,
    Timeout,
)
from .message import Message, make_message, make_messages
from .middleware import Hooks, Middleware, RequestOutcome, check_middleware
from .subscriber import EventHandler, EventStream, Subscriber
from .tracing import current as current_trace
from .transports import ConsumeOptions, SubscribeOptions, Transport, open_transport
from .worker import Handler, Server, ServiceFunction, Worker

log = logging.getLogger("pigeon.connection")

__all__ = ["Connection", "connect"]


def _as_list(value: str | list[str] | tuple[str, ...] | None, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{what} must be a URL string or a list of them, not {value!r}")


# Backoff between offers of a send to a host whose queue is full (seconds).
_ROOM_BACKOFF = 0.005
_ROOM_BACKOFF_MAX = 0.1

_good_names: set[str] = set()  # names already checked: the hot path skips the scan


def _check_name(name: object, what: str) -> str:
    if name in _good_names:
        return name
    try:
        checked = limits.check_name(name, what)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if len(_good_names) < 10_000:
        _good_names.add(checked)
    return checked


def _check_topic(topic: object) -> str:
    if topic in _good_names:
        return topic
    try:
        checked = topics.check_topic(topic)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if len(_good_names) < 10_000:
        _good_names.add(checked)
    return checked


def _positive(value: float, what: str) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not 0 < value <= limits.MAX_SECONDS
    ):
        raise ConfigurationError(
            f"{what} must be a number of seconds above 0 and at most "
            f"{limits.MAX_SECONDS:g}, not {value!r}"
        )
    return float(value)


def _expiry(ttl: float | None, now: float) -> float | None:
    """The wall-clock deadline of a message sent now with ``ttl``."""
    return None if ttl is None else now + _positive(ttl, "ttl")


def _with_not_before(
    headers: dict[str, str] | None, delay: float | None, not_before: float | None
) -> dict[str, str] | None:
    """``headers`` with the not-before header of ``delay`` or ``not_before``
    (``pigeon._core.delay``), read against one wall-clock reading.

    Raises:
        ConfigurationError: a rule of ``pigeon._core.delay`` is broken.
    """
    if delay is None and not_before is None:
        return headers
    try:
        extra = not_before_rules.not_before_header(
            delay, not_before, _clock.wall(), limits.DEFAULT_MAX_DELAY
        )
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if not extra:
        return headers
    if headers is not None and not isinstance(headers, dict):
        return headers  # make_message names the type error
    return {**(headers or {}), **extra}


class Connection:
    """A process's handle on one transport.

    Use it as ``async with pigeon.connect(...) as conn:`` or
    ``conn = await pigeon.connect(...)`` and ``await conn.close()``.
    """

    def __init__(self, transport: Transport, *, middleware: Sequence[Middleware] = ()) -> None:
        self.transport = transport
        found = check_middleware(middleware)
        # None without middleware: the hot path checks only that.
        self._hooks = Hooks(found) if found else None
        self._started = False
        self._closing = False  # close() is draining the workers and servers
        self._closed = False
        self._workers: list[Worker] = []
        self._servers: list[Server] = []

    async def start(self) -> Connection:
        """Connect or bind; starting a started connection does nothing.

        Raises:
            ClosedError: the connection was closed.
            TransportError: the address cannot be used or reached.
        """
        if self._closed:
            self._check_open()
        if not self._started:
            await self.transport.start()
            self._started = True
            log.debug("connected: %s", self.transport.url)
            if self._hooks is not None:
                self._hooks.on_connect(self)
        return self

    def __await__(self) -> Generator[Any, None, Connection]:
        return self.start().__await__()

    async def __aenter__(self) -> Connection:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(
                f"connection to {self.transport.url} is closed; open a new one with "
                "pigeon.connect(...)"
            )
        if not self._started:
            raise NotStartedError(
                f"connection to {self.transport.url} is not started; use "
                "'async with pigeon.connect(...) as conn:' or 'conn = await pigeon.connect(...)'"
            )

    # -- work queues -----------------------------------------------------

    def send_nowait(
        self,
        queue: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        message_id: str | None = None,
        ttl: float | None = None,
        delay: float | None = None,
        not_before: float | None = None,
    ) -> asyncio.Future[None]:
        """Queue ``payload`` for ``queue`` without waiting; the returned future
        resolves when the host has stored it (see :meth:`flush`).

        ``ttl``: seconds from now after which nobody should run it; a message
        still unrun then is dead-lettered with the reason ``expired``.

        ``delay`` (seconds from now) or ``not_before`` (seconds since the
        epoch): the message is stored now but not delivered before then
        (at most 30 days ahead; a node may hold it less, see its
        ``max_delay``). It travels as the header ``x-pigeon-not-before``.

        Raises:
            NotStartedError: the connection is not started yet.
            ClosedError: the connection is closed.
            ConfigurationError: ``queue`` is not a usable name, or ``delay``
                and ``not_before`` break a rule (both given, negative or not a
                number, too far ahead).
            MessageTooLarge: the body is over the transport's limit.
            Backpressure: the outbox or queue is full.
            TypeError: the payload or headers cannot be encoded.
        """
        headers = _with_not_before(headers, delay, not_before)
        return self._queue_one(
            queue, payload, headers, content_type, message_id, _expiry(ttl, _clock.wall())
        )

    def _queue_one(
        self,
        queue: str,
        payload: Any,
        headers: dict[str, str] | None,
        content_type: str | None,
        message_id: str | None,
        deadline: float | None,
    ) -> asyncio.Future[None]:
        if self._closed or not self._started:
            self._check_open()
        queue = _check_name(queue, "queue")
        message = make_message(
            payload,
            content_type=content_type,
            headers=headers,
            message_id=message_id,
            deadline=deadline,
        )
        if self._hooks is not None or current_trace() is not None:
            self._observe_send(queue, message)
        return self.transport.send_nowait(queue, message, fresh=message_id is None)

    def _observe_send(self, queue: str, message: Message) -> None:
        # Hooks first: a middleware's own traceparent (its span) is kept.
        if self._hooks is not None:
            self._hooks.on_send(queue, message)
        tracing.inject(message.headers)

    def send_many(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        ttl: float | None = None,
        delay: float | None = None,
        not_before: float | None = None,
    ) -> asyncio.Future[None]:
        """Queue many payloads for ``queue`` at once; the returned future
        resolves when the host has stored all of them. Cheaper per message
        than ``send_nowait`` (one clock read, one check, one hand-over).
        ``ttl``, ``delay`` and ``not_before`` are as for :meth:`send_nowait`,
        the same for every message.

        Raises:
            the same as :meth:`send_nowait`, before any message is queued.
        """
        if self._closed or not self._started:
            self._check_open()
        queue = _check_name(queue, "queue")
        deadline = _expiry(ttl, _clock.wall())
        headers = _with_not_before(headers, delay, not_before)
        messages = make_messages(
            payloads, content_type=content_type, headers=headers, deadline=deadline
        )
        if self._hooks is not None or current_trace() is not None:
            for message in messages:
                self._observe_send(queue, message)
        send_many = getattr(self.transport, "send_many", None)
        # A transport's batch path may put straight into a local queue's
        # ready list; messages for later go one by one, through the checks.
        if send_many is not None and (delay is None and not_before is None):
            return send_many(queue, messages)  # type: ignore[no-any-return]
        futures = [self.transport.send_nowait(queue, m, fresh=True) for m in messages]
        return asyncio.ensure_future(_all_stored(futures))

    async def send(
        self,
        queue: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        message_id: str | None = None,
        timeout: float = 30.0,
        ttl: float | None = None,
        delay: float | None = None,
        not_before: float | None = None,
    ) -> None:
        """Send ``payload`` to ``queue`` and wait until the host stored it.
        ``ttl``, ``delay`` and ``not_before`` are as for :meth:`send_nowait`
        (the confirm comes when it is stored, not when it is due).

        When the outbox or the queue is full, ``send`` waits for room (where
        ``send_nowait`` raises :class:`~pigeon.errors.Backpressure`), within
        the same ``timeout``.

        Raises:
            Timeout: no room, or no confirmation, within ``timeout``. A message
                that was already on the wire may still arrive, but it is not
                resent after this, and ``close`` neither waits for it nor
                reports it again.
            (and everything :meth:`send_nowait` raises but ``Backpressure``)
        """
        timeout = _positive(timeout, "timeout")
        expires = _expiry(ttl, _clock.wall())  # once: a wait for room does not move it
        headers = _with_not_before(headers, delay, not_before)  # once, likewise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        refusals = 0
        while True:
            try:
                future = self._queue_one(queue, payload, headers, content_type, message_id, expires)
                if not future.done() and not await _until_done(future, deadline):
                    raise TimeoutError
                future.result()  # the send's own error, if it failed
                return
            except Backpressure as exc:
                # Full here (outbox) or at the host (queue): wait for room.
                if not await self._wait_for_room(refusals, deadline):
                    raise Timeout(f"no room to send to {queue!r} within {timeout} s") from exc
                refusals += 1
            except TimeoutError as exc:
                self._give_up(future)
                raise Timeout(f"send to {queue!r} not confirmed within {timeout} s") from exc

    def _give_up(self, future: asyncio.Future[None]) -> None:
        # The caller is told Timeout; that is the only report of this send.
        # It is no longer resent (close() neither waits for it nor fails it
        # again), and whatever it ends with later is retrieved here.
        withdraw = getattr(self.transport, "withdraw", None)
        if withdraw is not None:
            withdraw(future)
        future.add_done_callback(_retrieve)

    async def _wait_for_room(self, refusals: int, deadline: float) -> bool:
        """Wait until a send refused for want of room may succeed; False if
        ``deadline`` (loop time) passes first.

        Room in this connection's outbox comes when the sends it holds are
        confirmed, which the transport's ``flush`` waits for (a wait on their
        confirmations, not a poll). A host whose queue is full does not say
        when it has room again, so after a refusal that no pending send
        explains, the send is offered again after a backoff that doubles per
        refusal (``_ROOM_BACKOFF`` up to ``_ROOM_BACKOFF_MAX`` seconds).
        """
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await self.transport.flush(remaining)
        except Timeout:
            return False
        if refusals:
            delay = min(_ROOM_BACKOFF * 2 ** (refusals - 1), _ROOM_BACKOFF_MAX)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
        return True

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every send so far is confirmed.

        Raises:
            Timeout: some are still unconfirmed after ``timeout`` seconds.
        """
        self._check_open()
        await self.transport.flush(_positive(timeout, "timeout"))

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int = 64,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
        abandon_on_host_loss: bool = True,
    ) -> Worker:
        """Run ``handler(delivery)`` for every message of ``queue``.

        A handler that returns acks the message; one that raises is retried
        with backoff and dead-lettered after ``retry.max_attempts``. A
        handler may settle by hand with ``delivery.ack()``, ``nack()``,
        ``reject()`` or keep it with ``extend()``.

        An ``async def`` handler runs on the event loop. A plain ``def``
        handler runs in a worker thread, never on the loop: up to 64 waiting
        deliveries per hand-off to the thread, one after another, each
        settled on its own (a hand-off costs about as much as a small
        handler). ``concurrency`` runners work side by side either way.

        ``abandon_on_host_loss``: when the link to the node that leased a
        delivery is lost, that node gives it to others, and this worker's
        ack would come too late. So deliveries not started are dropped, and
        running ``async`` handlers are cancelled (they see CancelledError);
        both are counted in ``abandoned``. ZeroMQ transports only: brokers
        keep a lease across a reconnect.

        Raises:
            ConfigurationError: prefetch or concurrency below 1, lease_ttl not
                a positive number, or an option the transport cannot honour.
        """
        self._check_open()
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        for value, what in ((prefetch, "prefetch"), (concurrency, "concurrency")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{what} must be an int >= 1, not {value!r}")
            if value > limits.MAX_PREFETCH:
                raise ConfigurationError(
                    f"{what} must be at most {limits.MAX_PREFETCH}, not {value}"
                )
        policy = retry or RetryPolicy()
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(policy).__name__}")
        worker = Worker(
            _check_name(queue, "queue"),
            handler,
            policy,
            concurrency,
            abandon_on_host_loss=bool(abandon_on_host_loss),
            hooks=self._hooks,
        )
        options = ConsumeOptions(prefetch, _positive(lease_ttl, "lease_ttl"), policy.max_attempts)
        await worker._start(self.transport, options)
        self._keep(worker)
        return worker

    # -- publish-subscribe -----------------------------------------------

    def publish_nowait(
        self,
        topic: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> asyncio.Future[None]:
        """Publish ``payload`` on ``topic`` without waiting; the returned
        future resolves once the topic's host (or broker) took it.

        Raises:
            ValueError: ``topic`` is not a valid topic (the message names the rule).
            Backpressure: a subscriber whose policy is ``block`` has no room.
            (and what :meth:`send_nowait` raises)
        """
        if self._closed or not self._started:
            self._check_open()
        topic = _check_topic(topic)
        message = make_message(payload, content_type=content_type, headers=headers)
        if self._hooks is not None or current_trace() is not None:
            if self._hooks is not None:
                self._hooks.on_publish(topic, message)
            tracing.inject(message.headers)
        return self.transport.publish_nowait(topic, message)

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Publish ``payload`` on ``topic``: every subscription whose pattern
        matches gets it, numbered in that topic. Waits until the topic's host
        took it, and for room while a ``block`` subscriber has none.

        Raises:
            Timeout: no room, or no confirmation, within ``timeout``.
            (and what :meth:`publish_nowait` raises but ``Backpressure``)
        """
        timeout = _positive(timeout, "timeout")
        deadline = asyncio.get_running_loop().time() + timeout
        refusals = 0
        while True:
            try:
                future = self.publish_nowait(
                    topic, payload, headers=headers, content_type=content_type
                )
                if future.done():
                    # Taken at once (this process hosts the topic): let the
                    # loop run, or a publishing loop would starve subscribers
                    # in this process until their buffers overflow.
                    await asyncio.sleep(0)
                elif not await _until_done(future, deadline):
                    self._give_up(future)
                    raise Timeout(f"publish to {topic!r} not confirmed within {timeout} s")
                future.result()
                return
            except Backpressure as exc:
                if not await self._wait_for_room(refusals + 1, deadline):
                    raise Timeout(f"no room to publish to {topic!r} within {timeout} s") from exc
                refusals += 1

    def _subscribe_options(
        self,
        pattern: str,
        name: str | None,
        policy: str,
        buffer: int,
        start: topics.StartAt,
        consume: ConsumeOptions,
    ) -> SubscribeOptions:
        try:
            topics.check_pattern(pattern)
            slow = topics.check_policy(policy)
            topics.check_buffer(buffer)
            start.check()
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if name is not None:
            name = _check_name(name, "subscription name")
        return SubscribeOptions(name, slow, buffer, start, consume)

    async def _start_subscriber(
        self,
        pattern: str,
        handler: EventHandler,
        *,
        name: str | None,
        policy: str,
        buffer: int,
        from_seq: int | None,
        from_time: float | None,
        last: int | None,
        last_per_subject: bool,
        prefetch: int,
        concurrency: int,
        retry: RetryPolicy | None,
        lease_ttl: float,
    ) -> Subscriber:
        self._check_open()
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        for value, what in ((prefetch, "prefetch"), (concurrency, "concurrency")):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value:
                raise ConfigurationError(f"{what} must be an int >= 1, not {value!r}")
        retry_policy = retry or RetryPolicy()
        if not isinstance(retry_policy, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, not {type(retry_policy).__name__}")
        consume = ConsumeOptions(
            min(prefetch, limits.MAX_PREFETCH),
            _positive(lease_ttl, "lease_ttl"),
            retry_policy.max_attempts,
        )
        start = topics.StartAt(from_seq, from_time, last, last_per_subject)
        options = self._subscribe_options(pattern, name, policy, buffer, start, consume)
        subscriber = Subscriber(pattern, handler, retry_policy, concurrency, options)
        subscriber._hooks = self._hooks  # a Worker underneath: the same hooks
        await subscriber._start(self.transport)
        self._keep(subscriber)
        return subscriber

    def _keep(self, worker: Worker) -> None:
        # Workers and subscribers stopped by hand are let go here, so a
        # connection that opens many short subscriptions does not grow.
        self._workers = [w for w in self._workers if not w.closed]
        self._workers.append(worker)

    async def subscribe(
        self,
        pattern: str,
        handler: EventHandler,
        *,
        name: str | None = None,
        policy: str = "drop-oldest",
        buffer: int = topics.DEFAULT_BUFFER,
        from_seq: int | None = None,
        from_time: float | None = None,
        last: int | None = None,
        last_per_subject: bool = False,
        prefetch: int = 64,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> Subscriber:
        """Run ``handler(event)`` for every message published on a topic
        matching ``pattern`` (``*`` is one segment, a final ``>`` the rest).

        The handler gets an :class:`~pigeon.Event`: a delivery with
        ``topic``, ``seq`` and ``missed`` (numbers of that topic it did not
        get right before this one). It settles like a worker's: returning
        acks, raising retries with backoff, then dead-letters.

        ``name``: a durable subscription, kept while no subscriber runs and
        shared by every subscriber with that name. ``policy`` and ``buffer``:
        what happens once ``buffer`` messages wait for it: ``"drop-oldest"``
        (counted, and seen as gaps), ``"block"`` (publishers wait) or
        ``"disconnect"`` (it is cut off and told). ``from_seq``,
        ``from_time``, ``last`` or ``last_per_subject`` start it in the
        retained history of its topics (see :meth:`retain`).

        Raises:
            ConfigurationError: a bad pattern or option, or one the transport
                cannot express (it says what to use instead).
            ReplayTrimmed: ``from_seq`` is no longer retained.
        """
        return await self._start_subscriber(
            pattern,
            handler,
            name=name,
            policy=policy,
            buffer=buffer,
            from_seq=from_seq,
            from_time=from_time,
            last=last,
            last_per_subject=last_per_subject,
            prefetch=prefetch,
            concurrency=concurrency,
            retry=retry,
            lease_ttl=lease_ttl,
        )

    def subscription(
        self,
        pattern: str,
        *,
        name: str | None = None,
        policy: str = "drop-oldest",
        buffer: int = topics.DEFAULT_BUFFER,
        from_seq: int | None = None,
        from_time: float | None = None,
        last: int | None = None,
        last_per_subject: bool = False,
        prefetch: int = 64,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> EventStream:
        """The events of a subscription as an async iterator (options as for
        :meth:`subscribe`)::

            async with conn.subscription("prices.>", last_per_subject=True) as events:
                async for event in events:
                    print(event.topic, event.seq, event.decode())
        """

        async def start(handler: EventHandler) -> Subscriber:
            return await self._start_subscriber(
                pattern,
                handler,
                name=name,
                policy=policy,
                buffer=buffer,
                from_seq=from_seq,
                from_time=from_time,
                last=last,
                last_per_subject=last_per_subject,
                prefetch=prefetch,
                concurrency=1,
                retry=retry,
                lease_ttl=lease_ttl,
            )

        return EventStream(start)

    async def retain(
        self,
        pattern: str,
        *,
        max_count: int | None = None,
        max_bytes: int | None = None,
        max_age: float | None = None,
    ) -> None:
        """Keep history of the topics matching ``pattern``: at most
        ``max_count`` messages per topic, ``max_bytes`` bytes and
        ``max_age`` seconds (at least one), for subscribers that start in
        the past (``from_seq=``, ``from_time=``, ``last=``,
        ``last_per_subject=``).

        Raises:
            ConfigurationError: a bad pattern or bound, or a transport that
                cannot keep history.
        """
        self._check_open()
        retention = topics.Retention(max_count, max_bytes, max_age)
        try:
            topics.check_pattern(pattern)
            retention.check()
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        await self.transport.retain(pattern, retention)

    # -- request-reply ---------------------------------------------------

    async def request(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> Message:
        """Call ``service`` and return the reply message.

        Raises:
            NoResponders: no live server offers ``service`` (at once).
            Timeout: no reply within ``timeout`` seconds, retries included.
            Rejected: the server's handler raised.
        """
        self._check_open()
        timeout = _positive(timeout, "timeout")
        # The deadline travels as an absolute time, so a server that reads
        # the request late (frozen, or behind a slow link) knows the caller
        # gave up; handlers see it as Message.deadline.
        message = make_message(
            payload, content_type=content_type, headers=headers, deadline=_clock.wall() + timeout
        )
        service = _check_name(service, "service")
        if self._hooks is None and current_trace() is None:
            return await self.transport.request(service, message, timeout=timeout)
        reply: Message = await self._observed_request(service, message, timeout, None)
        return reply

    async def _observed_request(
        self, service: str, message: Message, timeout: float, min_replies: int | None
    ) -> Any:
        """A request (or, with ``min_replies``, a scatter-gather) with the
        middleware's hooks around it, carrying the current trace context."""
        hooks = self._hooks
        if hooks is not None:
            hooks.before_request(service, message)
        tracing.inject(message.headers)
        outcome = RequestOutcome.ERROR
        start = perf_counter()
        try:
            result: Any
            if min_replies is None:
                result = await self.transport.request(service, message, timeout=timeout)
            else:
                result = await self.transport.request_all(
                    service, message, timeout=timeout, min_replies=min_replies
                )
            # Too few replies: request_all raises Timeout once this returns.
            short = min_replies is not None and len(result) < min_replies
            outcome = RequestOutcome.TIMEOUT if short else RequestOutcome.OK
            return result
        except NoResponders:
            outcome = RequestOutcome.NO_RESPONDERS
            raise
        except Timeout:
            outcome = RequestOutcome.TIMEOUT
            raise
        finally:
            if hooks is not None:
                hooks.after_request(service, message, outcome, perf_counter() - start)

    async def request_all(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float = 1.0,
        min_replies: int = 1,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> list[Message]:
        """Ask every live server of ``service`` at once (scatter-gather) and
        return the replies that came within ``timeout``, in no set order.
        Servers whose handler failed give no reply.

        Raises:
            NoResponders: no live server offers ``service`` (at once).
            Timeout: fewer than ``min_replies`` replies came in time.
        """
        self._check_open()
        timeout = _positive(timeout, "timeout")
        if isinstance(min_replies, bool) or not isinstance(min_replies, int) or min_replies < 0:
            raise ConfigurationError(f"min_replies must be an int >= 0, not {min_replies!r}")
        message = make_message(
            payload, content_type=content_type, headers=headers, deadline=_clock.wall() + timeout
        )
        service = _check_name(service, "service")
        if self._hooks is None and current_trace() is None:
            replies = await self.transport.request_all(
                service, message, timeout=timeout, min_replies=min_replies
            )
        else:
            replies = await self._observed_request(service, message, timeout, min_replies)
        if len(replies) < min_replies:
            raise Timeout(
                f"{len(replies)} of the {min_replies} replies wanted from service {service!r} "
                f"came within {timeout} s"
            )
        return replies

    async def serve(self, service: str, handler: ServiceFunction) -> Server:
        """Answer requests for ``service`` with ``handler(message) -> reply``."""
        self._check_open()
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        server = Server(_check_name(service, "service"), handler, hooks=self._hooks)
        await server._start(self.transport)
        self._servers.append(server)
        return server

    # -- lifecycle -------------------------------------------------------

    def reload_acl(self) -> int:
        """Read the node's ACL file again (``allow=``) without dropping links.

        Returns how many consumers lost their grant (their leases went back
        to the queue).

        Raises:
            ConfigurationError: this connection has no ACL (only a ZeroMQ
                node that binds with ``key=`` and ``allow=`` has one).
            AclError: the file is malformed; the old ACL stays in force.
        """
        self._check_open()
        reload = getattr(self.transport, "reload_acl", None)
        if reload is None:
            raise ConfigurationError("only a ZeroMQ node that binds with allow= has an ACL")
        return int(reload())

    def stats(self) -> dict[str, Any]:
        """Everything counted so far: transport, workers and servers."""
        stats = dict(self.transport.stats())
        stats["workers"] = [w.stats() for w in self._workers]
        stats["servers"] = [s.stats() for s in self._servers]
        stats["hook_errors"] = 0 if self._hooks is None else self._hooks.errors
        stats["tracing"] = tracing.counts()
        return stats

    async def close(self, timeout: float = 5.0) -> None:
        """Drain every worker and server (``Worker.drain``, ``Server.drain``:
        nothing new is taken, what runs may finish within ``timeout``, the
        rest is handed back at once), wait for sends to be confirmed, then
        close. Never waits much longer than ``timeout``."""
        if self._closed or self._closing:
            return
        self._closing = True
        if not self._started:
            self._closed = True
            return
        # Servers first, so callers stop choosing this node while workers finish.
        # Still open meanwhile: a handler that finishes may send, publish or
        # call as part of its work.
        outcomes = await asyncio.gather(
            *(server.drain(timeout) for server in self._servers),
            *(worker.drain(timeout) for worker in self._workers),
            return_exceptions=True,
        )
        self._closed = True
        await self.transport.close(timeout)  # whatever a drain raised
        log.debug("closed: %s", self.transport.url)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _until_done(future: asyncio.Future[Any], deadline: float) -> bool:
    """Wait until ``future`` is done or the loop's clock reaches ``deadline``;
    True if it is done. Neither cancels ``future`` (it may be shared by
    other sends): the same as ``wait_for(shield(future))``, with one wake-up
    instead of three.
    """
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_at(deadline, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


async def _all_stored(futures: list[asyncio.Future[None]]) -> None:
    await asyncio.gather(*futures)


def connect(
    url: str | list[str] | None = None,
    *,
    bind: str | list[str] | None = None,
    middleware: Sequence[Middleware] = (),
    **options: Any,
) -> Connection:
    """Open a connection; start it with ``async with`` or ``await``.

    Args:
        url: where to connect: ``memory://NAME``, ``tcp://HOST:PORT``,
            ``ipc://PATH``, ``inproc://NAME``, ``nats://…``, ``amqp://…``,
            or a list of ZeroMQ addresses.
        bind: ZeroMQ address(es) to serve on; the node then hosts queues.
        middleware: hooks around every send, handle, request and publish
            (``pigeon.Middleware``; see docs/observability.md).
        options: transport options (e.g. ``heartbeat``, ``max_message_size``;
            ``discover="file:///path/nodes.txt"``, ``"dns://HOST:PORT"`` or
            ``"srv://NAME"`` finds ZeroMQ nodes to connect to, with or
            without ``url``: see docs/discovery.md).

    Raises:
        ConfigurationError: unknown scheme or unusable combination.
        TypeError: ``middleware`` is not a list of ``pigeon.Middleware``.
    """
    found = check_middleware(middleware)
    connect_urls = _as_list(url, "url")
    bind_urls = _as_list(bind, "bind")
    if not connect_urls and not bind_urls and options.get("discover") is None:
        raise ConfigurationError(
            "connect() needs a URL, bind= for a node that serves, or discover= to find nodes"
        )
    return Connection(open_transport(connect_urls, bind_urls, **options), middleware=found)
