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
