"""One connection from this node to a remote node (a DEALER socket).

The link keeps what must survive the remote's restart: the outbox of sends
not yet confirmed (resent with the same ids, which the host de-duplicates),
and the consumers to re-register. Outgoing sends and settles are buffered
for the current loop iteration and flushed as one frame per queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import zmq

from ..._core import frames
from ..._core.foreign import Foreign
from ..._core.frames import Consume, Hello, Reply, Send, Settle
from ..._core.liveness import peer_grace
from ..._core.policy import RefusalReason, refusal_error
from ...errors import (
    AuthenticationError,
    Backpressure,
    NoPigeonNode,
    PigeonError,
    RemoteProtocolError,
)
from ...message import Message
from .config import NodeConfig, Waiters
from .monitor import ConnectionMonitor
from .pump import Pump
from .security import CurveClient, handshake_error
from .settler import LinkSettler

log = logging.getLogger("pigeon")


class LinkEvents(Protocol):
    """What a link tells its node."""

    def delivered(self, link: Link, queue: str, messages: list[Message]) -> None:
        """The remote host leased ``messages`` of ``queue`` to this node."""

    def replied(self, reply: Reply) -> None:
        """A server answered a call."""

    def requested(self, link: Link, request: frames.Request) -> None:
        """The remote relays a call to a service this node serves."""

    def remote_error(self, link: Link, reason: str) -> None:
        """The remote refused a frame of ours."""

    def went_down(self, link: Link) -> None:
        """The connection dropped or the remote stopped answering."""

    def verdict(self, link: Link, verdict: frames.Verdict) -> None:
        """The remote's answer to a Consume, or word that a grant is gone."""


class DurableSink(Protocol):
    """A durable outbox that keeps sends on disk until the host has them."""

    def confirmed(self, queue: str, message_ids: list[str]) -> None: ...

    def refused(self, link: Link, queue: str, message: Message) -> None: ...

    def dropped(self, queue: str, message: Message, error: Exception) -> None: ...


class Link:
    """A DEALER connection to the node at ``address``."""

    def __init__(
        self,
        config: NodeConfig,
        address: str,
        context: zmq.Context[zmq.Socket[bytes]],
        *,
        hello: Callable[[], Hello],
        events: LinkEvents,
        progress: Waiters,
        heard: Waiters,
        curve: CurveClient | None = None,
    ):
        self.config = config
        self.address = address
        self._hello = hello
        self._events = events
        self._progress = progress  # woken when the outbox shrinks
        self._heard = heard  # woken when the remote says Hello
        self.durable: DurableSink | None = None
        self._with_keys = curve is not None
        self.auth_error: AuthenticationError | None = None  # the last handshake failed
        self.auth_failures = 0
        self.times_lost = 0  # times this link went down (connection lost, heartbeats missed)
        # Connect attempts that failed (nothing listened) before one worked.
        self.connect_failures = 0
        self.shaken_at: float | None = None  # the first ZeroMQ handshake done
        self.foreign: Foreign | None = None  # the peer showed it is no pigeon node
        self.foreign_peers = 0
        self.created_at = time.monotonic()
        self.remote: Hello | None = None
        self.remote_session = ""
        self.up = False
        self.last_heard = 0.0
        self.outbox: dict[str, tuple[str, Message, asyncio.Future[None]]] = {}
        self.consumers: dict[str, Consume] = {}
        # Subscriptions to topics this link's host holds, by their queue:
        # sent again before their Consume whenever consumers re-register.
        self.subscriptions: dict[str, frames.Subscribe] = {}
        self.stale_settles = 0
        self.protocol_errors = 0
        self._sends: dict[str, list[Message]] = {}
        self._settles: dict[str, Settle] = {}
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, config.node_id.encode())
        # Frames go only to a live connection. Otherwise libzmq would keep
        # frames written while the peer was away and send them, on the next
        # connection, ahead of older ones we resend: order would break.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        config.tune(sock)
        if curve is not None:
            curve.apply(sock)
        # Watch before connecting: libzmq does not retry after some handshake
        # failures (a mechanism mismatch), so a missed first event is never
        # seen again. Events are read on the loop, after this constructor.
        self._monitor = ConnectionMonitor(
            sock,
            on_lost=lambda: self.mark_down("connection lost"),
            on_ready=self._handshake_done,
            on_refused=self._handshake_refused,
            on_dropped=lambda: self._is_foreign(Foreign.HANDSHAKE),
            on_retried=self._connect_retried,
        )
        sock.connect(address)
        self.pump = Pump(
            sock, self._on_frame, router=False, max_batch_bytes=config.max_message_size
        )
        self.settler = LinkSettler(self, "")
        self._hello_timer: asyncio.TimerHandle | None = None
        self._say_hello_until_heard(0.01)

    # -- state -----------------------------------------------------------

    @property
    def grace_ends(self) -> float:
        """When this link's connect grace ends (see ``pending_handshake``).

        Once the ZeroMQ handshake is done, the peer's Hello is waited for as
        long as a live peer's silence is borne (heartbeat x misses): over a
        slow link a pigeon node answers late, and is no foreign peer.
        """
        ends = self.created_at + self.config.connect_grace
        if self.shaken_at is not None:
            silence = self.config.heartbeat * self.config.heartbeat_misses
            ends = max(ends, self.shaken_at + silence)
        return ends

    @property
    def pending_handshake(self) -> bool:
        """Never heard from yet, and young enough to still be expected."""
        young = time.monotonic() < self.grace_ends
        return self.remote is None and young and self.auth_error is None

    def grace(self, heartbeat: float, misses: int) -> float:
        """Silence after which the remote is taken for dead: its own
        heartbeat interval counts (``_core.liveness`` Rule 3)."""
        claimed = self.remote.heartbeat if self.remote is not None else 0.0
        return peer_grace(heartbeat, claimed, misses)

    def offers(self, service: str) -> bool:
        return self.up and self.remote is not None and service in self.remote.services

    @property
    def hosts_queues(self) -> bool:
        return self.up and self.remote is not None and self.remote.hosts_queues

    def _connect_retried(self) -> None:
        if self.shaken_at is None:
            self.connect_failures += 1

    def _handshake_done(self) -> None:
        self.auth_error = None
        if self.shaken_at is None:
            self.shaken_at = time.monotonic()
        self.send_hello()

    # -- a peer that does not speak pigeon (_core.foreign) -------------------

    def _is_foreign(self, kind: Foreign) -> None:
        if self.remote is not None or self.foreign is not None:
            return  # it spoke pigeon once (a later drop is a lost link), or already told
        self.foreign = kind
        self.foreign_peers += 1
        log.warning("no pigeon node at %s: %s", self.address, kind.value)

    def check_silent(self, now: float) -> None:
        """A ZeroMQ peer that took the handshake and never answered Hello
        within the grace (``grace_ends``) is no pigeon node (a REP, a ROUTER)."""
        if self.remote is None and self.shaken_at is not None and now >= self.grace_ends:
            self._is_foreign(Foreign.SILENT)

    @property
    def not_pigeon(self) -> NoPigeonNode | None:
        """Why the peer at this address is no pigeon node, if it is not."""
        self.check_silent(time.monotonic())
        if self.foreign is None:
            return None
        if self.foreign is Foreign.SILENT:
            return NoPigeonNode(self.address)
        return NoPigeonNode(self.address, f"it refused the pigeon handshake: {self.foreign.value}")

    def _handshake_refused(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not self._with_keys:
            # Without keys this is no refusal: the connection was reset in
            # the handshake (a proxy before a node that is down, a
            # partition). The link is down; sends wait and are resent.
            self.mark_down("connection reset during the handshake")
            return
        # libzmq retries by itself; until a handshake succeeds, sends and
        # calls through this link fail at once with the reason.
        error = handshake_error(self.address, event, with_keys=self._with_keys)
        if self.auth_error is None:  # once per failing spell, not per retry
            log.warning("%s", error)
        self.auth_failures += 1
        self.auth_error = error
        self.fail_unconfirmed(lambda _queue: AuthenticationError(str(error), address=self.address))
        self._heard.wake()
        self.mark_down(str(error))

    def _say_hello_until_heard(self, delay: float) -> None:
        # With IMMEDIATE a Hello is dropped until the connection's pipe is
        # attached, which can lag the handshake event; so while the link is
        # not up, say Hello again soon, backing off to the heartbeat interval.
        self._hello_timer = None
        if self.up or self.pump.closed:
            return
        self.send_hello()
        self._hello_timer = self._loop.call_later(
            delay, self._say_hello_until_heard, min(delay * 2, self.config.heartbeat)
        )

    def mark_down(self, why: str) -> None:
        if self.up:
            self.up = False
            self.times_lost += 1
            log.debug("link down: %s (%s)", self.address, why)
            # What this link delivered is lost with it; what comes after
            # it is back is settled through a new settler.
            lost, self.settler = self.settler, LinkSettler(self, self.remote_session)
            lost.lose()
            self._events.went_down(self)
            if self._hello_timer is None:
                self._say_hello_until_heard(0.01)

    def heard(self, hello: Hello) -> None:
        self.last_heard = time.monotonic()
        self.foreign = None  # (a node that answers late is a node after all)
        restarted = hello.session != self.remote_session
        known = bool(self.remote_session)  # heard from before this session
        self.remote = hello
        self.remote_session = hello.session
        if restarted:
            self.settler = LinkSettler(self, hello.session)
            self._settles.clear()
        was_up, self.up = self.up, True
        if not was_up:
            again = " (the node restarted)" if restarted and known else ""
            log.debug("link up: %s%s", self.address, again)
        self._heard.wake()
        if restarted or not was_up or not hello.knows_you:
            # A new remote (or a dropped connection): frames may have been
            # lost, so re-register consumers and resend what is unconfirmed.
            for queue, consume in self.consumers.items():
                subscribe = self.subscriptions.get(queue)
                if subscribe is not None:
                    self.pump.send(frames.encode(subscribe))
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
        self.pump.send(frames.encode(self._hello()))

    def send_frame(self, frame: frames.Frame) -> bool:
        return self.pump.send(frames.encode(frame))

    def enqueue(self, queue: str, message: Message, future: asyncio.Future[None]) -> None:
        if self.auth_error is not None:
            raise AuthenticationError(str(self.auth_error), address=self.address)
        limit = self.config.outbox_limit
        if len(self.outbox) >= limit and self.durable is None:
            # (A durable outbox checks its limit when it accepts a send.)
            raise Backpressure(f"outbox to {self.address}", limit)
        self.outbox[message.id] = (queue, message, future)
        if not self._flush_scheduled and self.up:
            # The first send of a loop turn leaves at once (an awaited send
            # never waits a turn); the rest of the turn's are batched by flush.
            self._schedule_flush()
            self.send_frame(Send(queue, [message]))
            return
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
        for run in frames.chunks_by_size(messages, self.config.max_message_size):
            self.send_frame(Send(queue, run))

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
                self._events.delivered(self, queue, messages)
            case frames.Confirm(ids):
                self._confirmed(ids)
            case frames.Refuse(refusals):
                self._refused(refusals)
            case frames.Reply():
                self._events.replied(frame)
            case frames.Request():
                self._events.requested(self, frame)
            case frames.Verdict():
                self._events.verdict(self, frame)
            case frames.Hello():
                self.heard(frame)
            case frames.Error(reason, queue, ids) if ids:
                # Settles the host had no lease for: they changed nothing
                # there (the lease expired, or the host forgot us).
                self.stale_settles += len(ids)
                self._events.remote_error(self, f"{reason}: {queue} {ids[:8]}")
            case frames.Error(reason):
                self.protocol_errors += 1
                self._events.remote_error(self, reason)
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
        self._progress.wake()
        durable = self.durable
        if durable is not None:
            for queue, confirmed in by_queue.items():
                durable.confirmed(queue, confirmed)

    def _refused(self, refusals: list[tuple[str, RefusalReason, str]]) -> None:
        durable = self.durable
        for mid, reason, detail in refusals:
            entry = self.outbox.pop(mid, None)
            if entry is None:
                continue
            queue, message, future = entry
            error = refusal_error(queue, reason, detail)
            if durable is not None and reason.retryable:
                durable.refused(self, queue, message)  # kept, and tried again
            elif durable is not None:
                durable.dropped(queue, message, error)
            elif not future.done():
                future.set_exception(error)
        self._progress.wake()

    def withdraw(self, future: asyncio.Future[None]) -> bool:
        """Stop resending the send behind ``future`` (its caller gave up on it)."""
        for mid, entry in self.outbox.items():
            if entry[2] is future:
                del self.outbox[mid]
                self._progress.wake()
                return True
        return False

    def fail_unconfirmed(self, error: Callable[[str], PigeonError]) -> int:
        """Fail every send still waiting for a confirm with ``error(queue)``;
        returns how many."""
        failed = 0
        for queue, _message, future in self.outbox.values():
            failed += 1
            if not future.done():
                future.set_exception(error(queue))
        self.outbox.clear()
        self._progress.wake()
        return failed

    def close(self) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._monitor.close()
        self.pump.close()
