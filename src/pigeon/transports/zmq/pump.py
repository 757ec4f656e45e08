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

from ..._core.frames import encode_batch
from ..._core.limits import MAX_BATCH_FRAMES

# Plain ints: an operator on pyzmq's enum.Flag constants costs about 0.5 µs
# (Flag.__or__, Enum.__new__), and a send did two of them.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_EVENTS = zmq.EVENTS
_RCVMORE = zmq.RCVMORE  # (Socket.get skips the sugar of the .rcvmore attribute)
# Frames, and bytes of them, handled per wake-up before yielding to the rest
# of the loop: a peer sending megabyte frames must not hold the loop (and
# every other peer's answers) for as long as it keeps sending.
_BUDGET = 4096
_BYTES_BUDGET = 1 << 20

FrameHandler = Callable[[bytes | None, bytes], None]
# For a CURVE server: (routing id, frame, the sender's key as its ZAP handler
# accepted it).
UserFrameHandler = Callable[[bytes, bytes, str], None]
# For a ROUTER: (routing id, the parts of a message of several, the peer's
# address as libzmq reports it), a foreign peer's message.
MultipartHandler = Callable[[bytes, list[bytes], str], None]


class Pump:
    """Reads frames from ``sock`` into ``on_frame(identity, data)``.

    ``identity`` is the ROUTER routing id, or None for DEALER sockets.
    Frames of the wrong shape (extra parts) are counted in ``malformed`` and
    dropped here; their content is the caller's business.
    """

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_frame: FrameHandler,
        *,
        router: bool,
        max_batch_bytes: int = 1 << 20,
        on_unroutable: Callable[[bytes], None] | None = None,
        on_user_frame: UserFrameHandler | None = None,
        on_multipart: MultipartHandler | None = None,
    ) -> None:
        self.sock = sock
        self.max_batch_bytes = max_batch_bytes
        self.on_unroutable = on_unroutable
        # Frames for a peer that already got one this loop iteration wait
        # here and leave together, as one Batch, at the end of the iteration.
        self._burst: dict[bytes | None, list[bytes]] = {}
        self._burst_bytes: dict[bytes | None, int] = {}
        self._burst_scheduled = False
        self.batches_sent = 0
        self.on_frame = on_frame
        self.on_user_frame = on_user_frame
        self.on_multipart = on_multipart
        self.router = router
        self.malformed = 0
        self.send_failures = 0
        self._loop = asyncio.get_running_loop()
        self._fd = int(sock.getsockopt(zmq.FD))
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
        if self.on_user_frame is not None:
            self._drain_with_users(self.on_user_frame)
            return
        sock = self.sock
        recv = sock.recv
        on_frame = self.on_frame
        router = self.router
        taken = 0
        try:
            for _ in range(_BUDGET):
                if router:
                    identity = recv(_NOBLOCK)
                    data = recv(_NOBLOCK)
                else:
                    identity = None
                    data = recv(_NOBLOCK)
                if sock.get(_RCVMORE):
                    self._discard_rest(identity, data)
                    continue
                on_frame(identity, data)
                if self._closed:
                    return
                taken += len(data)
                if taken >= _BYTES_BUDGET:
                    break
            # Budget spent (no zmq.Again yet): go on in the next iteration.
            self._schedule_drain()
        except zmq.Again:
            pass

    def _drain_with_users(self, on_user_frame: UserFrameHandler) -> None:
        # libzmq attaches the ZAP user id to every message of an
        # authenticated connection; reading it needs the frame object, so
        # this path does not take the copying fast path above.
        sock = self.sock
        taken = 0
        try:
            for _ in range(_BUDGET):
                head = sock.recv(_NOBLOCK, copy=False)
                data = sock.recv(_NOBLOCK)
                if sock.get(_RCVMORE):
                    self._discard_rest(head.bytes, data)
                    continue
                user = head.get("User-Id")
                on_user_frame(head.bytes, data, user if isinstance(user, str) else "")
                if self._closed:
                    return
                taken += len(data)
                if taken >= _BYTES_BUDGET:
                    break
            self._schedule_drain()  # budget spent (no zmq.Again yet)
        except zmq.Again:
            pass

    def _discard_rest(self, identity: bytes | None, first: bytes) -> None:
        # Pigeon sends one part; a message of several is a foreign peer's
        # (a REQ's empty delimiter and body, most often). The parts of one
        # message arrive together, so these recv calls never wait.
        self.malformed += 1
        parts = [first]
        address = ""
        while self.sock.get(_RCVMORE):
            part = self.sock.recv(_NOBLOCK, copy=False)
            parts.append(part.bytes)
            try:
                peer = part.get("Peer-Address")
            except zmq.ZMQError:  # libzmq has no address for every part (pyzmq 27)
                peer = None
            address = peer if isinstance(peer, str) else address
        if self.on_multipart is not None and identity is not None:
            self.on_multipart(identity, parts, address)

    def send_parts(self, identity: bytes, parts: list[bytes]) -> bool:
        """Send a message of several parts to a ROUTER peer (an answer to a
        foreign peer in its own framing); False if it could not be queued."""
        try:
            self.sock.send_multipart([identity, *parts], _NOBLOCK)
        except zmq.ZMQError:
            self.send_failures += 1
            return False
        return True

    def send(self, data: bytes, identity: bytes | None = None) -> bool:
        """Send one frame without blocking; False if it could not be queued.

        The first frame for a peer in a loop iteration leaves at once (a lone
        message is never held back); more frames for that peer in the same
        iteration are batched and leave together when the iteration ends.
        A batched frame that cannot be sent is reported to ``on_unroutable``.
        """
        burst = self._burst
        pending = burst.get(identity)
        if pending is None:
            burst[identity] = []
            if not self._burst_scheduled:
                self._burst_scheduled = True
                self._loop.call_soon(self._flush_bursts)
            return self._send_now(data, identity)
        pending.append(data)
        size = self._burst_bytes.get(identity, 0) + len(data)
        self._burst_bytes[identity] = size
        if size >= self.max_batch_bytes or len(pending) >= MAX_BATCH_FRAMES:
            self._flush_one(identity, pending)
            burst[identity] = []
            self._burst_bytes[identity] = 0
        return True

    def _flush_bursts(self) -> None:
        self._burst_scheduled = False
        burst, self._burst = self._burst, {}
        self._burst_bytes = {}
        for identity, pending in burst.items():
            if pending:
                self._flush_one(identity, pending)

    def _flush_one(self, identity: bytes | None, pending: list[bytes]) -> None:
        if self._closed:
            return
        data = pending[0] if len(pending) == 1 else encode_batch(pending)
        self.batches_sent += len(pending) > 1
        if not self._send_now(data, identity) and identity is not None and self.on_unroutable:
            self.on_unroutable(identity)

    def _send_now(self, data: bytes, identity: bytes | None) -> bool:
        try:
            if identity is not None:
                self.sock.send(identity, _SNDMORE_NOBLOCK)
            self.sock.send(data, _NOBLOCK)
        except zmq.ZMQError:
            # EHOSTUNREACH (ROUTER_MANDATORY: that peer is gone) or EAGAIN.
            self.send_failures += 1
            return False
        finally:
            # The socket's fd only signals edges, and a send may take the
            # edge of a frame that arrived meanwhile: look, and drain if one
            # is there (reading EVENTS is cheaper than a drain pass).
            if not self._closed and int(self.sock.get(_EVENTS)) & _POLLIN:
                self._schedule_drain()
        return True

    def flush(self) -> None:
        """Send every batched frame now (before closing)."""
        if self._burst:
            self._flush_bursts()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)
