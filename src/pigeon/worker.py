"""Running user handlers: a :class:`Worker` for a queue, a :class:`Server`
for a service. Shared by every transport, so retries, backoff and
dead-lettering behave the same everywhere."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from . import _clock, tracing
from ._core.backoff import DeadLetter, RetryPolicy, on_failure
from ._core.policy import (
    EXPIRED_REASON,
    attempt_limit_reason,
    over_attempt_limit,
    past_deadline,
)
from ._core.tracecontext import TRACEPARENT
from .errors import PigeonError
from .message import Message, make_message
from .middleware import Hooks, Outcome, RequestOutcome
from .transports import ConsumeOptions, Delivery, Subscription, Transport
from .transports.base import ServerStopping

log = logging.getLogger("pigeon.worker")

Handler = Callable[[Delivery], Awaitable[Any] | Any]
ServiceFunction = Callable[[Message], Awaitable[Any] | Any]


# Deliveries one thread hand-off runs a plain handler on, one after another:
# a hand-off costs about as much as a small handler, so it is shared.
PLAIN_BATCH = 64


def _run_plain_observed(
    handler: Callable[[Any], Any], arguments: list[Any], contexts: list[contextvars.Context]
) -> list[tuple[bool, Any, float]]:
    """``_run_plain`` for observed deliveries: each runs in its own context
    (its trace, and whatever its middleware made current), and its handler
    seconds are measured."""
    outcomes: list[tuple[bool, Any, float]] = []
    for argument, context in zip(arguments, contexts, strict=True):
        start = perf_counter()
        try:
            outcomes.append((True, context.run(handler, argument), perf_counter() - start))
        except Exception as exc:  # each delivery's failure is its own
            outcomes.append((False, exc, perf_counter() - start))
    return outcomes


def _run_plain(handler: Callable[[Any], Any], arguments: list[Any]) -> list[tuple[bool, Any]]:
    """Call ``handler`` on each argument in turn (in a worker thread);
    (True, result) or (False, the exception) per argument."""
    outcomes: list[tuple[bool, Any]] = []
    for argument in arguments:
        try:
            outcomes.append((True, handler(argument)))
        except Exception as exc:  # each delivery's failure is its own
            outcomes.append((False, exc))
    return outcomes


async def call_handler(handler: Callable[[Any], Any], argument: Any) -> Any:
    """Await an async handler; run a plain function in a thread so it cannot
    block the event loop."""
    if inspect.iscoroutinefunction(handler):
        return await handler(argument)
    result = await asyncio.to_thread(handler, argument)
    if inspect.isawaitable(result):
        return await result
    return result


class Worker:
    """Consumes one queue and runs ``handler`` on each delivery."""

    def __init__(
        self,
        queue: str,
        handler: Handler,
        policy: RetryPolicy,
        concurrency: int,
        *,
        abandon_on_host_loss: bool = True,
        hooks: Hooks | None = None,
    ) -> None:
        self.queue = queue
        # The connection's middleware (None: none, and the hot path checks
        # only that).
        self._hooks = hooks
        self.handler = handler
        self.policy = policy
        self.concurrency = concurrency
        self.abandon_on_host_loss = abandon_on_host_loss
        # The task running each delivery an async handler has, so a lost
        # host's deliveries can be cut (abandon_on_host_loss).
        self._handling: dict[Delivery, asyncio.Task[Any]] = {}
        self._abandoning: set[Delivery] = set()
        self._watched: Any = None  # the settler _sink last asked to watch
        self._pending: deque[Delivery] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscription: Subscription | None = None
        self._busy = 0
        self._in_progress: set[Delivery] = set()
        self._closing = False
        self._draining = False  # the host sends nothing more; we hand back what comes
        self._returning: set[asyncio.Future[None]] = set()
        self._async_handler = inspect.iscoroutinefunction(handler)
        self.counts = {
            "received": 0,
            "redelivered": 0,
            "acked": 0,
            "retried": 0,
            "dead_lettered": 0,
            "expired": 0,  # dead-lettered unrun: their deadline passed
            "handler_errors": 0,
            "handed_back": 0,  # returned unfinished when stopping, for others to run
            "abandoned": 0,  # given up unfinished: their host was lost
            "unreturned_at_close": 0,
        }

    async def _start(self, transport: Transport, options: ConsumeOptions) -> None:
        """Begin consuming (called by :meth:`pigeon.Connection.consume`)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()) for _ in range(self.concurrency)]
        self._subscription = await transport.consume(self.queue, self._sink, options)
        log.debug("consumer started: %s (concurrency %d)", self.queue, self.concurrency)

    def _sink(self, deliveries: list[Delivery]) -> None:
        if self._draining:  # sent before the host heard we are draining
            task = asyncio.ensure_future(self._hand_back(deliveries, "worker draining"))
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)
            return
        if self.abandon_on_host_loss:
            settler = deliveries[0]._settler
            if settler is not self._watched:
                self._watch(deliveries)
        self._pending.extend(deliveries)
        self._wake.set()

    def _watch(self, deliveries: list[Delivery]) -> None:
        # A transport whose settler can lose its host (a ZeroMQ link) tells
        # us when it does; the others have no such hook.
        for delivery in deliveries:
            settler = delivery._settler
            if settler is not self._watched:
                watch = getattr(settler, "watch", None)
                if watch is not None:
                    watch(self._host_lost)
                self._watched = settler

    def _host_lost(self, settler: object) -> None:
        """The host that leased these deliveries is lost: they can no longer
        be acked, and it gives them to others. Drop the ones not started and
        cut the running ones (their handlers see CancelledError)."""
        lost = [d for d in self._pending if d._settler is settler]
        if lost:
            kept = [d for d in self._pending if d._settler is not settler]
            self._pending.clear()
            self._pending.extend(kept)
        for delivery, task in list(self._handling.items()):
            if delivery._settler is settler:
                self._abandoning.add(delivery)
                task.cancel()
                lost.append(delivery)
        lost += [d for d in self._in_progress if d._settler is settler and d not in lost]
        for delivery in lost:
            delivery.settled = True  # nothing may settle it now: the host moved on
            self._in_progress.discard(delivery)
        self.counts["abandoned"] += len(lost)

    @property
    def closed(self) -> bool:
        """True once it stopped (drained or closed) and its runners ended."""
        return self._closing and all(task.done() for task in self._tasks)

    @property
    def idle(self) -> bool:
        """True when no delivery is waiting or being handled here."""
        return not self._pending and self._busy == 0

    async def _run(self) -> None:
        pending = self._pending
        in_progress = self._in_progress
        handle = self._handle
        handling = self._handling
        me = asyncio.current_task()
        assert me is not None
        while not self._closing:
            if not pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._async_handler:
                await self._run_plain_batch()
                continue
            delivery = pending.popleft()
            self._busy += 1
            in_progress.add(delivery)
            handling[delivery] = me
            try:
                await handle(delivery)
            except asyncio.CancelledError:
                if delivery not in self._abandoning:
                    raise
                # Cut because its host was lost (_host_lost): this runner
                # goes on with the next delivery.
                self._abandoning.discard(delivery)
                me.uncancel()
            finally:
                del handling[delivery]
                self._busy -= 1
                if delivery.settled:  # a cancelled one stays, for close() to nack
                    in_progress.discard(delivery)

    async def _run_plain_batch(self) -> None:
        """Run a plain handler on a batch of waiting deliveries with one
        thread hand-off; each is settled on its own, as ``_handle`` would."""
        pending = self._pending
        # An even share of what waits, so other runners (concurrency > 1) get some.
        take = min(PLAIN_BATCH, max(1, len(pending) // self.concurrency))
        batch = [pending.popleft() for _ in range(take)]
        self._busy += len(batch)
        self._in_progress.update(batch)
        if self._hooks is not None or any(TRACEPARENT in d.message.headers for d in batch):
            try:
                await self._run_plain_observed(batch)
            finally:
                self._busy -= len(batch)
                for delivery in batch:
                    if delivery.settled:
                        self._in_progress.discard(delivery)
            return
        try:
            runnable = [d for d in batch if not await self._refused_unrun(d)]
            outcomes = await asyncio.to_thread(_run_plain, self.handler, runnable)
            for delivery, (ok, result) in zip(runnable, outcomes, strict=True):
                await self._finish(delivery, ok, result)
        finally:
            self._busy -= len(batch)
            for delivery in batch:
                if delivery.settled:  # a cancelled one stays, for close() to nack
                    self._in_progress.discard(delivery)

    async def _run_plain_observed(self, batch: list[Delivery]) -> None:
        """``_run_plain_batch`` with the middleware's hooks, each delivery in
        the trace context it carries (set again in the handler's thread)."""
        hooks = self._hooks
        runnable: list[Delivery] = []
        # Each delivery gets a context of its own, entered for its hooks and
        # its handler (in the thread) alike: what before_handle makes current
        # (a span) is current in the handler, and after_handle undoes it there.
        contexts: list[contextvars.Context] = []
        for delivery in batch:
            if await self._refused_unrun(delivery):
                continue
            context = contextvars.copy_context()
            context.run(tracing.enter, delivery.message.headers)
            if hooks is not None:
                context.run(hooks.before_handle, delivery)
            runnable.append(delivery)
            contexts.append(context)
        try:
            outcomes = await asyncio.to_thread(
                _run_plain_observed, self.handler, runnable, contexts
            )
        except BaseException:
            if hooks is not None:
                for delivery, context in zip(runnable, contexts, strict=True):
                    context.run(hooks.after_handle, delivery, Outcome.ERROR, 0.0)
            raise
        for index, (delivery, (ok, result, seconds)) in enumerate(
            zip(runnable, outcomes, strict=True)
        ):
            try:
                outcome = await self._finish(delivery, ok, result)
            except BaseException:
                if hooks is not None:  # cut short: this one and the rest end here
                    for cut, context, (_ok, _result, cut_seconds) in zip(
                        runnable[index:], contexts[index:], outcomes[index:], strict=True
                    ):
                        context.run(hooks.after_handle, cut, Outcome.ERROR, cut_seconds)
                raise
            if hooks is not None:
                contexts[index].run(hooks.after_handle, delivery, outcome, seconds)

    async def _refused_unrun(self, delivery: Delivery) -> bool:
        """Count a delivery in; True (and rejected) if workers before this
        one used up its attempts, or its deadline passed before it could run."""
        counts = self.counts
        counts["received"] += 1
        message = delivery.message
        if message.deadline is not None and past_deadline(message, _clock.wall()):
            counts["expired"] += 1
            counts["dead_lettered"] += 1
            self._dead_lettered(delivery, EXPIRED_REASON)
            await delivery.reject(EXPIRED_REASON)
            return True
        if message.redelivered:
            counts["redelivered"] += 1
            if over_attempt_limit(message.attempt, self.policy.max_attempts):
                # Workers before this one died holding it: this worker's
                # policy says it has had its attempts (the host may have a
                # limit of its own, too).
                counts["dead_lettered"] += 1
                reason = attempt_limit_reason(self.queue, message.attempt - 1)
                self._dead_lettered(delivery, reason)
                await delivery.reject(reason)
                return True
        return False

    async def _finish(self, delivery: Delivery, ok: bool, result: Any) -> Outcome:
        """Settle a delivery its handler has run on: ack, or the retry policy."""
        if ok and inspect.isawaitable(result):
            try:
                await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ok, result = False, exc
        if not ok:
            return await self._failed(delivery, result)
        if delivery.settled:
            return Outcome.SETTLED
        self.counts["acked"] += 1
        # The plain ack, without the coroutine Delivery.ack() would add.
        delivery.settled = True
        pending = delivery._settler.ack(delivery)
        if pending is not None:
            await pending
        return Outcome.ACKED

    async def _handle(self, delivery: Delivery) -> None:
        if self._hooks is not None or TRACEPARENT in delivery.message.headers:
            await self._handle_observed(delivery)
            return
        if await self._refused_unrun(delivery):
            return
        try:
            result = await self.handler(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler failure is data for the retry policy
            await self._failed(delivery, exc)
            return
        await self._finish(delivery, True, result)

    async def _handle_observed(self, delivery: Delivery) -> None:
        """``_handle`` with the middleware's hooks around the handler, in the
        trace context the message carries."""
        hooks = self._hooks
        token = tracing.enter(delivery.message.headers)
        try:
            if await self._refused_unrun(delivery):
                return
            if hooks is not None:
                hooks.before_handle(delivery)
            outcome = Outcome.ERROR
            start = perf_counter()
            try:
                try:
                    result = await self.handler(delivery)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a handler failure is data for the retry policy
                    seconds = perf_counter() - start
                    outcome = await self._failed(delivery, exc)
                else:
                    seconds = perf_counter() - start
                    outcome = await self._finish(delivery, True, result)
            except BaseException:
                if hooks is not None:
                    hooks.after_handle(delivery, Outcome.ERROR, perf_counter() - start)
                raise
            if hooks is not None:
                hooks.after_handle(delivery, outcome, seconds)
        finally:
            tracing.leave(token)

    async def _failed(self, delivery: Delivery, exc: Exception) -> Outcome:
        counts = self.counts
        counts["handler_errors"] += 1
        if log.isEnabledFor(logging.WARNING):
            log.warning(
                "handler error on %s (message %s, attempt %d): %s: %s",
                self.queue,
                delivery.message.id,
                delivery.message.attempt,
                type(exc).__name__,
                exc,
            )
        if delivery.settled:
            return Outcome.ERROR
        error = f"{type(exc).__name__}: {exc}"
        verdict = on_failure(self.policy, delivery.message.attempt, error, random.random())
        if isinstance(verdict, DeadLetter):
            counts["dead_lettered"] += 1
            self._dead_lettered(delivery, verdict.reason)
            await delivery.reject(verdict.reason)
            return Outcome.DEAD_LETTERED
        counts["retried"] += 1
        if self._hooks is not None:
            self._hooks.on_retry(delivery, verdict.delay, error)
        await delivery.nack(verdict.delay, error)
        return Outcome.RETRIED

    def _dead_lettered(self, delivery: Delivery, reason: str) -> None:
        """Tell the log and the middleware that this worker dead-letters ``delivery``."""
        log.warning("dead letter from %s (message %s): %s", self.queue, delivery.message.id, reason)
        if self._hooks is not None:
            self._hooks.on_dead_letter(delivery, reason)

    async def drain(self, grace: float = 30.0) -> None:
        """Stop gracefully: take nothing more, hand back at once what has not
        started (redelivered to other workers now, not after a lease),
        let running handlers finish within ``grace`` seconds, then cut the
        rest short and hand them back too. Counted in ``handed_back``."""
        if self._closing:
            return
        self._closing = True
        log.debug("consumer draining: %s", self.queue)
        subscription = self._subscription
        drain = getattr(subscription, "drain", None)
        if drain is not None:
            await drain()  # the host keeps our leases: we settle them below
        self._draining = drain is not None
        await self._hand_back(self._take_pending(), "worker draining")
        self._wake.set()
        if self._tasks:
            _done, still = await asyncio.wait(self._tasks, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        if self._returning:
            await asyncio.wait(self._returning, timeout=1.0)
        if not self._draining and subscription is not None:
            # A transport that cannot drain: stop it first, so nothing
            # handed back below comes straight back here (one that took the
            # leases back on cancel ignores these nacks).
            await subscription.cancel()
        unfinished = [*self._in_progress, *self._take_pending()]
        self._in_progress.clear()
        await self._hand_back(unfinished, "worker stopped")
        if self._draining and subscription is not None:
            await subscription.cancel()
        log.debug("consumer stopped: %s (%s)", self.queue, self.counts)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop, letting running handlers finish for up to ``timeout``
        seconds: :meth:`drain` with that grace."""
        await self.drain(timeout)

    def _take_pending(self) -> list[Delivery]:
        taken = list(self._pending)
        self._pending.clear()
        return taken

    async def _hand_back(self, deliveries: list[Delivery], why: str) -> None:
        for delivery in deliveries:
            if not delivery.settled:
                try:
                    await delivery.nack(0.0, why)
                    self.counts["handed_back"] += 1
                except PigeonError:
                    self.counts["unreturned_at_close"] += 1

    def stats(self) -> dict[str, Any]:
        return {"queue": self.queue, **self.counts, "waiting": len(self._pending)}


class Server:
    """Serves one service with ``handler(message) -> reply payload``."""

    def __init__(
        self, service: str, handler: ServiceFunction, *, hooks: Hooks | None = None
    ) -> None:
        self.service = service
        self.handler = handler
        self._hooks = hooks  # the connection's middleware, or None
        self.counts = {"handled": 0, "failed": 0, "cut": 0}
        # Tasks running a request here, for drain() to wait for (or cut).
        self._running: set[asyncio.Task[Any]] = set()
        self._cutting: set[asyncio.Task[Any]] = set()
        self._registration: Subscription | None = None
        self._async_handler = inspect.iscoroutinefunction(handler)

    async def _serve(self, message: Message) -> Message:
        if self._hooks is not None or TRACEPARENT in message.headers:
            return await self._serve_observed(message)
        return await self._run_handler(message)

    async def _serve_observed(self, message: Message) -> Message:
        """``_serve`` with the middleware's hooks around the handler, in the
        trace context the request carries."""
        hooks = self._hooks
        token = tracing.enter(message.headers)
        try:
            if hooks is not None:
                hooks.before_serve(self.service, message)
            outcome = RequestOutcome.ERROR
            start = perf_counter()
            try:
                reply = await self._run_handler(message)
                outcome = RequestOutcome.OK
                return reply
            finally:
                if hooks is not None:
                    hooks.after_serve(self.service, message, outcome, perf_counter() - start)
        finally:
            tracing.leave(token)

    async def _run_handler(self, message: Message) -> Message:
        task = asyncio.current_task()
        running = self._running
        if task is not None:
            running.add(task)
        try:
            if self._async_handler:
                result = await self.handler(message)
            else:
                result = await call_handler(self.handler, message)
        except asyncio.CancelledError:
            if task is None or task not in self._cutting:
                raise
            # Cut by drain() when its grace ran out: the caller may try
            # another server, as when a server is lost.
            self.counts["cut"] += 1
            raise ServerStopping(self.service) from None
        except Exception:
            self.counts["failed"] += 1
            raise
        finally:
            if task is not None:
                running.discard(task)
        self.counts["handled"] += 1
        return result if isinstance(result, Message) else make_message(result)

    async def _start(self, transport: Transport) -> None:
        """Begin serving (called by :meth:`pigeon.Connection.serve`)."""
        self._registration = await transport.serve(self.service, self._serve)
        log.debug("server started: %s", self.service)

    async def drain(self, grace: float = 30.0) -> None:
        """Stop gracefully: withdraw the service, so callers send new
        requests to other servers (one that arrives anyway is answered
        "no responders here" and its caller moves on), let running requests
        finish within ``grace`` seconds, then cut the rest short (counted in
        ``cut``; their callers may try another server)."""
        registration, self._registration = self._registration, None
        if registration is None:
            return
        log.debug("server draining: %s (%d running)", self.service, len(self._running))
        await registration.cancel()
        if self._running:
            _done, still = await asyncio.wait(set(self._running), timeout=grace)
            self._cutting.update(still)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        log.debug("server stopped: %s", self.service)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop: :meth:`drain` with a grace of ``timeout`` seconds."""
        await self.drain(timeout)

    def stats(self) -> dict[str, Any]:
        return {"service": self.service, **self.counts}
