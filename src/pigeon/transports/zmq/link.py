"""One connection from this node to a remote node (a DEALER socket).

The link keeps what must survive the remote's restart: the outbox of sends
not yet confirmed (resent with the same ids, which the host de-duplicates),
and the consumers to re-register. Outgoing sends and settles are buffered
for the current loop iteration and flushed as one frame per queue.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..._core import frames
from ..._core.frames import Consume, Hello, Send, Settle
from ...errors import Backpressure, RemoteProtocolError, StoreError
from ...message import Message
from ..base import Delivery
from .pump import Pump

if TYPE_CHECKING:
    from .node import ZmqTransport


class _LinkSettler:
    """Batches a worker's settles into one Settle frame per queue per iteration."""

    __slots__ = ("link", "session")

    def __init__(self, link: Link, session: str) -> None:
        self.link = link
        self.session = session

    def _pending(self, delivery: Delivery) -> Settle | None:
        if self.session != self.link.remote_session:
            # That host restarted: it no longer knows this lease.
            self.link.stale_settles += 1
            return None
        return self.link.pending_settle(delivery.queue)

    def ack(self, delivery: Delivery) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.acks.append(delivery.message.id)

    def nack(self, delivery: Delivery, delay: float, reason: str) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.nacks.append((delivery.message.id, delay, reason))

    def reject(self, delivery: Delivery, reason: str) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.rejects.append((delivery.message.id, reason))

    def extend(self, delivery: Delivery) -> None:
        pending = self._pending(delivery)
        if pending is not None:
            pending.extends.append(delivery.message.id)


class Link:
    """A DEALER connection to the node at ``address``."""

    def __init__(self, node: ZmqTransport, address: str, context: zmq.Context[zmq.Socket[bytes]]):
        self.node = node
        self.address = address
        self.created_at = time.monotonic()
        self.remote: Hello | None = None
        self.remote_session = ""
        self.up = False
        self.last_heard = 0.0
        self.outbox: dict[str, tuple[str, Message, asyncio.Future[None]]] = {}
        self.consumers: dict[str, Consume] = {}
        self.stale_settles = 0
        self.protocol_errors = 0
        self._sends: dict[str, list[Message]] = {}
        self._settles: dict[str, Settle] = {}
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, node.node_id.encode())
        # Frames go only to a live connection. Otherwise libzmq would keep
        # frames written while the peer was away and send them, on the next
        # connection, ahead of older ones we resend: order would break.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        node.tune(sock)
        sock.connect(address)
        self.pump = Pump(sock, self._on_frame, router=False, max_batch_bytes=node.max_message_size)
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self._monitor_fd = int(self._monitor.getsockopt(zmq.FD))
        self._loop.add_reader(self._monitor_fd, self._on_monitor)
        # The monitor's FD is edge-triggered like any zmq FD: an event that
        # came before add_reader would not wake us, so look once now.
        self._loop.call_soon(self._on_monitor)
        self.settler = _LinkSettler(self, "")
        self._hello_timer: asyncio.TimerHandle | None = None
        self._say_hello_until_heard(0.01)

    # -- state -----------------------------------------------------------

    @property
    def pending_handshake(self) -> bool:
        """Never heard from yet, and young enough to still be expected."""
        return self.remote is None and time.monotonic() - self.created_at < self.node.connect_grace

    def offers(self, service: str) -> bool:
        return self.up and self.remote is not None and service in self.remote.services

    @property
    def hosts_queues(self) -> bool:
        return self.up and self.remote is not None and self.remote.hosts_queues

    def _on_monitor(self) -> None:
        # Monitor events tell at once that the TCP connection dropped, far
        # sooner than missed heartbeats would, and when a new one is ready to
        # carry frames (after the ZMTP handshake; IMMEDIATE drops them before).
        if self._monitor.closed:
            return
        try:
            while True:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self.mark_down("connection lost")
                elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.send_hello()
        except zmq.Again:
            pass

    def _say_hello_until_heard(self, delay: float) -> None:
        # With IMMEDIATE a Hello is dropped until the connection's pipe is
        # attached, which can lag the handshake event; so while the link is
        # not up, say Hello again soon, backing off to the heartbeat interval.
        self._hello_timer = None
        if self.up or self.pump.closed:
            return
        self.send_hello()
        self._hello_timer = self._loop.call_later(
            delay, self._say_hello_until_heard, min(delay * 2, self.node.heartbeat)
        )

    def mark_down(self, why: str) -> None:
        if self.up:
            self.up = False
            self.node.link_down(self, why)
            if self._hello_timer is None:
                self._say_hello_until_heard(0.01)

    def heard(self, hello: Hello) -> None:
        self.last_heard = time.monotonic()
        restarted = hello.session != self.remote_session
        self.remote = hello
        self.remote_session = hello.session
        if restarted:
            self.settler = _LinkSettler(self, hello.session)
            self._settles.clear()
        was_up, self.up = self.up, True
        if restarted or not was_up:
            # A new remote (or a dropped connection): frames may have been
            # lost, so re-register consumers and resend what is unconfirmed.
            for consume in self.consumers.values():
                self.pump.send(frames.encode(consume))
            self._resend_outbox()

    def _resend_outbox(self) -> None:
        by_queue: dict[str, list[Message]] = {}
        for queue, message, _ in self.outbox.values():
            by_queue.setdefault(queue, []).append(message)
        for queue, messages in by_queue.items():
            self._send_batches(queue, messages)

    # -- outgoing --------------------------------------------------------

    def send_hello(self) -> None:
        self.pump.send(frames.encode(self.node.hello()))

    def send_frame(self, frame: frames.Frame) -> bool:
        return self.pump.send(frames.encode(frame))

    def enqueue(self, queue: str, message: Message, future: asyncio.Future[None]) -> None:
        if len(self.outbox) >= self.node.outbox_limit and self.node.outbox is None:
            # (A durable outbox checks its limit when it accepts a send.)
            raise Backpressure(f"outbox to {self.address}", self.node.outbox_limit)
        self.outbox[message.id] = (queue, message, future)
        self._sends.setdefault(queue, []).append(message)
        self._schedule_flush()

    def pending_settle(self, queue: str) -> Settle:
        settle = self._settles.get(queue)
        if settle is None:
            settle = self._settles[queue] = Settle(queue, [], [], [], [])
            self._schedule_flush()
        return settle

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        sends, self._sends = self._sends, {}
        settles, self._settles = self._settles, {}
        if self.up:
            # While down, new sends wait in the outbox; heard() resends the
            # whole outbox in the order it was filled.
            for queue, messages in sends.items():
                self._send_batches(queue, messages)
        for settle in settles.values():
            self.send_frame(settle)

    def _send_batches(self, queue: str, messages: list[Message]) -> None:
        limit = self.node.max_message_size
        batch: list[Message] = []
        size = 0
        for message in messages:
            if batch and size + len(message.body) > limit:
                self.send_frame(Send(queue, batch))
                batch, size = [], 0
            batch.append(message)
            size += len(message.body) + 64
        if batch:
            self.send_frame(Send(queue, batch))

    # -- incoming --------------------------------------------------------

    def _on_frame(self, _identity: bytes | None, data: bytes) -> None:
        try:
            received = frames.decode_all(data)
        except RemoteProtocolError:
            self.protocol_errors += 1
            return
        self.last_heard = time.monotonic()
        for frame in received:
            self._on_one(frame)

    def _on_one(self, frame: frames.Frame) -> None:
        match frame:
            case frames.Deliver(queue, messages):
                self.node.deliver(self, queue, messages)
            case frames.Confirm(ids):
                self._confirmed(ids)
            case frames.Refuse(id_reasons):
                self._refused(id_reasons)
            case frames.Reply():
                self.node.on_reply(self, frame)
            case frames.Hello():
                self.heard(frame)
            case frames.Error(reason):
                self.protocol_errors += 1
                self.node.on_remote_error(self, reason)
            case _:
                self.protocol_errors += 1

    def _confirmed(self, ids: list[str]) -> None:
        outbox = self.outbox
        by_queue: dict[str, list[str]] = {}
        for mid in ids:
            entry = outbox.pop(mid, None)
            if entry is None:
                continue
            if not entry[2].done():
                entry[2].set_result(None)
            by_queue.setdefault(entry[0], []).append(mid)
        durable = self.node.outbox
        if durable is not None:
            for queue, confirmed in by_queue.items():
                durable.confirmed(queue, confirmed)

    def _refused(self, id_reasons: list[tuple[str, str]]) -> None:
        durable = self.node.outbox
        for mid, reason in id_reasons:
            entry = self.outbox.pop(mid, None)
            if entry is None:
                continue
            queue, message, future = entry
            error = self.node.refusal(queue, reason)
            if durable is not None and isinstance(error, (Backpressure, StoreError)):
                durable.refused(self, queue, message)  # kept, and tried again
            elif durable is not None:
                durable.dropped(queue, message, error)
            elif not future.done():
                future.set_exception(error)

    def close(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._loop.remove_reader(self._monitor_fd)
        self.pump.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.pump.close()
