"""The client side of request-reply on a node: which server gets a call,
and moving a call on when its server is lost or its attempt runs out.

The decisions are the core's (:class:`pigeon._core.rpc.Correlator`); this
adapter sends the frames, waits for replies, and runs one sweep timer for
all pending calls instead of a timer per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol, cast

import msgspec

from ..._core.frames import Frame, Reply, Request
from ..._core.headers import SCATTER
from ..._core.limits import MAX_FRAME_ITEMS
from ..._core.policy import ReplyErrorKind, reply_error
from ..._core.rpc import REPLIES_TYPE, Correlator
from ...errors import AuthenticationError, NoPigeonNode, NoResponders, PigeonError, Timeout
from ...message import Message, new_id
from ..local import LocalServices
from .config import Waiters


class Target(Protocol):
    """A server a call can go to: a link to a node, or (for a node that
    relays) a peer connected to it."""

    @property
    def up(self) -> bool: ...

    @property
    def auth_error(self) -> AuthenticationError | None: ...

    @property
    def pending_handshake(self) -> bool: ...

    @property
    def not_pigeon(self) -> NoPigeonNode | None: ...

    @property
    def grace_ends(self) -> float: ...

    def offers(self, service: str) -> bool: ...

    def send_frame(self, frame: Frame) -> bool: ...

    def __hash__(self) -> int: ...


# A gathered answer: at most a frame's worth of replies, each checked.
_replies_decoder = msgspec.msgpack.Decoder(
    Annotated[list[Message], msgspec.Meta(max_length=MAX_FRAME_ITEMS)]
)

_RETRY = object()  # resolves an attempt's future when the call must move on
_SWEEP = 0.01  # seconds between checks of pending calls' deadlines
_LOCAL = "local"  # the candidate name of this node's own services


class Caller:
    """Makes the calls of one node (see the module docstring)."""

    def __init__(
        self,
        links: Sequence[Target],
        services: LocalServices,
        *,
        attempt_timeout: float | None,
        heard: Waiters,
    ) -> None:
        self.links = links  # the node's own list: links it adds later count too
        self.services = services
        self.attempt_timeout = attempt_timeout
        self._heard = heard
        self.correlator = Correlator()
        self._attempts: dict[str, asyncio.Future[Any]] = {}
        self._scattered: dict[str, Target] = {}  # request_all's attempts, by request id
        self.malformed_gathers = 0  # gathered answers that did not decode
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, service: str, message: Message, *, timeout: float) -> Message:
        """Call ``service``; see :meth:`pigeon.Connection.request`."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + timeout
        rid = message.id
        call = self.correlator.start(
            rid, service, now, timeout=timeout, attempt_timeout=self.attempt_timeout or timeout
        )
        declined: list[Any] = []  # servers that said they no longer serve it
        try:
            while True:
                candidates = self._candidates(service)
                if not candidates and not call.tried:
                    await self._await_handshakes(service, deadline)
                    candidates = self._candidates(service)
                if declined:
                    candidates = [c for c in candidates if c not in declined]
                server = self.correlator.choose(call, candidates, time.monotonic())
                if server is None:
                    raise self._nobody(service)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if server is _LOCAL:
                    return await self.services.call(service, message, timeout=remaining)
                attempt: asyncio.Future[Any] = loop.create_future()
                self._attempts[rid] = attempt
                cast(Target, server).send_frame(Request(rid, service, message, remaining))
                self._arm_sweep()
                result = await attempt
                if result is not _RETRY:
                    if result.error_kind is not ReplyErrorKind.NO_RESPONDERS:
                        return _reply_or_raise(service, result)
                    # It withdrew the service (a server draining) before
                    # running this: another may take it (the core's Rule 2).
                    declined.append(server)
                if time.monotonic() >= deadline:
                    break
        finally:
            self._attempts.pop(rid, None)
            self.correlator.discard(rid)
        raise Timeout(f"service {service!r} did not answer within {timeout:.3f} s")

    async def request_all(
        self, service: str, message: Message, *, timeout: float, skip: Any = None
    ) -> list[Message]:
        """Ask every server of ``service`` this node knows once; the replies
        that came within ``timeout`` (see :meth:`pigeon.Connection.request_all`);
        ``skip``: a server not to ask (the caller, when relaying for it).
        A server lost meanwhile, or whose handler failed, gives none. (A node
        that relays for servers behind it is one server here.)"""
        deadline = time.monotonic() + timeout
        candidates = self._candidates(service)
        if not candidates:
            await self._await_handshakes(service, deadline)
            candidates = self._candidates(service)
        candidates = [c for c in candidates if c is not skip]
        if not candidates:
            raise self._nobody(service)
        asks = [self._ask(c, service, message, deadline) for c in candidates]
        answers = await asyncio.gather(*asks)
        return [reply for replies in answers for reply in replies]

    async def _ask(
        self, target: Any, service: str, message: Message, deadline: float
    ) -> list[Message]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return []
        if target is _LOCAL:
            return await self.services.call_all(service, message, timeout=remaining)
        rid = new_id()
        attempt: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._attempts[rid] = attempt
        self._scattered[rid] = target
        # A node answers for every server it has, and relays to, at once.
        asking = msgspec.structs.replace(message, headers={**message.headers, SCATTER: "1"})
        try:
            cast(Target, target).send_frame(Request(rid, service, asking, remaining))
            async with asyncio.timeout(remaining):
                result = await attempt
        except TimeoutError:
            return []
        finally:
            self._attempts.pop(rid, None)
            self._scattered.pop(rid, None)
        if result is _RETRY or result.error_kind is not ReplyErrorKind.NONE:
            return []
        reply = result.message
        if reply is None:
            return []
        if reply.content_type != REPLIES_TYPE:
            return [reply]  # a peer that answers for itself alone
        try:
            return _replies_decoder.decode(reply.body)
        except msgspec.DecodeError:
            self.malformed_gathers += 1
            return []

    def _nobody(self, service: str) -> PigeonError:
        # A node that refused our key is not "no responders": say why.
        refused = [link.auth_error for link in self.links if link.auth_error is not None]
        if refused and not any(link.up for link in self.links):
            return AuthenticationError(str(refused[0]), address=refused[0].address)
        # Nor is a peer that does not speak pigeon (a raw REP, a PUSH).
        foreign = [link.not_pigeon for link in self.links if link.not_pigeon is not None]
        if foreign and not any(link.up for link in self.links):
            return foreign[0]
        return NoResponders(service)

    def _arm_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        """Move on the calls whose attempt or deadline ran out, as the core
        says (one timer for all calls, rather than one per call)."""
        self._sweeper = None
        expired, retry = self.correlator.due(time.monotonic())
        for call in (*expired, *retry):
            attempt = self._attempts.get(call.request_id)
            if attempt is not None:
                _resolve(attempt, _RETRY)
        if self._attempts:
            self._arm_sweep()

    def _candidates(self, service: str) -> list[Any]:
        candidates: list[Any] = [link for link in self.links if link.offers(service)]
        if self.services.offers(service):
            candidates.append(_LOCAL)
        return candidates

    async def _await_handshakes(self, service: str, deadline: float) -> None:
        # Right after connecting we do not yet know who serves what; wait
        # (briefly, bounded by connect_grace) rather than claim NoResponders.
        def found() -> bool:
            return any(link.offers(service) for link in self.links) or self.services.offers(service)

        await await_handshakes(self.links, self._heard, found, deadline)

    def on_reply(self, reply: Reply, source: Any = None) -> None:
        """A reply came; with ``source``, only from the server the call's
        attempt went to counts (another peer may not answer for it)."""
        rid = reply.request_id
        attempt = self._attempts.get(rid)
        if rid in self._scattered:
            if source is not None and self._scattered[rid] is not source:
                attempt = None
        elif (
            attempt is not None and source is not None and not self.correlator.sent_to(rid, source)
        ):
            attempt = None
        if attempt is None:
            self.correlator.late_replies += 1
            return
        _resolve(attempt, reply)

    def server_lost(self, link: Target) -> None:
        """Calls on a lost server move on to another one (the core's Rule 2)."""
        for call in self.correlator.server_lost(link):
            attempt = self._attempts.get(call.request_id)
            if attempt is not None:
                _resolve(attempt, _RETRY)
        for rid, target in list(self._scattered.items()):
            if target is link:
                _resolve(self._attempts[rid], _RETRY)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for attempt in self._attempts.values():
            _resolve(attempt, _RETRY)


async def await_handshakes(
    links: Sequence[Target], heard: Waiters, found: Callable[[], bool], deadline: float
) -> None:
    """Wait until ``found()``, or until no link is still expected to say
    Hello, or ``deadline`` (monotonic). Each Hello heard wakes the wait; a
    link's grace running out ends it."""

    def settled() -> bool:
        return found() or not any(link.pending_handshake for link in links)

    # A link's grace grows once its ZeroMQ handshake is done (its Hello
    # may come late over a slow link), so look again when one ends.
    while not settled() and time.monotonic() < deadline:
        pending = [link for link in links if link.pending_handshake]
        grace_ends = max(link.grace_ends for link in pending)
        await heard.wait_until(settled, min(deadline, grace_ends))


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _reply_or_raise(service: str, reply: Reply) -> Message:
    if reply.message is not None and reply.error_kind is ReplyErrorKind.NONE:
        return reply.message
    raise reply_error(service, reply.error_kind, reply.error)
