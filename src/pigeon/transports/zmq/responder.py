"""The serving side of request-reply on a node: runs each request id once,
answers repeats from the reply cache, and cuts handlers at their deadlines
with one sweep timer for all of them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from ..._core import frames, headers
from ..._core.budget import MAX_PEER_REQUEST_BYTES, MAX_PEER_REQUESTS, PeerBudget
from ..._core.policy import ReplyErrorKind, reply_kind
from ..._core.rpc import REPLIES_TYPE, CacheState, ReplyCache, seconds_left
from ...errors import NoResponders, PigeonError, Rejected
from ...message import Message, new_id
from ..local import LocalServices
from ..tasks import start_task
from .admin import UNCACHED_SERVICES

if TYPE_CHECKING:
    from .relay import Relay

_SWEEP = 0.01  # seconds between checks of running requests' deadlines
_GATHER_MARGIN = 0.02  # seconds a gathered answer leaves for its way back
MAX_WAITERS = 32  # repeats of one running request that wait for its answer
Send = Callable[[bytes, frames.Frame], None]


class Responder:
    """Answers the Request frames a node's router receives."""

    def __init__(self, services: LocalServices, send: Send, *, relay: Relay | None = None) -> None:
        self.services = services
        self.relay = relay  # servers connected here, for what is not served here
        self._send = send
        self.replies = ReplyCache()
        self._running: dict[str, list[bytes]] = {}
        self._deadlines: dict[asyncio.Task[None], float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        # Requests each peer has running: one peer may not take every handler.
        self.budget = PeerBudget(MAX_PEER_REQUESTS, MAX_PEER_REQUEST_BYTES)
        self.repeats_refused = 0
        self.expired_requests = 0  # arrived after their deadline: never started
        self.last_answer = 0.0  # monotonic time of the last answer sent

    def on_request(self, identity: bytes, request: frames.Request) -> None:
        rid = request.request_id
        now = time.time()
        left = seconds_left(request.timeout, request.message.deadline, now)
        if left <= 0:  # its caller has given up: run nothing, answer nothing
            self.expired_requests += 1
            return
        request.timeout = left
        # The handler sees the deadline it is held to (Message.deadline).
        if request.message.deadline is None or request.message.deadline > now + left:
            request.message.deadline = now + left
        state, cached = CacheState.NEW, None
        if request.service not in UNCACHED_SERVICES:  # a flood of stats must not fill the cache
            state, cached = self.replies.begin(rid, time.monotonic())
        if state is CacheState.DONE:
            assert isinstance(cached, frames.Reply)
            self._send(identity, cached)
            return
        if state is CacheState.RUNNING:  # a repeat waits on the first, holds nothing
            waiting = self._running.setdefault(rid, [])
            if len(waiting) >= MAX_WAITERS:  # repeats may not grow the list forever
                self.repeats_refused += 1
                why = f"{MAX_WAITERS} repeats of this request are waiting already"
                self._send(identity, frames.Reply(rid, None, why, ReplyErrorKind.BUSY))
                return
            waiting.append(identity)
            return
        size = len(request.message.body)
        if not self.budget.take(identity, 1, size):
            if request.service not in UNCACHED_SERVICES:
                self.replies.forget(rid)
            why = f"this caller has {MAX_PEER_REQUESTS} requests (or their bytes) running here"
            self._send(identity, frames.Reply(rid, None, why, ReplyErrorKind.BUSY))
            return
        if request.service in UNCACHED_SERVICES:
            self._start(request, [identity], (identity, size), cache=False)
            return
        waiting = self._running.setdefault(rid, [])
        waiting.append(identity)
        self._start(request, waiting, (identity, size), cache=True)

    def _start(
        self,
        request: frames.Request,
        waiting: list[bytes],
        held: tuple[bytes, int],
        *,
        cache: bool,
    ) -> None:
        deadline = time.monotonic() + max(0.0, request.timeout)
        task = start_task(self._run(request, waiting, held, cache))
        if task.done():  # answered in its first step (eager start): nothing to watch
            return
        # One sweep timer cuts handlers at their deadlines: cheaper than a
        # timeout scope per request.
        self._deadlines[task] = deadline
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for task, deadline in list(self._deadlines.items()):
            if now >= deadline:
                task.cancel()
        if self._deadlines:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    async def _run(
        self, request: frames.Request, waiting: list[bytes], held: tuple[bytes, int], cache: bool
    ) -> None:
        rid = request.request_id
        service = request.service
        relay = self.relay
        try:
            if headers.SCATTER in request.message.headers:
                reply = await self._gather(service, request.message, request.timeout, waiting[0])
            elif relay is not None and not self.services.offers(service) and relay.serves(service):
                reply = await relay.call(service, request.message, timeout=request.timeout)
            else:
                reply = await self.services.call(service, request.message, timeout=None)
            answer = frames.Reply(rid, reply)
        except asyncio.CancelledError:  # its deadline passed (see _sweep)
            why = f"deadline of {request.timeout:.3f} s passed"
            answer = frames.Reply(rid, None, why, ReplyErrorKind.TIMEOUT)
        except PigeonError as exc:  # NoResponders, Rejected, Timeout; relayed: any
            why = exc.reason if isinstance(exc, Rejected) else str(exc)
            answer = frames.Reply(rid, None, why, reply_kind(exc))
        finally:
            # Done here rather than in done-callbacks: each of those costs a
            # loop callback per request.
            self.budget.give(held[0], 1, held[1])
            self._deadlines.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if cache:
            size = len(answer.message.body) if answer.message is not None else len(answer.error)
            self.replies.finish(rid, answer, time.monotonic(), size)
            waiting = self._running.pop(rid, waiting)
        self.last_answer = time.monotonic()
        for identity in waiting:
            self._send(identity, answer)

    async def _gather(
        self, service: str, message: Message, timeout: float, caller: bytes
    ) -> Message:
        """Scatter-gather: every server of ``service`` here and behind this
        node answers, in one reply (see ``headers.SCATTER``), but the caller
        itself (it asks its own servers). It is sent a little before the
        caller's deadline, so it reaches the caller."""
        plain = msgspec.structs.replace(
            message, headers={k: v for k, v in message.headers.items() if k != headers.SCATTER}
        )
        within = max(0.0, timeout * 0.9 - _GATHER_MARGIN)
        asks = []
        if self.services.offers(service):
            asks.append(self.services.call_all(service, plain, timeout=within))
        relay = self.relay
        if relay is not None and relay.serves(service):
            itself = relay.peers.get(caller)
            if any(p.offers(service) for p in relay.peers.values() if p is not itself):
                asks.append(relay.caller.request_all(service, plain, timeout=within, skip=itself))
        if not asks:
            raise NoResponders(service)
        replies = [reply for answers in await asyncio.gather(*asks) for reply in answers]
        return Message(
            id=new_id(),
            body=msgspec.msgpack.encode(replies),
            content_type=REPLIES_TYPE,
            headers={},
        )

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
