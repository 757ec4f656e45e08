"""Moves frames between a ZeroMQ socket and the asyncio loop, the fast way.

A zmq socket's FD is edge-triggered: it signals once, then stays quiet until
the socket's state changes again. So the loop is woken once, and we drain
every frame already queued with non-blocking recv calls (awaiting each recv
costs ~20x). A send can swallow the edge of incoming frames, so after sends
we schedule one more drain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq

_NOBLOCK = zmq.NOBLOCK
_SNDMORE = zmq.SNDMORE
# Frames handled per wake-up before yielding to the rest of the loop.
_BUDGET = 4096

FrameHandler = Callable[[bytes | None, bytes], None]


class Pump:
    """Reads frames from ``sock`` into ``on_frame(identity, data)``.

    ``identity`` is the ROUTER routing id, or None for DEALER sockets.
    Frames of the wrong shape (extra parts) are counted in ``malformed`` and
    dropped here; their content is the caller's business.
    """

    def __init__(self, sock: zmq.Socket[bytes], on_frame: FrameHandler, *, router: bool) -> None:
        self.sock = sock
        self.on_frame = on_frame
        self.router = router
        self.malformed = 0
        self.send_failures = 0
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._drain_scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self._closed:
            return
        sock = self.sock
        recv = sock.recv
        on_frame = self.on_frame
        router = self.router
        try:
            for _ in range(_BUDGET):
                if router:
                    identity = recv(_NOBLOCK)
                    data = recv(_NOBLOCK)
                else:
                    identity = None
                    data = recv(_NOBLOCK)
                if sock.rcvmore:
                    self._discard_rest()
                    continue
                on_frame(identity, data)
                if self._closed:
                    return
            else:
                # Budget spent with frames left: continue on the next iteration.
                self._schedule_drain()
        except zmq.Again:
            pass

    def _discard_rest(self) -> None:
        self.malformed += 1
        while self.sock.rcvmore:
            self.sock.recv(_NOBLOCK)

    def send(self, data: bytes, identity: bytes | None = None) -> bool:
        """Send one frame without blocking; False if it could not be queued."""
        try:
            if identity is not None:
                self.sock.send(identity, _SNDMORE | _NOBLOCK)
            self.sock.send(data, _NOBLOCK)
        except zmq.ZMQError:
            # EHOSTUNREACH (ROUTER_MANDATORY: that peer is gone) or EAGAIN.
            self.send_failures += 1
            return False
        finally:
            self._schedule_drain()
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)
