"""``--rep SERVICE=URL[,URL...]``: serve a service by calling plain REP
servers, the lazy-pirate way (zguide ch. 4)."""

from __future__ import annotations

import time

import zmq
import zmq.asyncio

from .._core.bridging import LazyPirate, Malformed, plain_body
from ..errors import LocalProtocolError, RemoteProtocolError, Timeout
from ..message import Message
from .base import PlainBridge, ready


class RepBridge(PlainBridge):
    """A service answered by plain REP servers (connects by default: the
    seed's responders bind).

    Each call goes to the next REP server in turn over a REQ socket of its
    own. No reply within ``attempt_timeout``: the socket is closed (a REQ
    that lost its reply is stuck), that server is skipped for ``cooldown``
    seconds and the call is sent to the next, at most ``attempts`` times
    and never past the caller's deadline.

    Guarantee: at-least-once towards the REP servers: a server that was
    only slow may run a retried call too (a plain REP has no reply cache).
    The caller gets one reply, or ``Rejected`` with the reason (every
    server timed out, or a server answered with a malformed message).

    Bound: at most ``max_in_flight`` calls at once; further calls wait.

    Counters: ``received``, ``passed`` (answered), ``malformed`` (empty
    requests refused; multipart or empty replies), ``dropped`` (calls that
    failed: the caller got an error), ``attempts``, ``timeouts``,
    ``failovers``, ``cooling`` (servers being skipped now).
    """

    attempt_timeout = 2.5
    attempts = 3
    cooldown = 5.0

    async def start(self) -> RepBridge:
        self.counts.update(attempts=0, timeouts=0, failovers=0)
        self._pirate = LazyPirate(
            len(self.spec.endpoints), attempts=self.attempts, cooldown=self.cooldown
        )
        self._idle: list[list[zmq.asyncio.Socket]] = [[] for _ in self.spec.endpoints]
        self._server = await self.conn.serve(self.spec.name, self._call)
        return self

    def stats(self) -> dict[str, object]:
        stats = super().stats()
        if hasattr(self, "_pirate"):
            stats["cooling"] = self._pirate.cooling(time.monotonic())
        return stats

    def _take(self, index: int) -> zmq.asyncio.Socket:
        idle = self._idle[index]
        if idle:
            return idle.pop()
        return self._open(zmq.REQ, self.spec.endpoints[index])

    def _discard(self, sock: zmq.asyncio.Socket) -> None:
        sock.close(linger=0)
        self._sockets.remove(sock)

    async def _call(self, message: Message) -> bytes:
        self.counts["received"] += 1
        if not message.body:
            self._count_malformed(Malformed.EMPTY)
            self.counts["dropped"] += 1
            raise LocalProtocolError("a plain REP server cannot take an empty request")
        async with self._room:
            return await self._attempts(message)

    async def _attempts(self, message: Message) -> bytes:
        # The deadline is wall clock (it travels); attempts are timed on the
        # monotonic clock.
        deadline = None
        if message.deadline is not None:
            deadline = time.monotonic() + (message.deadline - time.time())
        attempt = 0
        while True:
            attempt += 1
            self.counts["attempts"] += 1
            index = self._pirate.choose(time.monotonic())
            endpoint = self.spec.endpoints[index]
            sock = self._take(index)
            keep = False
            try:
                await sock.send(message.body, zmq.NOBLOCK)
                wait = self.attempt_timeout
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                if await ready(sock, wait, zmq.POLLIN):
                    reply = plain_body(await sock.recv_multipart())
                    if isinstance(reply, Malformed):
                        self._count_malformed(reply)
                        self.counts["dropped"] += 1
                        raise RemoteProtocolError(
                            f"plain REP server {endpoint.url} answered with a {reply.value} message"
                        )
                    keep = True
                    self._pirate.answered(index)
                    self.counts["passed"] += 1
                    return reply
            finally:
                if keep:
                    self._idle[index].append(sock)
                else:
                    self._discard(sock)
            now = time.monotonic()
            self.counts["timeouts"] += 1
            self._pirate.timed_out(index, now)
            if not self._pirate.retry(attempt, now, deadline):
                self.counts["dropped"] += 1
                raise Timeout(
                    f"no plain REP server of {self.spec.name!r} answered "
                    f"in {attempt} attempt(s) (last: {endpoint.url})"
                )
            self.counts["failovers"] += 1

    async def _stop(self, timeout: float) -> None:
        # Calls that run may finish; the rest go back to their callers, who
        # retry on another server of the service.
        await self._server.drain(grace=timeout)
