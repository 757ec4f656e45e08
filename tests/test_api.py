"""The public API: exports, the error tree, URL choice, the sync twin, App."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading

import pytest

import pigeon
import pigeon.sync
from pigeon.testing.conformance import wait_until


def test_all_is_complete_and_sorted() -> None:
    public = {
        name
        for name, value in vars(pigeon).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public - {"annotations"} <= set(pigeon.__all__)
    assert pigeon.__all__ == sorted(pigeon.__all__)
    for name in pigeon.__all__:
        assert hasattr(pigeon, name)


def test_every_error_is_a_pigeon_error_with_a_docstring() -> None:
    for name in pigeon.__all__:
        value = getattr(pigeon, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, pigeon.PigeonError)
            assert value.__doc__
    assert issubclass(pigeon.ConfigurationError, ValueError)
    assert issubclass(pigeon.Timeout, TimeoutError)


@pytest.mark.parametrize("url", ["ftp://x", "redis://127.0.0.1", "nonsense"])
def test_unknown_scheme_names_the_known_ones(url: str) -> None:
    with pytest.raises(pigeon.ConfigurationError) as info:
        pigeon.connect(url)
    for scheme in ("memory", "tcp", "nats", "amqp"):
        assert scheme in str(info.value)


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(pigeon.ConfigurationError):
        pigeon.connect()
    with pytest.raises(pigeon.ConfigurationError):
        pigeon.connect("memory://x", bind="tcp://127.0.0.1:0")
    with pytest.raises(pigeon.ConfigurationError):
        pigeon.connect(["tcp://127.0.0.1:1", "nats://127.0.0.1:4222"])
    with pytest.raises(pigeon.ConfigurationError):
        pigeon.connect("tcp://127.0.0.1:1", store="/tmp/x.db")  # a store needs bind=
    with pytest.raises(pigeon.ConfigurationError):
        pigeon.connect("memory://x", store="/tmp/x.db")  # memory cannot be durable
    with pytest.raises(TypeError):
        pigeon.connect(42)  # type: ignore[arg-type]


def test_use_before_start_is_not_started_and_after_close_is_closed() -> None:
    assert not issubclass(pigeon.NotStartedError, pigeon.ClosedError)
    assert not issubclass(pigeon.ClosedError, pigeon.NotStartedError)

    async def scenario() -> None:
        conn = pigeon.connect("memory://closed")
        with pytest.raises(pigeon.NotStartedError, match="async with pigeon.connect"):
            conn.send_nowait("q", "x")
        with pytest.raises(pigeon.NotStartedError):
            await conn.send("q", "x")
        with pytest.raises(pigeon.NotStartedError):
            await conn.consume("q", lambda d: None)
        await conn.start()
        await conn.send("q", "x")
        await conn.close()
        for call in (
            lambda: conn.send("q", "x"),
            lambda: conn.request("svc", "x"),
            lambda: conn.serve("svc", lambda m: m),
            lambda: conn.flush(),
            conn.start,
        ):
            with pytest.raises(pigeon.ClosedError, match="open a new one"):
                await call()
        with pytest.raises(pigeon.ClosedError):
            conn.send_many("q", ["x"])

    asyncio.run(scenario())


def test_sync_twin_not_started_and_closed() -> None:
    conn = pigeon.sync.connect("memory://sync-closed")
    with pytest.raises(pigeon.NotStartedError):
        conn.send("q", "x")
    with conn:
        conn.send("q", "x")
    with pytest.raises(pigeon.ClosedError):
        conn.send("q", "x")


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda c: c.send_nowait("", "x"), "queue name"),
        (lambda c: c.send_nowait("has space", "x"), "queue name"),
        (lambda c: c.send_nowait("x" * 256, "x"), "queue name"),
        (lambda c: c.send_many("", ["x"]), "queue name"),
        (lambda c: c.send("q", "x", timeout=0), "timeout"),
        (lambda c: c.flush(timeout=-1), "timeout"),
        (lambda c: c.request("svc", "x", timeout=float("nan")), "timeout"),
        (lambda c: c.request("", "x"), "service name"),
        (lambda c: c.serve("", lambda m: m), "service name"),
        (lambda c: c.consume("q", lambda d: None, prefetch=0), "prefetch"),
        (lambda c: c.consume("q", lambda d: None, concurrency=True), "concurrency"),
        (lambda c: c.consume("q", lambda d: None, lease_ttl=0), "lease_ttl"),
        (lambda c: c.consume("q", lambda d: None, lease_ttl=float("inf")), "lease_ttl"),
        (lambda c: c.consume("q", lambda d: None, lease_ttl=float("nan")), "lease_ttl"),
        (lambda c: c.consume("q", lambda d: None, prefetch=2**64), "prefetch"),
        (lambda c: c.send_nowait("orders.*", "x"), "queue name"),
        (lambda c: c.send_nowait("orders.>", "x"), "queue name"),
        (lambda c: c.send_nowait("a\x00b", "x"), "queue name"),
        (lambda c: c.send_nowait("a..b", "x"), "queue name"),
        (lambda c: c.send_nowait("é" * 128, "x"), "queue name"),  # 256 bytes
    ],
)
def test_configuration_mistakes_raise_configuration_error(call, what: str) -> None:
    async def scenario() -> None:
        async with pigeon.connect("memory://config-mistakes") as conn:
            with pytest.raises(pigeon.ConfigurationError, match=what):
                result = call(conn)
                if inspect.isawaitable(result):
                    await result

    asyncio.run(scenario())


def test_sync_twin_runs_the_key_scenarios_from_many_threads() -> None:
    with pigeon.sync.connect(bind="tcp://127.0.0.1:0") as host:
        url = host.stats()["bound"][0]
        with pigeon.sync.connect(url) as client:
            got: list[str] = []
            lock = threading.Lock()

            def handle(delivery: pigeon.sync.Delivery) -> None:
                if delivery.message.text == "manual":
                    delivery.reject("by hand")
                    return
                with lock:
                    got.append(delivery.message.text)

            worker = client.consume("jobs", handle, prefetch=4)
            host.serve("upper", lambda m: m.text.upper())

            def produce(n: int) -> None:
                for i in range(20):
                    host.send("jobs", f"{n}-{i}")

            threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            host.send("jobs", "manual")
            assert client.request("upper", "abc", timeout=5).text == "ABC"
            future = host.send_nowait("jobs", "last")
            future.result(5)
            host.flush()
            deadline = 50
            while len(got) < 81 and deadline:
                threading.Event().wait(0.1)
                deadline -= 1
            assert sorted(got) == sorted(
                [f"{n}-{i}" for n in range(4) for i in range(20)] + ["last"]
            )
            assert worker.stats()["acked"] == 81
            with pytest.raises(pigeon.NoResponders):
                client.request("nobody", "x", timeout=5)


@dataclasses.dataclass
class Order:
    sku: str
    quantity: int


def test_app_injects_what_the_handler_asks_for() -> None:
    app = pigeon.App("memory://app-test")
    seen: dict[str, object] = {}

    @app.worker("typed")
    async def typed(order: Order) -> None:
        seen["typed"] = order

    @app.worker("raw")
    def raw(message: pigeon.Message) -> None:  # sync: runs in a thread
        seen["raw"] = message.body

    @app.worker("manual")
    async def manual(delivery: pigeon.Delivery) -> None:
        seen["manual"] = delivery.message.attempt
        await delivery.ack()

    @app.worker("plain")
    async def plain(body) -> None:  # noqa: ANN001 - unannotated: decoded by content type
        seen["plain"] = body

    @app.service("double")
    def double(n: int) -> int:
        return n * 2

    async def scenario() -> None:
        conn = await app.start()
        try:
            await conn.send("typed", Order("a-1", 2))
            await conn.send("raw", b"\x00\x01")
            await conn.send("manual", "x")
            await conn.send("plain", {"k": [1, 2]})
            reply = await conn.request("double", 21)
            assert reply.decode() == 42
            await wait_until(lambda: len(seen) == 4, 5, "all four handlers")
        finally:
            await app.stop()

    asyncio.run(scenario())
    assert seen == {
        "typed": Order("a-1", 2),
        "raw": b"\x00\x01",
        "manual": 1,
        "plain": {"k": [1, 2]},
    }


def test_send_waits_for_room_where_send_nowait_raises() -> None:
    async def scenario() -> None:
        # A producer whose host is not there yet: the outbox fills up.
        async with pigeon.connect("tcp://127.0.0.1:9", outbox_limit=3) as producer:
            for i in range(3):
                producer.send_nowait("q", str(i))
            with pytest.raises(pigeon.Backpressure) as info:
                producer.send_nowait("q", "over")
            assert info.value.limit == 3
            with pytest.raises(pigeon.Timeout):
                await producer.send("q", "blocked", timeout=0.3)

    asyncio.run(scenario())


def test_send_waits_for_room_at_a_full_host() -> None:
    async def scenario() -> None:
        async with (
            pigeon.connect(bind="tcp://127.0.0.1:0", max_length=1) as host,
            pigeon.connect(host.stats()["bound"][0]) as producer,
        ):
            await producer.send("q", "first")
            with pytest.raises(pigeon.Backpressure):
                await producer.send_nowait("q", "refused at the host")
            sending = asyncio.ensure_future(producer.send("q", "second", timeout=5))
            await asyncio.sleep(0.2)
            assert not sending.done()  # waiting for room, not failed
            got: list[str] = []
            await producer.consume("q", lambda d: got.append(d.message.text))
            await sending
            await wait_until(lambda: got == ["first", "second"], 5, "both messages")

    asyncio.run(scenario())


def test_a_failed_bind_says_where_and_releases_the_store(tmp_path) -> None:
    store = str(tmp_path / "q.db")

    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as first:
            taken = first.stats()["bound"][0]
            with pytest.raises(pigeon.TransportError) as info:
                await pigeon.connect(bind=taken, store=store)
            assert taken in str(info.value)
        # The store was closed with the failed node: it opens again at once.
        async with pigeon.connect(bind="tcp://127.0.0.1:0", store=store) as node:
            assert node.stats()["durable"]

    asyncio.run(scenario())


def test_a_bad_url_never_shows_its_password() -> None:
    for url in (
        "nats2://user:s3cret@host:4222",
        "s3cret-token@host",
        "amqq://u:s3cret@h/?x=s3cret",
    ):
        with pytest.raises(pigeon.ConfigurationError) as caught:
            pigeon.connect(url)
        assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"message_id": 123}, TypeError),
        ({"message_id": "x" * 256}, ValueError),
        ({"headers": {str(n): "" for n in range(65)}}, ValueError),
        ({"headers": {"h": "x" * 9000}}, ValueError),
        ({"headers": {"": "x"}}, ValueError),
    ],
)
def test_bad_envelopes_are_refused_before_sending(kwargs: dict, error: type) -> None:
    async def scenario() -> None:
        async with pigeon.connect("memory://bad-envelopes") as conn:
            with pytest.raises(error):
                conn.send_nowait("q", "x", **kwargs)
            assert conn.stats()["sent"] == 0

    asyncio.run(scenario())


def test_a_node_removes_its_ipc_socket_files_when_it_closes(tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "node.sock"

    async def main() -> None:
        async with pigeon.connect(bind=f"ipc://{path}") as node:
            assert path.is_socket() and node.stats()["bound"] == [f"ipc://{path}"]
        assert not path.exists()  # libzmq itself leaves it behind

    asyncio.run(main())
