"""The serving side of a node: a ROUTER socket on the node's bind addresses.

Peers connect here to send into the queues this node hosts, to consume them,
and to call the services it serves. Garbage from a peer is counted and
dropped, and that peer gets an ``Error`` frame; everyone else is served on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

import msgspec
import zmq

from ..._core import foreign, frames
from ..._core.acl import Acl, Verb
from ..._core.budget import MAX_PEER_STORING, MAX_PEER_STORING_BYTES, PeerBudget
from ..._core.foreign import Foreign, ForeignTally
from ..._core.limits import MAX_FRAME_ITEMS, MAX_QUEUES_PER_PEER, MAX_SERVICES, message_size
from ..._core.liveness import Liveness
from ..._core.policy import PUBLISH_PREFIX, RefusalReason, ReplyErrorKind, as_received
from ...errors import Backpressure, ProtocolError, RemoteProtocolError, StoreError
from ...message import Message
from ..host import QueueHost
from ..local import LocalServices
from ..topic_host import TopicHost
from .config import NodeConfig
from .monitor import HandshakeWatch
from .pump import Pump
from .relay import Relay
from .responder import Responder
from .security import CurveServer, Guard, service_verb
from .topic_side import RouterTopics

log = logging.getLogger("pigeon")

Refusal = tuple[str, RefusalReason, str]
ROUTER_HWM = 1000  # frames queued for one peer
# Frames read ahead from one peer: libzmq stops reading its connection past
# this, so a peer that sends faster than the node handles waits on TCP, and
# at most this many frames of up to 2 x max_message_size are buffered for it.
ROUTER_RCVHWM = 32


class RouterSide:
    """Answers peers on a node's bind addresses, for its ``host`` of queues
    and its ``services``. With ``curve`` and ``acl``, every peer is known by
    its key and every frame it sends is checked against the ACL."""

    def __init__(
        self,
        config: NodeConfig,
        context: zmq.Context[zmq.Socket[bytes]],
        *,
        hello: Callable[[], frames.Hello],
        host: QueueHost,
        services: LocalServices,
        curve: CurveServer | None = None,
        acl: Acl | None = None,
        topics: TopicHost | None = None,
    ) -> None:
        self.config = config
        self._hello = hello
        self.host = host
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if curve is None:
            # A peer that reconnects with the same id takes over its old pipe.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        else:
            # No handover between keys: a second connection under a live
            # peer's id is turned away by libzmq and gets nothing it holds.
            curve.apply(sock)
        config.tune(sock)
        # Per-peer bounds: a peer that stops reading is given up (its
        # leases go back) once its pipe holds ROUTER_HWM frames, and libzmq
        # reads fairly from peers' pipes of at most ROUTER_RCVHWM frames each.
        sock.setsockopt(zmq.SNDHWM, ROUTER_HWM)
        sock.setsockopt(zmq.RCVHWM, ROUTER_RCVHWM)
        self.sock = sock
        self.guard = Guard(acl) if acl is not None else None
        self.topics = RouterTopics(topics, self._send, self.guard) if topics is not None else None
        self.liveness = Liveness(interval=config.heartbeat, misses=config.heartbeat_misses)
        # Servers connected here serve through this node (Majordomo).
        self.relay = Relay(self._send, attempt_timeout=None)
        self.responder = Responder(services, self._send, relay=self.relay)
        self._consumers: dict[bytes, set[tuple[bytes, str]]] = {}
        self._background: set[asyncio.Future[None]] = set()
        self.protocol_errors = 0
        self.stale_settles = 0  # settled ids peers held no lease on
        self._frame_size = 0  # bytes of the frame being handled
        # Messages each peer has waiting for the store (see _core.budget).
        self.storing = PeerBudget(MAX_PEER_STORING, MAX_PEER_STORING_BYTES)
        self.peers_lost = 0
        self.foreign = ForeignTally()
        self.pump: Pump | None = None
        self._handshakes: HandshakeWatch | None = None
        self._drops = 0

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
            on_user_frame=self._on_user_frame if self.guard is not None else None,
            on_multipart=self._on_multipart,
        )
        self._handshakes = HandshakeWatch(self.sock, on_dropped=self._dropped_in_handshake)

    # -- foreign peers (docs/protocol.md, "Strangers") -----------------------

    def _foreign(self, peer: Hashable, address: str, kind: Foreign) -> None:
        if self.foreign.seen(peer, address, kind):
            log.warning("a peer at %s does not speak pigeon: %s", address or "?", kind.value)

    def _on_multipart(self, identity: bytes, parts: list[bytes], address: str) -> None:
        kind = foreign.classify(parts)
        self._foreign(identity, address, kind)
        if kind is Foreign.REQ and self.pump is not None:
            # A REQ reads [empty, body] as its reply: answered, it does not hang.
            self.pump.send_parts(identity, [b"", foreign.REFUSAL])

    def _dropped_in_handshake(self, where: str) -> None:
        # Nothing names such a peer (it never got a routing id): each drop
        # counts as one.
        self._drops += 1
        self._foreign(("handshake", self._drops), where, Foreign.HANDSHAKE)

    # -- incoming --------------------------------------------------------

    def _on_user_frame(self, identity: bytes, data: bytes, user: str) -> None:
        assert self.guard is not None
        if not self.guard.claim(identity, user):
            self._refuse_peer(identity, "this routing id belongs to another key")
            return
        self._on_frame(identity, data, user)

    def _on_frame(self, identity: bytes | None, data: bytes, user: str = "") -> None:
        assert identity is not None
        try:
            received = frames.decode_all(data)
        except RemoteProtocolError as exc:
            if not self.liveness.knows(identity):
                # Its first frame, and not pigeon: a foreign peer (a raw
                # DEALER, a PAIR...), told in an Error frame what this is.
                # (The fast path reads no metadata: the routing id names it.)
                self._foreign(identity, f"routing id {identity!r}", Foreign.NOT_PIGEON)
                self._refuse_peer(identity, f"{exc}; {foreign.REFUSAL.decode()}")
                return
            self._refuse_peer(identity, str(exc))
            return
        # No message of a frame can be larger than the frame: a small frame
        # spares _on_send sizing each message against the limit.
        self._frame_size = len(data)
        # A Hello says the interval its sender beats at (Liveness Rule 3).
        hello = next((f for f in received if isinstance(f, frames.Hello)), None)
        interval = hello.heartbeat if hello is not None else None
        if self.liveness.heard(identity, time.monotonic(), interval=interval):
            # A peer we did not know (or had given up on, its consumers
            # dropped): tell it so, and it registers what it needs again.
            self._send(identity, msgspec.structs.replace(self.hello(), knows_you=False))
        for frame in received:
            try:
                self._dispatch(identity, frame, user)
            except ProtocolError as exc:
                # e.g. a Consume with a lease_ttl of NaN: the core refused it.
                self._refuse_peer(identity, str(exc))

    def _dispatch(self, identity: bytes, frame: frames.Frame, user: str) -> None:
        host = self.host
        guard = self.guard
        match frame:
            case frames.Send(queue, messages) if self.topics is not None and queue.startswith(
                PUBLISH_PREFIX
            ):
                self.topics.publish(identity, user, queue, messages)
            case frames.Subscribe() if self.topics is not None:
                self.topics.subscribe(identity, user, frame)
            case frames.Send(queue, messages):
                if guard is not None and not guard.allows(user, Verb.SEND, queue):
                    denied = [(m.id, RefusalReason.FORBIDDEN, queue) for m in messages]
                    self._send(identity, frames.Refuse(denied))
                    return
                self._on_send(identity, queue, messages)
            case frames.Settle(queue) if guard is not None and not guard.allows(
                user, Verb.CONSUME, queue
            ):
                self._send(identity, frames.Verdict(Verb.CONSUME.value, queue, False))
            case frames.Settle(queue, acks, nacks, rejects, extends):
                stale = host.settle(
                    queue,
                    (identity, queue),
                    acks=acks,
                    nacks=nacks,
                    rejects=rejects,
                    extends=extends,
                )
                if stale:
                    self._stale(identity, queue, stale)
            case frames.Hello(services=offered):
                self._send(identity, self.hello())
                if offered or identity in self.relay.peers:
                    self._heard_services(identity, offered, user)
            case frames.Reply():
                self.relay.on_reply(identity, frame)
            case frames.Consume(queue, prefetch, lease_ttl):
                # The worker's max_attempts is its own business: the host's
                # limit is the host's (QueuePolicy), whatever a peer asks.
                verdict = frames.Verdict(Verb.CONSUME.value, queue, False)
                held = self._consumers.get(identity, ())
                if len(held) >= MAX_QUEUES_PER_PEER and (identity, queue) not in held:
                    # One peer may not take the whole queue table for itself.
                    why = f"a peer consumes at most {MAX_QUEUES_PER_PEER} queues"
                    verdict = frames.Verdict(Verb.CONSUME.value, queue, False, reason=why)
                elif self.topics is not None and (
                    refusal := self.topics.consume_refusal(identity, user, queue)
                ):
                    verdict = refusal
                elif guard is None or guard.allows(user, Verb.CONSUME, self._grant_name(queue)):
                    try:
                        granted = self._on_consume(identity, queue, prefetch, lease_ttl)
                        verdict = frames.Verdict(Verb.CONSUME.value, queue, True, *granted)
                    except Backpressure as exc:  # the node's queue cap
                        verdict = frames.Verdict(Verb.CONSUME.value, queue, False, reason=str(exc))
                self._send(identity, verdict)
            case frames.Cancel(queue, keep_leases=True):
                host.drain(queue, (identity, queue))
            case frames.Cancel(queue):
                host.unsubscribe(queue, (identity, queue))
                self._consumers.get(identity, set()).discard((identity, queue))
                if self.topics is not None:
                    self.topics.left(queue, (identity, queue), lost=False)
            case frames.Request(rid, service) if guard is not None and not guard.allows(
                user, service_verb(service), service
            ):
                self._send(identity, frames.Reply(rid, None, "", ReplyErrorKind.FORBIDDEN))
            case frames.Request():
                self.responder.on_request(identity, frame)
            case _:
                self._refuse_peer(identity, f"unexpected frame {type(frame).__name__} from a peer")

    def _stale(self, identity: bytes, queue: str, ids: list[str]) -> None:
        # Settles for leases this peer does not hold change nothing (a lease
        # that expired, a host that restarted, an id it never had): counted,
        # and the peer is told which, so it does not take them for done.
        self.stale_settles += len(ids)
        why = "settles for deliveries this peer holds no lease on (expired, settled, or unknown)"
        self._send(identity, frames.Error(why, queue, ids[:MAX_FRAME_ITEMS]))

    def _refuse_peer(self, identity: bytes, reason: str) -> None:
        # ZeroMQ gives a ROUTER no way to hang up on one peer; we answer with
        # an Error frame and keep serving everyone else.
        self.protocol_errors += 1
        self._send(identity, frames.Error(reason))

    def _on_send(self, identity: bytes, queue: str, messages: list[Message]) -> None:
        limit = self.config.max_message_size
        refused: list[Refusal] = []
        if self._frame_size > limit:
            sizes = [message_size(m.body, m.headers) for m in messages]
            refused = [
                (m.id, RefusalReason.TOO_LARGE, f"{size} > {limit} bytes")
                for m, size in zip(messages, sizes, strict=True)
                if size > limit
            ]
            messages = [m for m, size in zip(messages, sizes, strict=True) if size <= limit]
        as_received(messages)
        host = self.host
        if host.committer is None:
            self._answer_send(identity, queue, messages, host.put_batch(queue, messages), refused)
            return
        # Durable: confirm only after the group commit is on disk. What a
        # peer has waiting for the store is bounded (its producer backs off).
        size = sum(message_size(m.body, m.headers) for m in messages)
        if messages and not self.storing.take(identity, len(messages), size):
            busy = f"this peer has {self.storing.held(identity)[0]} messages being stored here"
            refused += [(m.id, RefusalReason.FULL, busy) for m in messages]
            self._answer_send(identity, queue, [], [], refused)
            return
        task = asyncio.ensure_future(
            self._store_then_answer(identity, queue, messages, refused, size)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_then_answer(
        self,
        identity: bytes,
        queue: str,
        messages: list[Message],
        refused: list[Refusal],
        size: int,
    ) -> None:
        results: list[bool | None]
        count = len(messages)
        try:
            results = await self.host.put_many(queue, messages)
        except StoreError as exc:
            detail = str(exc)
            refused = refused + [(m.id, RefusalReason.STORE_FAILED, detail) for m in messages]
            messages, results = [], []
        finally:
            self.storing.give(identity, count, size)
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
        self, identity: bytes, queue: str, prefetch: int, lease_ttl: float
    ) -> tuple[int, float]:
        consumer = (identity, queue)

        limit = self.config.max_message_size

        def deliver(queue: str, messages: list[Message]) -> None:
            for run in frames.chunks_by_size(messages, limit):
                self._send(identity, frames.Deliver(queue, run))

        granted = self.host.subscribe(
            queue, consumer, deliver, prefetch=prefetch, lease_ttl=lease_ttl
        )
        self._consumers.setdefault(identity, set()).add(consumer)
        if self.topics is not None:
            self.topics.consumed(queue, consumer)
        return granted

    def _grant_name(self, queue: str) -> str:
        return self.topics.grant_name(queue) if self.topics is not None else queue

    # -- outgoing and liveness -----------------------------------------------

    def _send(self, identity: bytes, frame: frames.Frame) -> None:
        if self.pump is not None and not self.pump.send(frames.encode(frame), identity):
            self.peer_lost(identity)

    def hello(self) -> frames.Hello:
        """This node's Hello to its peers: what it serves, and what servers
        connected to it serve through it."""
        hello = self._hello()
        relayed = self.relay.services()
        if not relayed:
            return hello
        offered = sorted(set(hello.services) | relayed)[:MAX_SERVICES]
        return msgspec.structs.replace(hello, services=offered)

    def _heard_services(self, identity: bytes, offered: list[str], user: str) -> None:
        guard = self.guard

        def allowed(service: str) -> bool:
            return guard is None or guard.allows(user, Verb.SERVE, service)

        if self.relay.advertised(identity, offered, allowed):
            self.announce()

    def announce(self) -> None:
        """Tell every live peer what this node offers now (a new service)."""
        hello = self.hello()
        for identity in self.liveness.peers():
            self._send(identity, hello)  # type: ignore[arg-type]

    def reap(self, now: float) -> None:
        for identity in self.liveness.reap(now):
            self.peer_lost(identity)  # type: ignore[arg-type]
        if self.topics is not None:
            self.topics.topics.expire_orphans()

    def peer_lost(self, identity: bytes) -> None:
        """The peer is gone: every delivery it held goes to someone else."""
        consumers: set[tuple[bytes, str]] = self._consumers.pop(identity, set())
        if consumers:
            self.peers_lost += 1
        for consumer in consumers:
            consumer_key: Hashable = consumer
            self.host.consumer_lost(consumer_key)
            if self.topics is not None:
                self.topics.left(consumer[1], consumer_key, lost=True)
        if self.topics is not None:
            self.topics.peer_lost(identity)
        self.liveness.forget(identity)
        if self.guard is not None:
            self.guard.forget(identity)
        if self.relay.forget(identity):
            self.announce()

    def reload(self, acl: Acl) -> int:
        """Check every peer against a new ACL from now on. A consumer whose
        grant is gone stops getting deliveries (its leases go back to the
        queue) and is told so; returns how many were stopped."""
        guard = self.guard
        if guard is None:
            return 0
        guard.acl = acl
        stopped = 0
        for identity, consumers in self._consumers.items():
            user = guard.owners.get(identity, "")
            for consumer in list(consumers):
                queue = consumer[1]
                if not acl.allows(user, Verb.CONSUME, self._grant_name(queue)):
                    self.host.consumer_lost(consumer)
                    consumers.discard(consumer)
                    self._send(identity, frames.Verdict(Verb.CONSUME.value, queue, False))
                    stopped += 1
        return stopped

    def close(self) -> None:
        if self._handshakes is not None:
            self._handshakes.close()
        self.responder.close()
        self.relay.close()
        if self.topics is not None:
            self.topics.close()
        if self.pump is not None:
            self.pump.close()
        else:
            self.sock.close(linger=0)
