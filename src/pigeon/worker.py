"""Running user handlers: a :class:`Worker` for a queue, a :class:`Server`
for a service. Shared by every transport, so retries, backoff and
dead-lettering behave the same everywhere."""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ._core.backoff import DeadLetter, RetryPolicy, on_failure
from ._core.policy import (
    EXPIRED_REASON,
    attempt_limit_reason,
    over_attempt_limit,
    past_deadline,
)
from .errors import PigeonError
from .message import Message, make_message
from .transports import ConsumeOptions, Delivery, Subscription, Transport

Handler = Callable[[Delivery], Awaitable[Any] | Any]
ServiceFunction = Callable[[Message], Awaitable[Any] | Any]


# Deliveries one thread hand-off runs a plain handler on, one after another:
# a hand-off costs about as much as a small handler, so it is shared.
PLAIN_BATCH = 64


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

    def __init__(self, queue: str, handler: Handler, policy: RetryPolicy, concurrency: int) -> None:
        self.queue = queue
        self.handler = handler
        self.policy = policy
        self.concurrency = concurrency
        self._pending: deque[Delivery] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscription: Subscription | None = None
        self._busy = 0
        self._in_progress: set[Delivery] = set()
        self._closing = False
        self._async_handler = inspect.iscoroutinefunction(handler)
        self.counts = {
            "received": 0,
            "redelivered": 0,
            "acked": 0,
            "retried": 0,
            "dead_lettered": 0,
            "expired": 0,  # dead-lettered unrun: their deadline passed
            "handler_errors": 0,
            "unreturned_at_close": 0,
        }

    async def _start(self, transport: Transport, options: ConsumeOptions) -> None:
        """Begin consuming (called by :meth:`pigeon.Connection.consume`)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()) for _ in range(self.concurrency)]
        self._subscription = await transport.consume(self.queue, self._sink, options)

    def _sink(self, deliveries: list[Delivery]) -> None:
        self._pending.extend(deliveries)
        self._wake.set()

    @property
    def idle(self) -> bool:
        """True when no delivery is waiting or being handled here."""
        return not self._pending and self._busy == 0

    async def _run(self) -> None:
        pending = self._pending
        in_progress = self._in_progress
        handle = self._handle
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
            try:
                await handle(delivery)
            finally:
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

    async def _refused_unrun(self, delivery: Delivery) -> bool:
        """Count a delivery in; True (and rejected) if workers before this
        one used up its attempts, or its deadline passed before it could run."""
        counts = self.counts
        counts["received"] += 1
        message = delivery.message
        if message.deadline is not None and past_deadline(message, time.time()):
            counts["expired"] += 1
            counts["dead_lettered"] += 1
            await delivery.reject(EXPIRED_REASON)
            return True
        if message.redelivered:
            counts["redelivered"] += 1
            if over_attempt_limit(message.attempt, self.policy.max_attempts):
                # Workers before this one died holding it: this worker's
                # policy says it has had its attempts (the host may have a
                # limit of its own, too).
                counts["dead_lettered"] += 1
                await delivery.reject(attempt_limit_reason(self.queue, message.attempt - 1))
                return True
        return False

    async def _finish(self, delivery: Delivery, ok: bool, result: Any) -> None:
        """Settle a delivery its handler has run on: ack, or the retry policy."""
        if ok and inspect.isawaitable(result):
            try:
                await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ok, result = False, exc
        if not ok:
            await self._failed(delivery, result)
            return
        if not delivery.settled:
            self.counts["acked"] += 1
            # The plain ack, without the coroutine Delivery.ack() would add.
            delivery.settled = True
            pending = delivery._settler.ack(delivery)
            if pending is not None:
                await pending

    async def _handle(self, delivery: Delivery) -> None:
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

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        counts = self.counts
        counts["handler_errors"] += 1
        if delivery.settled:
            return
        error = f"{type(exc).__name__}: {exc}"
        verdict = on_failure(self.policy, delivery.message.attempt, error, random.random())
        if isinstance(verdict, DeadLetter):
            counts["dead_lettered"] += 1
            await delivery.reject(verdict.reason)
        else:
            counts["retried"] += 1
            await delivery.nack(verdict.delay, error)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking deliveries, let running handlers finish (up to
        ``timeout``), and give back the ones not started."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._tasks:
            _done, still = await asyncio.wait(self._tasks, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        # Stop the subscription first, so nothing given back below comes
        # straight back here. Then hand back handlers cut short and
        # deliveries never started, rather than wait for their leases; a
        # transport that already took them back on cancel ignores these.
        if self._subscription is not None:
            await self._subscription.cancel()
        unfinished = [*self._in_progress, *self._pending]
        self._in_progress.clear()
        self._pending.clear()
        for delivery in unfinished:
            if not delivery.settled:
                try:
                    await delivery.nack(0.0, "worker closed")
                except PigeonError:
                    self.counts["unreturned_at_close"] += 1

    def stats(self) -> dict[str, Any]:
        return {"queue": self.queue, **self.counts, "waiting": len(self._pending)}


class Server:
    """Serves one service with ``handler(message) -> reply payload``."""

    def __init__(self, service: str, handler: ServiceFunction) -> None:
        self.service = service
        self.handler = handler
        self.counts = {"handled": 0, "failed": 0}
        self._registration: Subscription | None = None
        self._async_handler = inspect.iscoroutinefunction(handler)

    async def _serve(self, message: Message) -> Message:
        try:
            if self._async_handler:
                result = await self.handler(message)
            else:
                result = await call_handler(self.handler, message)
        except Exception:
            self.counts["failed"] += 1
            raise
        self.counts["handled"] += 1
        return result if isinstance(result, Message) else make_message(result)

    async def _start(self, transport: Transport) -> None:
        """Begin serving (called by :meth:`pigeon.Connection.serve`)."""
        self._registration = await transport.serve(self.service, self._serve)

    async def close(self) -> None:
        if self._registration is not None:
            await self._registration.cancel()
            self._registration = None

    def stats(self) -> dict[str, Any]:
        return {"service": self.service, **self.counts}
