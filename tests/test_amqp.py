"""The amqp:// transport against a real RabbitMQ: the conformance suite,
reconnects through a TCP proxy that is cut and restored, and interop with a
plain aio-pika client. Queues made by a test are deleted after it."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import brokers
import pytest

import pigeon
from pigeon.errors import ConfigurationError, TransportError
from pigeon.testing import conformance

aio_pika = pytest.importorskip("aio_pika")

HOST, PORT = "127.0.0.1", 5672
URL = os.environ.get("PIGEON_AMQP_URL", f"amqp://guest:guest@{HOST}:{PORT}/")

pytestmark = pytest.mark.broker


# Per test: a broker that gets stuck mid-module fails the rest at once (brokers.require).
@pytest.fixture(autouse=True)
def broker() -> None:
    brokers.require(URL)


async def _delete_queues(names: set[str]) -> None:
    if not names:
        return
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in sorted(names):
            await channel.queue_delete(name)


class TrackingSetup(conformance.BrokerSetup):
    """A BrokerSetup that remembers the connections it made, so the queues
    they declared can be deleted after the scenario."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.connections: list[pigeon.Connection] = []

    def node(self, index: int = 0, **options: Any) -> pigeon.Connection:
        connection = super().node(index, **options)
        self.connections.append(connection)
        return connection

    def client(self, nodes: int = 1, **options: Any) -> pigeon.Connection:
        connection = super().client(nodes, **options)
        self.connections.append(connection)
        return connection

    def declared(self) -> set[str]:
        return {name for c in self.connections for name in c.transport.stats()["declared"]}


@pytest.fixture
def cleanup() -> Iterator[set[str]]:
    """Queue names to delete after the test."""
    names: set[str] = set()
    yield names
    asyncio.run(_delete_queues(names))


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
def test_conformance(scenario, cleanup: set[str]) -> None:
    setup = TrackingSetup(URL)
    try:
        conformance.run(scenario, setup, timeout=25.0)
    finally:
        cleanup.update(setup.declared())


class ClassicSetup(TrackingSetup):
    """Work queues as classic queues (attempts then come from pigeon's own
    header and the broker's redelivered flag)."""

    def node(self, index: int = 0, **options: Any) -> pigeon.Connection:
        return super().node(index, queue_type="classic", **options)

    def client(self, nodes: int = 1, **options: Any) -> pigeon.Connection:
        return super().client(nodes, queue_type="classic", **options)


@pytest.mark.parametrize(
    "scenario",
    [
        conformance.send_consume_ack,
        conformance.retry_then_succeed,
        conformance.dead_letter_after_max_attempts,
        conformance.redelivery_after_consumer_leaves,
    ],
    ids=lambda s: s.__name__,
)
def test_classic_queues(scenario, cleanup: set[str]) -> None:
    setup = ClassicSetup(URL)
    try:
        conformance.run(scenario, setup, timeout=25.0)
    finally:
        cleanup.update(setup.declared())


# -- a TCP proxy whose connections the test can cut --------------------------


class Proxy:
    """Forwards a loopback port to the broker; ``cut`` drops every
    connection and stops listening, ``restore`` listens again."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, PORT)
        except OSError:
            writer.transport.abort()
            return
        for w in (writer, up_writer):
            self._transports.add(w.transport)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = loop.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            dst.transport.abort()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        await asyncio.sleep(0)

    async def close(self) -> None:
        await self.cut()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def test_reconnect_through_cut_connection(cleanup: set[str]) -> None:
    """Cut every connection mid-stream, restore it: every confirmed send is
    delivered, consumers and servers come back by themselves, and a message
    delivered twice is flagged at least the second time."""
    queue = conformance.unique("outage")
    cleanup.update({queue, pigeon.dead_letter_queue(queue)})
    total = 300

    async def scenario() -> None:
        proxy = Proxy()
        await proxy.start()
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        got: list[pigeon.Message] = []
        try:
            async with (
                pigeon.connect(url, reconnect_interval=0.2) as producer,
                pigeon.connect(url, reconnect_interval=0.2) as consumer,
            ):
                await consumer.consume(queue, lambda d: got.append(d.message), prefetch=16)
                await consumer.serve("outage-echo", lambda m: m.text)
                futures = []
                for i in range(total):
                    futures.append(producer.send_nowait(queue, str(i)))
                    if i == total // 3:
                        await proxy.cut()
                    if i == total // 2:
                        await proxy.start()  # same port
                    await asyncio.sleep(0.002)
                await producer.flush(timeout=15.0)
                errors = [f.exception() for f in futures if f.exception() is not None]
                assert errors == []
                await conformance.wait_until(
                    lambda: {m.text for m in got} >= {str(i) for i in range(total)},
                    15.0,
                    "every confirmed message delivered",
                )
                # Each message was delivered unflagged at most once.
                unflagged = [m.text for m in got if not m.redelivered]
                assert len(unflagged) == len(set(unflagged))
                assert producer.stats()["reconnects"] >= 1
                assert consumer.stats()["reconnects"] >= 1
                reply = await producer.request("outage-echo", "still here", timeout=5.0)
                assert reply.text == "still here"
        finally:
            await proxy.close()

    conformance.run(scenario_wrapper(scenario), conformance.BrokerSetup(URL), timeout=28.0)


def scenario_wrapper(body: Any) -> Any:
    async def run(_setup: conformance.TransportSetup) -> None:
        await body()

    return run


def test_sends_during_outage_wait_for_the_broker(cleanup: set[str]) -> None:
    """A send made while the broker is unreachable is confirmed once the
    connection is back; at close it fails with TransportError, never silently."""
    queue = conformance.unique("offline")
    cleanup.update({queue, pigeon.dead_letter_queue(queue)})

    async def body() -> None:
        proxy = Proxy()
        await proxy.start()
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        try:
            conn = await pigeon.connect(url, reconnect_interval=0.2)
            await conn.send(queue, "before")
            await proxy.cut()
            pending = conn.send_nowait(queue, "during")
            await asyncio.sleep(0.5)
            assert not pending.done()
            await proxy.start()
            await asyncio.wait_for(pending, 10.0)
            await proxy.cut()
            lost = conn.send_nowait(queue, "never confirmed")
            await conn.close(timeout=0.3)
            assert isinstance(lost.exception(), TransportError)
            assert conn.stats()["unconfirmed_at_close"] == 1
        finally:
            await proxy.close()

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL), timeout=25.0)


# -- interop with a plain aio-pika client -------------------------------------


def test_plain_client_publishes_pigeon_consumes(cleanup: set[str]) -> None:
    queue = conformance.unique("interop-in")
    cleanup.update({queue, pigeon.dead_letter_queue(queue)})

    async def body() -> None:
        got: list[pigeon.Message] = []
        async with pigeon.connect(URL) as conn:
            await conn.consume(queue, lambda d: got.append(d.message))
            plain = await aio_pika.connect(URL)
            async with plain:
                channel = await plain.channel()
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        b'{"n": 1}',
                        content_type=pigeon.JSON,
                        message_id="plain-1",
                        headers={"trace": "t-1", "count": 3},
                        timestamp=1_700_000_000,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                )
            await conformance.wait_until(lambda: len(got) == 1, what="the plain message")
        message = got[0]
        assert message.id == "plain-1"
        assert message.decode() == {"n": 1}
        assert message.headers == {"trace": "t-1", "count": "3"}
        assert message.created_at == 1_700_000_000
        assert message.attempt == 1 and not message.redelivered

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL))


def test_pigeon_publishes_plain_client_consumes(cleanup: set[str]) -> None:
    queue = conformance.unique("interop-out")
    cleanup.update({queue, pigeon.dead_letter_queue(queue)})

    async def body() -> None:
        async with pigeon.connect(URL) as conn:
            await conn.send(queue, {"n": 2}, headers={"trace": "t-2"}, message_id="pigeon-1")
        plain = await aio_pika.connect(URL)
        async with plain:
            channel = await plain.channel()
            # The documented declaration arguments of a pigeon work queue.
            amqp_queue = await channel.declare_queue(
                queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue + ".dead",
                },
            )
            incoming = await amqp_queue.get(timeout=5.0)
            await incoming.ack()
        assert incoming.message_id == "pigeon-1"
        assert incoming.content_type == pigeon.JSON
        assert incoming.body == b'{"n":2}'
        assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert incoming.headers["trace"] == "t-2"
        created = float(incoming.headers["x-pigeon-created-at"])
        assert abs(created - time.time()) < 60
        assert incoming.timestamp is not None
        assert int(incoming.timestamp.timestamp()) == int(created)

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL))


def test_plain_client_calls_pigeon_server() -> None:
    """A plain client calls a pigeon service with direct reply-to."""

    async def body() -> None:
        service = conformance.unique("plain-rpc")
        async with pigeon.connect(URL) as conn:
            await conn.serve(service, lambda m: m.text[::-1])
            plain = await aio_pika.connect(URL)
            async with plain:
                channel = await plain.channel()
                replies: asyncio.Queue[Any] = asyncio.Queue()
                reply_queue = await channel.declare_queue("amq.rabbitmq.reply-to", passive=True)
                await reply_queue.consume(replies.put, no_ack=True)
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        b"abc",
                        content_type=pigeon.TEXT,
                        correlation_id="c-1",
                        reply_to="amq.rabbitmq.reply-to",
                    ),
                    routing_key="pigeon.svc." + service,
                )
                reply = await asyncio.wait_for(replies.get(), 5.0)
        assert reply.correlation_id == "c-1" and reply.body == b"cba"

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL))


# -- limits, options and errors ----------------------------------------------


def test_host_side_attempt_limit(cleanup: set[str]) -> None:
    """A message whose workers keep dying on it is dead-lettered once it
    has been delivered max_attempts times."""
    queue = conformance.unique("dying")
    cleanup.update({queue, pigeon.dead_letter_queue(queue)})
    policy = pigeon.RetryPolicy(max_attempts=2)

    async def body() -> None:
        async with pigeon.connect(URL) as producer:
            await producer.send(queue, "fatal")
            for _ in range(2):
                held: list[pigeon.Delivery] = []

                async def hold(d: pigeon.Delivery, held: list[pigeon.Delivery] = held) -> None:
                    held.append(d)
                    await asyncio.Event().wait()

                dying = await pigeon.connect(URL)
                await dying.consume(queue, hold, retry=policy)
                await conformance.wait_until(lambda held=held: len(held) == 1, what="a delivery")
                # Die: the channels go without settling (the broker requeues,
                # counting a delivery); the worker's own nack is then stale.
                await dying.transport.close(timeout=0.05)
                await dying.close(timeout=0.05)
            dead: list[pigeon.Message] = []
            survivor = await producer.consume(queue, lambda d: None, retry=policy)
            await producer.consume(
                pigeon.dead_letter_queue(queue), lambda d: dead.append(d.message)
            )
            await conformance.wait_until(lambda: len(dead) == 1, what="the dead letter")
            assert dead[0].headers["x-pigeon-attempts"] == "2"
            assert "delivered 2 times" in dead[0].headers["x-pigeon-dead-reason"]
            assert dead[0].redelivered
            assert survivor.stats()["received"] == 0

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL))


def test_workers_starting_at_once_on_a_new_queue_all_consume(cleanup: set[str]) -> None:
    """Four connections consume a queue none of them declared before, all at
    once, ten times over. RabbitMQ 3.10 crashes a consume that reaches a new
    quorum queue before its process runs, closing that whole connection
    (without the restart, about one round in four failed with
    ``ConnectionInternalError``); each consume is tried again after the
    reconnect, and every worker then gets messages."""
    rounds, workers = 10, 4

    async def body() -> None:
        connections = [await pigeon.connect(URL).__aenter__() for _ in range(workers)]
        try:
            for _ in range(rounds):
                queue = conformance.unique("at-once")
                cleanup.update({queue, pigeon.dead_letter_queue(queue)})
                got: list[int] = []

                async def take(d: pigeon.Delivery, got: list[int] = got) -> None:
                    got.append(d.message.attempt)
                    await d.ack()

                subs = await asyncio.gather(*(c.consume(queue, take) for c in connections))
                for n in range(workers):
                    await connections[0].send(queue, n)
                await conformance.wait_until(lambda got=got: len(got) == workers, what="each send")
                for sub in subs:
                    await sub.close()
            restarts = sum(c.transport.stats().get("consume_restarts", 0) for c in connections)
            print(f"consume_restarts {restarts} in {rounds} rounds")
        finally:
            for connection in connections:
                await connection.close()

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL), timeout=120.0)


def test_options_it_cannot_honour() -> None:
    for options in (
        {"max_length": 10},
        {"bogus": 1},
        {"address": "amqp://elsewhere/"},
        {"queue_type": "stream"},
        {"max_message_size": 0},
        {"outbox_limit": True},
        {"connect_timeout": float("nan")},
        {"reconnect_interval": "1"},
        {"heartbeat": "x"},
        {"heartbeat": -1},
    ):
        with pytest.raises(ConfigurationError):
            pigeon.connect(URL, **options)
    for url in ("amqp://guest:guest@127.0.0.1:port/", "amqp://guest:guest@127.0.0.1:99999/"):
        with pytest.raises(ConfigurationError, match="amqp:// URL"):
            pigeon.connect(url)


def test_used_before_start_or_after_close() -> None:
    from pigeon.message import make_message
    from pigeon.transports.amqp import AmqpTransport

    transport = AmqpTransport(URL)
    with pytest.raises(pigeon.NotStartedError, match=r"start\(\)"):
        transport.send_nowait("never-declared", make_message("x"))

    async def echo(message: pigeon.Message) -> pigeon.Message:
        return message

    async def body() -> None:
        with pytest.raises(pigeon.NotStartedError):
            await transport.request("svc", make_message("x"), timeout=1.0)
        await transport.start()
        await transport.close()
        with pytest.raises(pigeon.ClosedError, match="closed"):
            transport.send_nowait("never-declared", make_message("x"))
        with pytest.raises(pigeon.ClosedError):
            await transport.serve("svc", echo)
        with pytest.raises(pigeon.ClosedError):
            await transport.start()

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL))


def test_default_size_limit_is_16_mib() -> None:
    async def body() -> None:
        async with pigeon.connect(URL) as conn:
            with pytest.raises(pigeon.MessageTooLarge) as info:
                conn.send_nowait("never-declared", b"x" * ((16 << 20) + 1))
            assert info.value.limit == 16 << 20

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL))


def test_unreachable_broker_is_a_transport_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed

    async def body() -> None:
        with pytest.raises(TransportError) as info:
            await pigeon.connect(f"amqp://guest:guest@127.0.0.1:{port}/", connect_timeout=2.0)
        assert info.value.__cause__ is not None
        assert "guest:guest" not in str(info.value)

    conformance.run(scenario_wrapper(body), conformance.BrokerSetup(URL))


def test_missing_aio_pika_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import pigeon.transports

    for name in [n for n in sys.modules if n.startswith("pigeon.transports.amqp")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aio_pika", None)  # import aio_pika now fails
    monkeypatch.setattr(pigeon.transports, "amqp", None, raising=False)
    hint = r"pip install 'pigeon-queues\[amqp\]' \(in a clone: pip install -e '\.\[amqp\]'\)"
    with pytest.raises(ConfigurationError, match=hint) as info:
        importlib.import_module("pigeon.transports.amqp").AmqpTransport(
            "amqp://guest:s3cret@127.0.0.1:5672/"
        )
    assert "s3cret" not in str(info.value)


def test_map_exceptions_keeps_the_cause() -> None:
    import aiormq.exceptions as amqp_errors

    from pigeon.transports.amqp.errors import QueueNotReady, map_exceptions

    cases = [
        (amqp_errors.ChannelPreconditionFailed("x"), ConfigurationError),
        # A stream member still starting is a moment, not a misconfiguration.
        (
            amqp_errors.ChannelPreconditionFailed(
                "PRECONDITION_FAILED - queue 's' in vhost '/' does not have a replica on the "
                "local node"
            ),
            QueueNotReady,
        ),
        (amqp_errors.ConnectionClosed(320, "gone"), TransportError),
        (amqp_errors.ChannelInvalidStateError("closed"), TransportError),
        (ConnectionResetError("reset"), TransportError),
        (TimeoutError(), pigeon.Timeout),
    ]
    for raised, expected in cases:
        with pytest.raises(expected) as info:
            with map_exceptions("test", address="amqp://h/"):
                raise raised
        assert info.value.__cause__ is raised


def test_delay_steps_round_up() -> None:
    from pigeon.transports.amqp.topology import delay_step_ms

    for delay in (0.0001, 0.001, 0.05, 0.3, 1.0, 7.5, 30.0, 3600.0):
        step = delay_step_ms(delay)
        assert delay * 1000 <= step <= max(2, delay * 1000 * 1.2)
    steps = {delay_step_ms(d / 1000) for d in range(1, 60_001)}
    assert len(steps) < 70
