"""The conformance suite: one set of scenarios every transport must pass.

Each scenario is an async function taking a :class:`TransportSetup`. To run
the suite against your own setup::

    import pytest
    from pigeon.testing import conformance

    @pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
    def test_my_setup(scenario):
        conformance.run(scenario, conformance.BrokerSetup("nats://127.0.0.1:4222"))
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

import pigeon
from pigeon._core import headers
from pigeon._ports import quiet_port
from pigeon.message import new_id


class TransportSetup:
    """How a scenario gets connections: ``node(i)`` can host queues and serve;
    ``client(n)`` reaches nodes ``0..n-1``. Open them with ``async with``."""

    name = "abstract"
    #: Seconds after which a dead consumer's deliveries come back on this transport.
    loss_detection = 5.0

    def node(self, index: int = 0, **options: Any) -> pigeon.Connection:
        raise NotImplementedError

    def client(self, nodes: int = 1, **options: Any) -> pigeon.Connection:
        raise NotImplementedError


class MemorySetup(TransportSetup):
    name = "memory"

    def __init__(self) -> None:
        self.url = f"memory://conformance-{new_id()}"

    def node(self, index: int = 0, **options: Any) -> pigeon.Connection:
        return pigeon.connect(self.url, **options)

    def client(self, nodes: int = 1, **options: Any) -> pigeon.Connection:
        return pigeon.connect(self.url, **options)


class ZmqSetup(TransportSetup):
    """Nodes bind ``scheme`` addresses; clients connect to them."""

    def __init__(
        self, scheme: str = "tcp", base_dir: str = "/tmp", *, durable: bool = False
    ) -> None:
        self.name = f"zmq-{scheme}" + ("-durable" if durable else "")
        self.scheme = scheme
        self.base_dir = base_dir
        self.durable = durable
        self._addresses: dict[int, str] = {}

    def address(self, index: int) -> str:
        if index not in self._addresses:
            if self.scheme == "tcp":
                self._addresses[index] = f"tcp://127.0.0.1:{quiet_port()}"
            elif self.scheme == "ipc":
                path = os.path.join(self.base_dir, f"pigeon-{new_id()}.sock")
                self._addresses[index] = f"ipc://{path}"
            else:
                self._addresses[index] = f"inproc://conformance-{new_id()}"
        return self._addresses[index]

    def node(self, index: int = 0, **options: Any) -> pigeon.Connection:
        options.setdefault("heartbeat", 0.2)
        if self.durable:
            options.setdefault("store", os.path.join(self.base_dir, f"pigeon-{new_id()}.db"))
        return pigeon.connect(bind=self.address(index), **options)

    def client(self, nodes: int = 1, **options: Any) -> pigeon.Connection:
        options.setdefault("heartbeat", 0.2)
        return pigeon.connect([self.address(i) for i in range(nodes)], **options)

    loss_detection = 2.0


class BrokerSetup(TransportSetup):
    """Every connection goes to the same broker URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = url.partition("://")[0]

    def node(self, index: int = 0, **options: Any) -> pigeon.Connection:
        return pigeon.connect(self.url, **options)

    def client(self, nodes: int = 1, **options: Any) -> pigeon.Connection:
        return pigeon.connect(self.url, **options)


def run(
    scenario: Callable[[TransportSetup], Awaitable[None]],
    setup: TransportSetup,
    timeout: float = 30.0,
) -> None:
    """Run one scenario on a fresh event loop, failing on a hang."""

    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await scenario(setup)

    asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def unique(name: str) -> str:
    return f"{name}-{new_id()}"


# -- work queues -------------------------------------------------------------


async def send_consume_ack(setup: TransportSetup) -> None:
    """Every message sent is delivered once, unflagged, attempt 1, and acked."""
    queue = unique("jobs")
    got: list[pigeon.Message] = []
    async with setup.node() as host, setup.client() as client:
        worker = await client.consume(queue, lambda d: got.append(d.message), prefetch=8)
        for i in range(50):
            await host.send(queue, f"job {i}")
        await wait_until(lambda: len(got) >= 50, what="50 deliveries")
        await asyncio.sleep(0.1)
        assert sorted(m.text for m in got) == sorted(f"job {i}" for i in range(50))
        assert all(not m.redelivered and m.attempt == 1 for m in got)
        await wait_until(lambda: worker.stats()["acked"] == 50, what="50 acks")


async def send_order_single_consumer(setup: TransportSetup) -> None:
    """One producer, one consumer: messages arrive in the order sent."""
    queue = unique("fifo")
    got: list[str] = []
    async with setup.node() as host, setup.client() as client:
        for i in range(30):
            host.send_nowait(queue, str(i))
        await host.flush()
        await client.consume(queue, lambda d: got.append(d.message.text), prefetch=4)
        await wait_until(lambda: len(got) == 30, what="30 deliveries")
        assert got == [str(i) for i in range(30)]


async def retry_then_succeed(setup: TransportSetup) -> None:
    """A handler that fails twice is retried with backoff; later deliveries are flagged."""
    queue = unique("flaky")
    seen: list[tuple[int, bool]] = []

    def flaky(delivery: pigeon.Delivery) -> None:
        seen.append((delivery.message.attempt, delivery.message.redelivered))
        if len(seen) < 3:
            raise RuntimeError("not yet")

    policy = pigeon.RetryPolicy(max_attempts=5, base_delay=0.05, jitter=0.0)
    async with setup.node() as host, setup.client() as client:
        worker = await client.consume(queue, flaky, retry=policy)
        await host.send(queue, "x")
        await wait_until(lambda: worker.stats()["acked"] == 1, what="the third attempt to ack")
        assert seen == [(1, False), (2, True), (3, True)]
        assert worker.stats()["retried"] == 2


async def dead_letter_after_max_attempts(setup: TransportSetup) -> None:
    """A handler that always raises is dead-lettered after max_attempts, reason kept."""
    queue = unique("poison")
    dead: list[pigeon.Message] = []
    policy = pigeon.RetryPolicy(max_attempts=3, base_delay=0.02, jitter=0.0)

    def always_fails(delivery: pigeon.Delivery) -> None:
        raise ValueError("bad payload")

    async with setup.node() as host, setup.client() as client:
        worker = await client.consume(queue, always_fails, retry=policy)
        await client.consume(pigeon.dead_letter_queue(queue), lambda d: dead.append(d.message))
        await host.send(queue, "poison")
        await wait_until(lambda: len(dead) == 1, what="the dead letter")
        letter = dead[0]
        assert letter.text == "poison"
        assert "bad payload" in letter.headers[headers.DEAD_REASON]
        assert letter.headers[headers.ATTEMPTS] == "3"
        assert worker.stats()["dead_lettered"] == 1


async def reject_and_nack_by_hand(setup: TransportSetup) -> None:
    """reject() dead-letters at once; nack(delay) brings the message back later."""
    queue = unique("manual")
    dead: list[pigeon.Message] = []
    times: list[float] = []

    async def handler(delivery: pigeon.Delivery) -> None:
        if delivery.message.text == "reject me":
            await delivery.reject("not wanted")
            return
        times.append(time.monotonic())
        if len(times) == 1:
            await delivery.nack(delay=0.3)

    async with setup.node() as host, setup.client() as client:
        await client.consume(queue, handler)
        await client.consume(pigeon.dead_letter_queue(queue), lambda d: dead.append(d.message))
        await host.send(queue, "reject me")
        await host.send(queue, "later")
        await wait_until(lambda: len(dead) == 1 and len(times) == 2, what="reject and nack")
        assert dead[0].headers[headers.DEAD_REASON] == "not wanted"
        assert times[1] - times[0] >= 0.25


async def settle_twice_is_an_error(setup: TransportSetup) -> None:
    """Settling one delivery twice raises LocalProtocolError."""
    queue = unique("twice")
    errors: list[BaseException] = []

    async def handler(delivery: pigeon.Delivery) -> None:
        await delivery.ack()
        try:
            await delivery.ack()
        except pigeon.LocalProtocolError as exc:
            errors.append(exc)

    async with setup.node() as host, setup.client() as client:
        await client.consume(queue, handler)
        await host.send(queue, "x")
        await wait_until(lambda: len(errors) == 1, what="the second ack to fail")


async def prefetch_bounds_unsettled(setup: TransportSetup) -> None:
    """A worker never holds more than ``prefetch`` unsettled deliveries."""
    queue = unique("credit")
    holding: list[pigeon.Delivery] = []
    release = asyncio.Event()

    async def hold(delivery: pigeon.Delivery) -> None:
        holding.append(delivery)
        await release.wait()

    async with setup.node() as host, setup.client() as client:
        for i in range(20):
            host.send_nowait(queue, str(i))
        await host.flush()
        worker = await client.consume(queue, hold, prefetch=3, concurrency=3)
        await wait_until(lambda: len(holding) == 3, what="3 deliveries")
        await asyncio.sleep(0.3)
        assert len(holding) == 3
        assert worker.stats()["waiting"] == 0
        release.set()
        await wait_until(lambda: worker.stats()["acked"] == 20, what="all 20 acked")


async def redelivery_after_consumer_leaves(setup: TransportSetup) -> None:
    """Deliveries a consumer held unsettled go to another consumer, flagged."""
    queue = unique("handover")
    first: list[pigeon.Delivery] = []
    second: list[pigeon.Message] = []
    block = asyncio.Event()

    async def stuck(delivery: pigeon.Delivery) -> None:
        first.append(delivery)
        await block.wait()

    async with setup.node() as host:
        leaving = await setup.client()
        await leaving.consume(queue, stuck, prefetch=1)
        await host.send(queue, "hot potato")
        await wait_until(lambda: len(first) == 1, what="the first delivery")
        assert not first[0].message.redelivered
        await leaving.close(timeout=0.1)  # handler never settles
        async with setup.client() as client:
            await client.consume(queue, lambda d: second.append(d.message))
            await wait_until(lambda: len(second) == 1, setup.loss_detection + 5, "redelivery")
        assert second[0].text == "hot potato"
        assert second[0].redelivered and second[0].attempt >= 2


async def lease_expiry_and_extend(setup: TransportSetup) -> None:
    """An unsettled delivery comes back after lease_ttl unless extended."""
    queue = unique("lease")
    deliveries: list[pigeon.Message] = []

    async def slow(delivery: pigeon.Delivery) -> None:
        deliveries.append(delivery.message)
        if delivery.message.text == "extended":
            for _ in range(4):
                await asyncio.sleep(0.25)
                await delivery.extend()
        elif len(deliveries) == 1:
            await asyncio.sleep(1.2)  # longer than the lease: it is redelivered meanwhile

    async with setup.node() as host, setup.client() as client:
        await client.consume(queue, slow, prefetch=2, concurrency=2, lease_ttl=0.5)
        await host.send(queue, "expires")
        await wait_until(lambda: len(deliveries) >= 2, what="the redelivery after expiry")
        assert deliveries[1].redelivered and deliveries[1].text == "expires"
        await asyncio.sleep(1.0)
        before = len(deliveries)
        await host.send(queue, "extended")
        await asyncio.sleep(1.5)
        extended = [m for m in deliveries[before:] if m.text == "extended"]
        assert len(extended) == 1 and not extended[0].redelivered


# -- request-reply -----------------------------------------------------------


async def request_reply(setup: TransportSetup) -> None:
    """A request gets its server's reply; a failing handler raises Rejected."""
    async with setup.node() as server, setup.client() as client:
        await server.serve("upper", lambda m: m.text.upper())

        def fails(message: pigeon.Message) -> None:
            raise KeyError("boom")

        await server.serve("fails", fails)
        reply = await client.request("upper", "hello", timeout=5.0)
        assert reply.text == "HELLO"
        try:
            await client.request("fails", "x", timeout=5.0)
        except pigeon.Rejected as exc:
            assert "boom" in exc.reason
        else:
            raise AssertionError("a failing handler must raise Rejected")


async def load_balanced_servers(setup: TransportSetup) -> None:
    """Calls spread over the servers of one service."""
    counts = {"a": 0, "b": 0}

    def serve_as(name: str) -> Callable[[pigeon.Message], str]:
        def handle(message: pigeon.Message) -> str:
            counts[name] += 1
            return name

        return handle

    async with setup.node(0) as a, setup.node(1) as b, setup.client(2) as client:
        await a.serve("who", serve_as("a"))
        await b.serve("who", serve_as("b"))
        await asyncio.sleep(0.3)
        # Some transports pick a server at random: 40 calls make an unlucky
        # split below 8 vanishingly rare (p < 1e-4) for a fair balancer.
        replies = [(await client.request("who", "?", timeout=5.0)).text for _ in range(40)]
        assert set(replies) == {"a", "b"}, replies
        assert min(counts.values()) >= 8, counts


async def no_responders_at_once(setup: TransportSetup) -> None:
    """Without a live server, request raises NoResponders within 1 s."""
    async with setup.node(), setup.client() as client:
        started = time.monotonic()
        try:
            await client.request(unique("nobody"), "x", timeout=10.0)
        except pigeon.NoResponders:
            pass
        else:
            raise AssertionError("expected NoResponders")
        assert time.monotonic() - started < 1.0


async def deadline_is_honoured(setup: TransportSetup) -> None:
    """A call times out at its deadline and the server stops working on it."""
    finished: list[str] = []

    async def slow(message: pigeon.Message) -> str:
        await asyncio.sleep(2.0)
        finished.append(message.text)
        return "late"

    async with setup.node() as server, setup.client() as client:
        await server.serve("slow", slow)
        started = time.monotonic()
        try:
            await client.request("slow", "x", timeout=0.4)
        except pigeon.Timeout:
            pass
        else:
            raise AssertionError("expected Timeout")
        assert time.monotonic() - started < 1.4
        await asyncio.sleep(2.0)
        assert finished == [], "the server ran the handler past the deadline"


async def handler_sees_the_deadline(setup: TransportSetup) -> None:
    """A handler sees its request's absolute deadline as Message.deadline."""
    seen: list[float | None] = []

    def record(message: pigeon.Message) -> str:
        seen.append(message.deadline)
        return "ok"

    async with setup.node() as server, setup.client() as client:
        await server.serve("deadline", record)
        sent_at = time.time()
        await client.request("deadline", "x", timeout=5.0)
        assert len(seen) == 1 and seen[0] is not None, "the handler saw no deadline"
        # The caller's deadline, or earlier (a receiver trusts the earlier of
        # the absolute deadline and "received + seconds left").
        assert sent_at + 4.0 < seen[0] <= time.time() + 5.0, (seen[0], sent_at)


async def expired_messages_are_dead_lettered(setup: TransportSetup) -> None:
    """A message whose ttl passed before anyone ran it is dead-lettered
    unrun, with the reason ``expired``; one still in time runs."""
    queue = unique("ttl")
    ran: list[str] = []
    dead: list[pigeon.Message] = []
    async with setup.node() as host, setup.client() as client:
        await host.send(queue, "stale", ttl=0.2)
        await host.send(queue, "fresh", ttl=60.0)
        await asyncio.sleep(0.4)
        await client.consume(pigeon.dead_letter_queue(queue), lambda d: dead.append(d.message))
        await client.consume(queue, lambda d: ran.append(d.message.text))
        await wait_until(lambda: len(dead) == 1 and ran == ["fresh"], what="expiry")
        assert dead[0].text == "stale"
        assert dead[0].headers[headers.DEAD_REASON] == "expired"
        await asyncio.sleep(0.2)
        assert ran == ["fresh"], "the expired message ran"


# -- payloads and bad input --------------------------------------------------


class Order(msgspec.Struct):
    sku: str
    quantity: int


async def payload_codecs(setup: TransportSetup) -> None:
    """bytes, text, JSON, msgpack and typed payloads survive the trip."""
    queue = unique("codecs")
    got: list[pigeon.Message] = []
    async with setup.node() as host, setup.client() as client:
        await client.consume(queue, lambda d: got.append(d.message))
        await host.send(queue, b"\x00\xffraw")
        await host.send(queue, "text é")
        await host.send(queue, {"a": [1, 2.5, None]})
        await host.send(queue, Order("x-1", 3), content_type=pigeon.MSGPACK)
        await host.send(queue, "h", headers={"trace": "abc"})
        await wait_until(lambda: len(got) == 5, what="5 deliveries")
        by_type = {m.content_type: m for m in got}
        assert by_type[pigeon.BYTES].body == b"\x00\xffraw"
        assert by_type[pigeon.TEXT].decode() in ("text é", "h")
        assert by_type[pigeon.JSON].decode() == {"a": [1, 2.5, None]}
        assert by_type[pigeon.MSGPACK].decode(Order) == Order("x-1", 3)
        assert any(m.headers.get("trace") == "abc" for m in got)


async def large_messages(setup: TransportSetup) -> None:
    """A 512 KiB body arrives whole; one over the limit is refused at the sender."""
    queue = unique("large")
    got: list[bytes] = []
    body = os.urandom(512 * 1024)
    async with setup.node(max_message_size=1 << 20) as host, setup.client() as client:
        await client.consume(queue, lambda d: got.append(d.message.body))
        await host.send(queue, body)
        await wait_until(lambda: len(got) == 1, what="the large message")
        assert got[0] == body
        try:
            await host.send(queue, b"x" * ((1 << 20) + 1))
        except pigeon.MessageTooLarge as exc:
            assert exc.limit == 1 << 20
        else:
            raise AssertionError("expected MessageTooLarge")


async def bad_arguments(setup: TransportSetup) -> None:
    """Wrong types in the API raise TypeError, and configuration mistakes
    (bad names, options, timeouts) ConfigurationError, saying why."""
    async with setup.node() as host:
        checks: list[tuple[Callable[[], Any], type[Exception]]] = [
            (lambda: host.send_nowait(123, "x"), TypeError),  # type: ignore[arg-type]
            (lambda: host.send_nowait("", "x"), pigeon.ConfigurationError),
            (lambda: host.send_nowait("q", object()), TypeError),
            (lambda: host.send_nowait("q", "x", headers={"a": 1}), TypeError),  # type: ignore[dict-item]
        ]
        for call, error in checks:
            try:
                call()
            except error:
                pass
            else:
                raise AssertionError(f"expected {error.__name__}")
        bad_options: list[dict[str, Any]] = [{"prefetch": 0}, {"concurrency": -1}]
        for bad in bad_options:
            try:
                await host.consume("q", lambda d: None, **bad)
            except pigeon.ConfigurationError:
                pass
            else:
                raise AssertionError(f"expected ConfigurationError for {bad}")
        try:
            await host.request("svc", "x", timeout=-1)
        except pigeon.ConfigurationError:
            pass
        else:
            raise AssertionError("expected ConfigurationError for a negative timeout")


SCENARIOS = [
    send_consume_ack,
    send_order_single_consumer,
    retry_then_succeed,
    dead_letter_after_max_attempts,
    reject_and_nack_by_hand,
    settle_twice_is_an_error,
    prefetch_bounds_unsettled,
    redelivery_after_consumer_leaves,
    lease_expiry_and_extend,
    request_reply,
    load_balanced_servers,
    no_responders_at_once,
    deadline_is_honoured,
    handler_sees_the_deadline,
    expired_messages_are_dead_lettered,
    payload_codecs,
    large_messages,
    bad_arguments,
]


# -- publish-subscribe ---------------------------------------------------------
#
# The rules are those of pigeon._core.topics and pigeon.transports.topic_host.
# Every topic a scenario uses starts with a name of its own (unique()), so its
# numbers start at 1 and scenarios sharing a broker do not see each other's
# messages. subscribe() returns once the subscription is in place on every
# transport (on a broker too), so the scenarios publish right after it.

#: What a transport cannot do by design: (setup name, what) -> why. There the
#: scenario expects exactly the ConfigurationError the transport documents,
#: and checks the rest. Keep this list short: every entry is a documented
#: limit of the backend, never a bug worked around.
BY_DESIGN: dict[tuple[str, str], str] = {
    # Core NATS keeps no buffer per subscriber on the server that could hold
    # a publisher back: a subscription without a name lives in the client's
    # pending buffer, so "block" needs a durable (JetStream) subscription,
    # and subscribe(policy="block") without a name is a ConfigurationError.
    ("nats", "block without a name"): "core NATS cannot hold publishers back",
    # RabbitMQ keeps history in a stream, which it trims by bytes and age
    # (whole segments at a time), never by count: retain(max_count=) is a
    # ConfigurationError there, and the history is bounded by bytes instead.
    ("amqp", "retain by count"): "RabbitMQ streams are trimmed by bytes and age",
}


def family(setup: TransportSetup) -> str:
    """The transport behind ``setup``: over TLS or on a cluster, the same
    (``amqps`` and ``amqp-cluster`` are ``amqp``, ``tls`` is ``nats``)."""
    name = setup.name
    if name.startswith("amqp"):
        return "amqp"
    if name == "tls" or name.startswith("nats"):
        return "nats"
    return name


def by_design(setup: TransportSetup, what: str) -> bool:
    """True if ``setup``'s transport refuses ``what`` by design (BY_DESIGN)."""
    return (family(setup), what) in BY_DESIGN


def hosts_topics(setup: TransportSetup) -> bool:
    """True if pigeon's own topic host runs the topics (memory://, a ZeroMQ
    node), so its counters (``stats()["topics"]``) can be checked."""
    return setup.name == "memory" or setup.name.startswith("zmq-")


class Inbox:
    """An async subscriber handler that keeps every event it got."""

    def __init__(self, delay: float = 0.0) -> None:
        self.events: list[pigeon.Event] = []
        self.delay = delay

    async def __call__(self, event: pigeon.Event) -> None:
        assert isinstance(event, pigeon.Event), type(event)
        self.events.append(event)
        if self.delay:
            await asyncio.sleep(self.delay)  # a handler that takes a while

    async def wait(self, count: int, what: str = "") -> None:
        """Until at least ``count`` events came (bounded, as wait_until)."""
        await wait_until(lambda: len(self.events) >= count, what=f"{count} events {what}")

    def __len__(self) -> int:
        return len(self.events)

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]

    @property
    def payloads(self) -> list[Any]:
        return [e.decode() for e in self.events]

    @property
    def missed(self) -> list[int]:
        return [e.missed for e in self.events]


def topic_row(connection: pigeon.Connection, pattern: str) -> dict[str, Any]:
    """The topic host's row for the one subscription to ``pattern``."""
    rows = [
        row
        for row in connection.stats()["topics"]["subscriptions"].values()
        if row["pattern"] == pattern
    ]
    assert len(rows) == 1, rows
    return dict(rows[0])


async def pubsub_fan_out(setup: TransportSetup) -> None:
    """One publisher, three subscribers: each gets every message, in order,
    numbered 1..N in its topic, nothing missed."""
    topic = f"{unique('fan')}.news"
    n = 50
    inboxes = [Inbox() for _ in range(3)]
    async with (
        setup.node() as host,
        setup.client() as a,
        setup.client() as b,
        setup.client() as publisher,
    ):
        subscribers = [
            await conn.subscribe(topic, inbox)
            for conn, inbox in zip((host, a, b), inboxes, strict=True)
        ]
        for i in range(n):
            await publisher.publish(topic, i)
        for k, inbox in enumerate(inboxes):
            await inbox.wait(n, f"at subscriber {k}")
        for inbox, subscriber in zip(inboxes, subscribers, strict=True):
            assert inbox.seqs == list(range(1, n + 1)), inbox.seqs
            assert inbox.payloads == list(range(n))
            assert {e.topic for e in inbox.events} == {topic}
            assert inbox.missed == [0] * n
            stats = subscriber.stats()
            assert (stats["gaps"], stats["missed"], stats["repeats"]) == (0, 0, 0), stats


async def pubsub_wildcards(setup: TransportSetup) -> None:
    """``*`` matches exactly one segment, a final ``>`` one or more: ``a.>``
    does not get ``a``, and a topic that only shares a prefix matches nothing."""
    base = unique("wild")
    expected = {
        base: [base],
        f"{base}.*": [f"{base}.x", f"{base}.y"],
        f"{base}.>": [f"{base}.x", f"{base}.y", f"{base}.x.z"],
        f"{base}.*.z": [f"{base}.x.z"],
        f"{base}.x.>": [f"{base}.x.z"],
    }
    # Every topic twice, in this order: each subscription's last message is
    # published after every message of round 1 it must not get (one
    # publisher's messages reach a subscription in the order published).
    published = [base, f"{base}.x", f"{base}.y", f"{base}.x.z", f"{base}x.y"]
    inboxes = {pattern: Inbox() for pattern in expected}
    async with setup.node() as host, setup.client() as client:
        for pattern, inbox in inboxes.items():
            await client.subscribe(pattern, inbox)
        for lap in (1, 2):
            for topic in published:
                await host.publish(topic, lap)
        for pattern, inbox in inboxes.items():
            await inbox.wait(2 * len(expected[pattern]), f"on {pattern}")
        for pattern, inbox in inboxes.items():
            got = sorted((e.topic, e.seq, e.decode()) for e in inbox.events)
            assert got == sorted((t, r, r) for t in expected[pattern] for r in (1, 2)), (
                pattern,
                got,
            )


async def pubsub_drop_oldest_counts_gaps(setup: TransportSetup) -> None:
    """A subscriber that falls ``buffer`` behind loses the oldest waiting
    messages (the default policy): it sees the jumps as gaps, and every
    number published is either received or counted missed; on a topic host,
    missed equals what the host dropped."""
    topic = f"{unique('gaps')}.ticks"
    buffer, total = 4, 40
    release = asyncio.Event()
    got = Inbox()

    async def slow(event: pigeon.Event) -> None:
        await got(event)
        await release.wait()

    async with setup.node() as host, setup.client() as client:
        subscriber = await client.subscribe(topic, slow, buffer=buffer, prefetch=1)
        await host.publish(topic, 1)
        # The first must arrive: a subscriber's count starts at the first
        # number it sees (Rule 3), so what is dropped before it is no gap.
        await wait_until(lambda: len(got) == 1, what="the first event, held")
        for i in range(2, total + 1):
            await host.publish(topic, i)
        release.set()
        await wait_until(lambda: bool(got.seqs) and got.seqs[-1] == total, what="the last event")
        stats = subscriber.stats()
        assert got.seqs == sorted(set(got.seqs)), got.seqs  # in order, none twice
        assert got.payloads == got.seqs
        assert got.seqs[0] == 1
        assert len(got) + stats["missed"] == total, (got.seqs, stats)
        assert stats["missed"] == sum(got.missed) > 0, stats
        assert stats["gaps"] == sum(1 for m in got.missed if m) >= 1, stats
        if hosts_topics(setup):
            row = topic_row(host, topic)
            assert row["dropped"] == stats["missed"], (row, stats)
            assert len(got) <= 1 + buffer, got.seqs  # the one held, and the buffer


async def pubsub_block_holds_publishers(setup: TransportSetup) -> None:
    """A ``block`` subscriber with no room holds publishers back: ``publish``
    times out and ``publish_nowait`` fails with Backpressure, and neither
    publishes. Once it has drained, publishing works again; nothing is lost."""
    topic = f"{unique('block')}.orders"
    buffer = 3
    release = asyncio.Event()
    got = Inbox()

    async def slow(event: pigeon.Event) -> None:
        await got(event)
        await release.wait()

    async with setup.node() as host, setup.client() as client:
        name = None
        if by_design(setup, "block without a name"):
            try:
                await client.subscribe(topic, slow, policy="block", buffer=buffer)
            except pigeon.ConfigurationError:
                pass
            else:
                raise AssertionError(f"{setup.name}: 'block' without a name should be refused")
            name = unique("blocking")
        subscriber = await client.subscribe(
            topic, slow, name=name, policy="block", buffer=buffer, prefetch=1
        )
        confirmed: list[int] = [1]
        await host.publish(topic, 1)
        await wait_until(lambda: len(got) == 1, what="the first event, held")
        refused = False
        for i in range(2, buffer + 30):
            try:
                await host.publish(topic, i, timeout=0.3)
            except pigeon.Timeout:
                refused = True
                break
            confirmed.append(i)
        assert refused, f"{len(confirmed)} publishes went through to a full 'block' subscriber"
        if hosts_topics(setup):
            assert len(confirmed) == 1 + buffer, confirmed  # the one held, and the buffer
            assert host.stats()["topics"]["blocked"] >= 1
        try:
            await asyncio.wait_for(host.publish_nowait(topic, -1), 5.0)
        except pigeon.Backpressure:
            pass
        else:
            raise AssertionError("publish_nowait to a full 'block' subscriber went through")
        release.set()
        # Room comes back as the subscriber drains: publish waits for it.
        for i in range(1000, 1005):
            await host.publish(topic, i, timeout=10.0)
            confirmed.append(i)
        await wait_until(lambda: len(got) >= len(confirmed), what="every confirmed message")
        assert got.payloads == confirmed, got.payloads
        assert got.seqs == list(range(1, len(confirmed) + 1)), got.seqs
        stats = subscriber.stats()
        assert (stats["gaps"], stats["missed"]) == (0, 0), stats


async def pubsub_disconnect_slow_subscriber(setup: TransportSetup) -> None:
    """A ``disconnect`` subscriber that falls ``buffer`` behind is cut off and
    told (SubscriberDisconnected); the publisher and the other subscribers go
    on at full speed."""
    topic = f"{unique('cut')}.feed"
    buffer, total = 3, 40
    release = asyncio.Event()
    held = Inbox()
    fast = Inbox()

    async def stuck(event: pigeon.Event) -> None:
        await held(event)
        await release.wait()

    async with setup.node() as host, setup.client() as client, setup.client() as other:
        slow = await client.subscribe(topic, stuck, policy="disconnect", buffer=buffer, prefetch=1)
        await other.subscribe(topic, fast)
        try:
            await host.publish(topic, 0)
            await wait_until(lambda: len(held) == 1, what="the first event, held")
            longest = 0.0
            for i in range(1, total):
                started = time.monotonic()
                await host.publish(topic, i, timeout=5.0)
                longest = max(longest, time.monotonic() - started)
            # Not held back as by 'block' (that would wait for room, up to the
            # 5 s timeout); the bound leaves room for a busy machine.
            assert longest < 2.0, f"a publish took {longest:.2f} s"
            error = await asyncio.wait_for(slow.wait_disconnected(), 10.0)
        finally:
            release.set()
        assert isinstance(error, pigeon.SubscriberDisconnected)
        assert error.pattern == topic and error.reason, error
        assert slow.disconnected is error and slow.stats()["disconnected"]
        await wait_until(lambda: len(fast) >= total, what=f"{total} events at the fast one")
        assert fast.seqs == list(range(1, total + 1)) and fast.missed == [0] * total
        if hosts_topics(setup):
            topics = host.stats()["topics"]
            assert topics["disconnected"] == 1, topics
            assert [r["pattern"] for r in topics["subscriptions"].values()] == [topic]


async def pubsub_retained_replay(setup: TransportSetup) -> None:
    """A retained topic keeps its latest messages; a subscriber may start
    from the last N, from a number, from a time or from the last of each
    topic, and goes on with the live ones with no gap; a number already
    trimmed is ReplayTrimmed, naming the first one retained."""
    base = unique("retained")
    topic, other_topic = f"{base}.a", f"{base}.b"
    inboxes = {what: Inbox() for what in ("last", "from_seq", "from_time", "per_subject")}
    by_count = not by_design(setup, "retain by count")
    async with setup.node() as host, setup.client() as client:
        if by_count:
            await host.retain(f"{base}.>", max_count=5)
        else:
            try:
                await host.retain(f"{base}.>", max_count=5)
            except pigeon.ConfigurationError:
                pass
            else:
                raise AssertionError(f"{setup.name}: retain(max_count=) should be refused")
            await host.retain(f"{base}.>", max_bytes=1 << 20)  # keeps all of it
        # other_topic first, so topic's numbers are not its places in a log
        # the two share: from_seq counts a topic's own numbers (Event.seq).
        for i in range(1, 4):
            await host.publish(other_topic, i)
        for i in range(1, 6):
            await host.publish(topic, i)
        await asyncio.sleep(0.02)  # (so the clocks' readings around `mark` differ)
        mark = time.time()
        await asyncio.sleep(0.02)
        for i in range(6, 9):
            await host.publish(topic, i)
        # History is 4..8 on topic (1..8 kept by bytes), 1..3 on other_topic.
        await client.subscribe(topic, inboxes["last"], last=3)
        await client.subscribe(topic, inboxes["from_seq"], from_seq=4)
        await client.subscribe(topic, inboxes["from_time"], from_time=mark)
        await client.subscribe(f"{base}.>", inboxes["per_subject"], last_per_subject=True)
        if by_count:
            try:
                await client.subscribe(topic, Inbox(), from_seq=1)
            except pigeon.ReplayTrimmed as exc:
                assert exc.first_retained == 4, exc
                assert exc.topic == topic, exc
            else:
                raise AssertionError("from_seq=1 on a topic trimmed to 4..8: no ReplayTrimmed")
        for i in range(9, 11):
            await host.publish(topic, i)  # live, right after the history
        want = {
            "last": [6, 7, 8, 9, 10],
            "from_seq": [4, 5, 6, 7, 8, 9, 10],
            "from_time": [6, 7, 8, 9, 10],
        }
        for what, seqs in want.items():
            inbox = inboxes[what]
            await inbox.wait(len(seqs), what)
            assert inbox.seqs == seqs, (what, inbox.seqs)
            assert inbox.payloads == seqs and inbox.missed == [0] * len(seqs), what
        per_subject = inboxes["per_subject"]
        await wait_until(lambda: len(per_subject) >= 4, what="the last of each, then live")
        got = [(e.topic, e.seq) for e in per_subject.events]
        assert sorted(got[:2]) == [(topic, 8), (other_topic, 3)], got
        assert got[2:] == [(topic, 9), (topic, 10)], got
        assert per_subject.missed == [0] * 4


async def pubsub_durable_resume(setup: TransportSetup) -> None:
    """A named subscription keeps its place while no subscriber runs: the
    next subscriber with that name gets exactly what was published while it
    was away, and none of what was acked before."""
    topic = f"{unique('resume')}.events"
    name = unique("resume")
    first, second = Inbox(), Inbox()
    async with setup.node() as host:
        async with setup.client() as client:
            subscriber = await client.subscribe(topic, first, name=name, prefetch=4)
            for i in range(1, 6):
                await host.publish(topic, i)
            await wait_until(lambda: subscriber.stats()["acked"] == 5, what="5 acks")
        for i in range(6, 11):
            await host.publish(topic, i)  # while nobody runs on it
        async with setup.client() as client:
            await client.subscribe(topic, second, name=name)
            await wait_until(lambda: len(second) >= 5, what="the 5 published while away")
            await host.publish(topic, 11)
            await wait_until(lambda: 11 in second.seqs, what="a live one after them")
        assert first.seqs == [1, 2, 3, 4, 5], first.seqs
        assert second.seqs == list(range(6, 12)), second.seqs
        assert second.missed == [0] * 6


async def pubsub_durable_shared(setup: TransportSetup) -> None:
    """Subscribers with the same name share one subscription: together they
    get every message exactly once, and each gets some."""
    topic = f"{unique('share')}.jobs"
    name = unique("share")
    total = 40
    a, b = Inbox(delay=0.005), Inbox(delay=0.005)
    async with setup.node() as host, setup.client() as c1, setup.client() as c2:
        await c1.subscribe(topic, a, name=name, prefetch=1)
        await c2.subscribe(topic, b, name=name, prefetch=1)
        for i in range(1, total + 1):
            await host.publish(topic, i)
        await wait_until(lambda: len(a) + len(b) >= total, what=f"{total} events between two")
        await host.publish(topic, total + 1)
        await wait_until(lambda: len(a) + len(b) >= total + 1, what="one more")
        assert sorted(a.seqs + b.seqs) == list(range(1, total + 2)), (a.seqs, b.seqs)
        assert a.seqs and b.seqs, "one subscriber got everything"


async def pubsub_failing_handler_dead_letters(setup: TransportSetup) -> None:
    """A subscriber's handler that raises is retried per its RetryPolicy,
    then dead-lettered; its redeliveries are repeats, not gaps, and another
    subscriber of the topic is not held up meanwhile."""
    topic = f"{unique('poison')}.events"
    # Attempts at 0, 1 and 3 s: the healthy subscriber has long finished.
    policy = pigeon.RetryPolicy(max_attempts=3, base_delay=1.0, jitter=0.0)
    attempts: list[tuple[int, bool, int]] = []
    fine: list[int] = []

    async def poisoned(event: pigeon.Event) -> None:
        if event.decode() == "poison":
            attempts.append((event.message.attempt, event.message.redelivered, event.seq))
            raise ValueError("bad payload")
        fine.append(event.seq)

    healthy = Inbox()
    async with setup.node() as host, setup.client() as client, setup.client() as other:
        failing = await client.subscribe(topic, poisoned, retry=policy)
        await other.subscribe(topic, healthy)
        await host.publish(topic, "poison")
        for i in range(10):
            await host.publish(topic, i)
        await wait_until(lambda: len(healthy) >= 11, what="11 events at the healthy one")
        assert failing.stats()["dead_lettered"] == 0, "the healthy one waited for the retries"
        assert healthy.seqs == list(range(1, 12)) and healthy.missed == [0] * 11
        await wait_until(lambda: failing.stats()["dead_lettered"] == 1, what="the dead letter")
        assert attempts == [(1, False, 1), (2, True, 1), (3, True, 1)], attempts
        assert fine == list(range(2, 12)), fine  # not held up by the retries either
        stats = failing.stats()
        assert (stats["retried"], stats["acked"]) == (2, 10), stats
        assert (stats["gaps"], stats["missed"], stats["repeats"]) == (0, 0, 2), stats


async def pubsub_request_all(setup: TransportSetup) -> None:
    """request_all asks every live server: 2 servers give 2 replies; with
    none it raises NoResponders at once; wanting more replies than there are
    servers raises Timeout."""
    service = unique("census")
    async with setup.node(0) as a, setup.node(1) as b, setup.client(2) as client:
        await a.serve(service, lambda m: "a")
        await b.serve(service, lambda m: "b")
        # A client learns of servers as they announce themselves: ask until
        # both are known (bounded), then they must stay known.
        replies: list[pigeon.Message] = []
        deadline = time.monotonic() + 5.0
        while len(replies) < 2 and time.monotonic() < deadline:
            replies = await client.request_all(service, "who?", timeout=1.0)
        assert sorted(r.text for r in replies) == ["a", "b"], [r.text for r in replies]
        replies = await client.request_all(service, "who?", timeout=2.0, min_replies=2)
        assert sorted(r.text for r in replies) == ["a", "b"]

        started = time.monotonic()
        try:
            await client.request_all(unique("nobody"), "x", timeout=10.0)
        except pigeon.NoResponders:
            pass
        else:
            raise AssertionError("expected NoResponders")
        assert time.monotonic() - started < 1.0

        started = time.monotonic()
        try:
            await client.request_all(service, "x", timeout=0.5, min_replies=3)
        except pigeon.Timeout:
            pass
        else:
            raise AssertionError("3 replies wanted from 2 servers: expected Timeout")
        assert time.monotonic() - started < 3.0


PUBSUB_SCENARIOS = [
    pubsub_fan_out,
    pubsub_wildcards,
    pubsub_drop_oldest_counts_gaps,
    pubsub_block_holds_publishers,
    pubsub_disconnect_slow_subscriber,
    pubsub_retained_replay,
    pubsub_durable_resume,
    pubsub_durable_shared,
    pubsub_failing_handler_dead_letters,
    pubsub_request_all,
]

SCENARIOS += PUBSUB_SCENARIOS
