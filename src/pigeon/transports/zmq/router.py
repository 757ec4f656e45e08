"""The serving side of a node: a ROUTER socket on the node's bind addresses.

Peers connect here to send into the queues this node hosts, to consume them,
and to call the services it serves. Garbage from a peer is counted and
dropped, and that peer gets an ``Error`` frame; everyone else is served on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable

import zmq

from ..._core import frames
from ..._core.liveness import Liveness
from ..._core.policy import RefusalReason, ReplyErrorKind, reply_kind
from ..._core.rpc import CacheState, ReplyCache
from ...errors import (
    DeliveryError,
    ProtocolError,
    Rejected,
    RemoteProtocolError,
    StoreError,
    Timeout,
)
from ...message import Message
from ..host import QueueHost
from ..local import LocalServices
from .config import NodeConfig
from .pump import Pump

_SWEEP = 0.01  # seconds between checks of running requests' deadlines
Refusal = tuple[str, RefusalReason, str]


class RouterSide:
    """Answers peers on a node's bind addresses, for its ``host`` of queues
    and its ``services``."""

    def __init__(
        self,
        config: NodeConfig,
        context: zmq.Context[zmq.Socket[bytes]],
        *,
        hello: Callable[[], frames.Hello],
        host: QueueHost,
        services: LocalServices,
    ) -> None:
        self.config = config
        self._hello = hello
        self.host = host
        self.services = services
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that reconnects with the same id takes over its old pipe.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        config.tune(sock)
        self.sock = sock
        self.liveness = Liveness(interval=config.heartbeat, misses=config.heartbeat_misses)
        self.replies = ReplyCache()
        self._running: dict[str, list[bytes]] = {}
        self._consumers: dict[bytes, set[tuple[bytes, str]]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self._deadlines: dict[asyncio.Task[None], float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.protocol_errors = 0
        self.peers_lost = 0
        self.pump: Pump | None = None

    def bind(self, address: str) -> str:
        """Bind one address; returns the resolved one (``tcp://…:0`` gets a port)."""
        self.sock.bind(address)
        return str(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))

    def start(self) -> None:
        self.pump = Pump(
            self.sock,
            self._on_frame,
            router=True,
            max_batch_bytes=self.config.max_message_size,
            on_unroutable=self.peer_lost,
        )

    # -- incoming --------------------------------------------------------

    def _on_frame(self, identity: bytes | None, data: bytes) -> None:
        assert identity is not None
        try:
            received = frames.decode_all(data)
        except RemoteProtocolError as exc:
            self._refuse_peer(identity, str(exc))
            return
        if self.liveness.heard(identity, time.monotonic()) and not isinstance(
            received[0], frames.Hello
        ):
            # A peer we did not know (or had given up on) speaks first with
            # data: tell it who we are so it re-registers what it needs.
            self._send(identity, self._hello())
        for frame in received:
            try:
                self._dispatch(identity, frame)
            except ProtocolError as exc:
                # e.g. a Consume with a lease_ttl of NaN: the core refused it.
                self._refuse_peer(identity, str(exc))

    def _dispatch(self, identity: bytes, frame: frames.Frame) -> None:
        host = self.host
        match frame:
            case frames.Send(queue, messages):
                self._on_send(identity, queue, messages)
            case frames.Settle(queue, acks, nacks, rejects, extends):
                host.settle(
                    queue,
                    (identity, queue),
                    acks=acks,
                    nacks=nacks,
                    rejects=rejects,
                    extends=extends,
                )
            case frames.Hello():
                self._send(identity, self._hello())
            case frames.Consume(queue, prefetch, lease_ttl, max_attempts):
                self._on_consume(identity, queue, prefetch, lease_ttl, max_attempts)
            case frames.Cancel(queue):
                host.unsubscribe(queue, (identity, queue))
                self._consumers.get(identity, set()).discard((identity, queue))
            case frames.Request():
                self._on_request(identity, frame)
            case _:
                self._refuse_peer(identity, f"unexpected frame {type(frame).__name__} from a peer")

    def _refuse_peer(self, identity: bytes, reason: str) -> None:
        # ZeroMQ gives a ROUTER no way to hang up on one peer; we answer with
        # an Error frame and keep serving everyone else.
        self.protocol_errors += 1
        self._send(identity, frames.Error(reason))

    def _on_send(self, identity: bytes, queue: str, messages: list[Message]) -> None:
        limit = self.config.max_message_size
        refused: list[Refusal] = [
            (m.id, RefusalReason.TOO_LARGE, f"{len(m.body)} > {limit} bytes")
            for m in messages
            if len(m.body) > limit
        ]
        if refused:
            messages = [m for m in messages if len(m.body) <= limit]
        host = self.host
        if host.committer is None:
            self._answer_send(
                identity, queue, messages, [host.put(queue, m) for m in messages], refused
            )
            return
        # Durable: confirm only after the group commit is on disk.
        task = asyncio.ensure_future(self._store_then_answer(identity, queue, messages, refused))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_then_answer(
        self, identity: bytes, queue: str, messages: list[Message], refused: list[Refusal]
    ) -> None:
        results: list[bool | None]
        try:
            results = await self.host.put_many(queue, messages)
        except StoreError as exc:
            detail = str(exc)
            refused = refused + [(m.id, RefusalReason.STORE_FAILED, detail) for m in messages]
            messages, results = [], []
        self._answer_send(identity, queue, messages, results, refused)

    def _answer_send(
        self,
        identity: bytes,
        queue: str,
        messages: list[Message],
        results: list[bool | None],
        refused: list[Refusal],
    ) -> None:
        confirmed = []
        for message, result in zip(messages, results, strict=True):
            if result is None:
                refused.append((message.id, RefusalReason.FULL, f"queue {queue!r}"))
            else:
                confirmed.append(message.id)
        if confirmed:
            self._send(identity, frames.Confirm(confirmed))
        if refused:
            self._send(identity, frames.Refuse(refused))

    def _on_consume(
        self, identity: bytes, queue: str, prefetch: int, lease_ttl: float, max_attempts: int
    ) -> None:
        if prefetch < 1:
            self._refuse_peer(identity, f"prefetch must be >= 1, not {prefetch}")
            return
        consumer = (identity, queue)

        limit = self.config.max_message_size

        def deliver(queue: str, messages: list[Message]) -> None:
            for run in frames.chunks_by_size(messages, limit):
                self._send(identity, frames.Deliver(queue, run))

        self.host.subscribe(
            queue,
            consumer,
            deliver,
            prefetch=prefetch,
            lease_ttl=lease_ttl,
            max_attempts=max_attempts,
        )
        self._consumers.setdefault(identity, set()).add(consumer)

    def _on_request(self, identity: bytes, request: frames.Request) -> None:
        rid = request.request_id
        state, cached = self.replies.begin(rid, time.monotonic())
        if state is CacheState.DONE:
            self._send(identity, cached)  # type: ignore[arg-type]
            return
        waiting = self._running.setdefault(rid, [])
        waiting.append(identity)
        if state is CacheState.NEW:
            task = asyncio.get_running_loop().create_task(self._run_request(request))
            # One sweep timer cuts handlers at their deadlines: cheaper than a
            # timeout scope per request.
            self._deadlines[task] = time.monotonic() + max(0.0, request.timeout)
            task.add_done_callback(self._deadlines.pop)
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

    async def _run_request(self, request: frames.Request) -> None:
        rid = request.request_id
        try:
            reply = await self.services.call(request.service, request.message, timeout=None)
            answer = frames.Reply(rid, reply)
        except asyncio.CancelledError:  # its deadline passed (see _sweep)
            why = f"deadline of {request.timeout:.3f} s passed"
            answer = frames.Reply(rid, None, why, ReplyErrorKind.TIMEOUT)
        except (Timeout, DeliveryError) as exc:  # NoResponders, Rejected, Timeout
            why = exc.reason if isinstance(exc, Rejected) else str(exc)
            answer = frames.Reply(rid, None, why, reply_kind(exc))
        self.replies.finish(rid, answer, time.monotonic())
        for identity in self._running.pop(rid, []):
            self._send(identity, answer)

    # -- outgoing and liveness -----------------------------------------------

    def _send(self, identity: bytes, frame: frames.Frame) -> None:
        if self.pump is not None and not self.pump.send(frames.encode(frame), identity):
            self.peer_lost(identity)

    def announce(self) -> None:
        """Tell every live peer what this node offers now (a new service)."""
        hello = self._hello()
        for identity in self.liveness.peers():
            self._send(identity, hello)  # type: ignore[arg-type]

    def reap(self, now: float) -> None:
        for identity in self.liveness.reap(now):
            self.peer_lost(identity)  # type: ignore[arg-type]

    def peer_lost(self, identity: bytes) -> None:
        """The peer is gone: every delivery it held goes to someone else."""
        consumers: set[tuple[bytes, str]] = self._consumers.pop(identity, set())
        if consumers:
            self.peers_lost += 1
        for consumer in consumers:
            consumer_key: Hashable = consumer
            self.host.consumer_lost(consumer_key)
        self.liveness.forget(identity)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.pump is not None:
            self.pump.close()
        else:
            self.sock.close(linger=0)
