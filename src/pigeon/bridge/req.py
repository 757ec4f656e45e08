"""``--req URL=SERVICE``: answer plain REQ clients by calling a service."""

from __future__ import annotations

import asyncio

import zmq

from .._core.bridging import Malformed, plain_body
from ..errors import PigeonError, RemoteProtocolError
from .base import PlainBridge, error_body


class ReqBridge(PlainBridge):
    """Plain REQ clients call a service (binds by default: the seed's
    processors connect).

    The bridge is a ROUTER, so many REQ clients are served at once. Each
    request becomes a ``request(SERVICE, body)``; the reply's body goes
    back as one frame. A request that fails (no responders, timeout, the
    handler raised) or is malformed (multipart or empty) is answered with
    one frame ``pigeon.error <Error>: <reason>``, since a REQ client that
    gets no answer is stuck for good.

    Guarantee: as ``request``: the service runs a request at least once
    and answers it once (pigeon servers keep a reply cache across retries);
    the plain client gets exactly one answer per request while it is
    connected. A reply to a client that has left is counted, not sent.

    Bound: at most ``max_in_flight`` requests at once; at the bound the
    bridge stops reading, and further clients wait in ZeroMQ.

    Counters: ``received``, ``passed`` (answered with a reply),
    ``malformed`` (answered with an error; or without an envelope, which no
    REQ sends, dropped), ``dropped`` (answers to clients that left),
    ``failed`` (answered with an error from the service).
    """

    timeout = 10.0

    async def start(self) -> ReqBridge:
        self.counts.update(failed=0)
        self._sock = self._open(
            zmq.ROUTER, self.spec.endpoints[0], ROUTER_MANDATORY=1, RCVHWM=self.max_in_flight
        )
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        while True:
            frames = await self._receive(self._sock)
            # A REQ client's message: its routing id, an empty delimiter, the body.
            try:
                split = frames.index(b"", 1) + 1
            except ValueError:
                self._count_malformed(Malformed.MULTIPART)
                self._room.release()
                continue
            envelope, body = frames[:split], plain_body(frames[split:])
            if isinstance(body, Malformed):
                self._count_malformed(body)
                await self._answer(
                    envelope, error_body(RemoteProtocolError(f"a {body.value} request"))
                )
                self._room.release()
                continue
            self._spawn(self._call(envelope, body))

    async def _call(self, envelope: list[bytes], body: bytes) -> None:
        try:
            reply = await self.conn.request(self.spec.name, body, timeout=self.timeout)
        except PigeonError as exc:
            self.counts["failed"] += 1
            answer = error_body(exc)
        else:
            answer = reply.body
            self.counts["passed"] += 1
        finally:
            self._room.release()
        await self._answer(envelope, answer)

    async def _answer(self, envelope: list[bytes], body: bytes) -> None:
        try:
            await self._sock.send_multipart([*envelope, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            # The client left (EHOSTUNREACH) or stopped reading: nobody to answer.
            self.counts["dropped"] += 1

    async def _stop(self, timeout: float) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        cut = await self._wait_tasks(timeout)
        self.counts["dropped"] += cut
