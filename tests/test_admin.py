"""pigeon.admin as a library: its shapes, its rate arithmetic, and the
brokerless and memory backends in process (the command line and the broker
backends are tested through ``pigeon`` itself in test_cli_operate.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from brokers import free_port

import pigeon
from pigeon.admin import QUEUE_FIELDS, SERVICE_FIELDS, NotSupported, Unreachable, open_admin
from pigeon.admin.base import queue_row
from pigeon.admin.rates import QueueRates, queue_rates, rate
from pigeon.admin.rows import PullCounts, declared_rows, jetstream_rows

WAIT = 30.0


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """A test that runs ``scenario`` on a fresh event loop."""

    def test() -> None:
        asyncio.run(scenario())

    test.__name__ = scenario.__name__
    return test


# -- rates (pure) ----------------------------------------------------------------


def test_a_rate_is_the_counter_delta_over_the_interval() -> None:
    assert rate(10, 40, 2.0) == 15.0
    assert rate(5, 5, 1.0) == 0.0


@pytest.mark.parametrize(
    ("before", "after", "seconds"),
    [(None, 5, 1.0), (5, None, 1.0), (1, 5, 0.0), (1, 5, -1.0), (9, 3, 1.0), ("1", 2, 1.0)],
)
def test_a_rate_nobody_can_know_is_none(before: object, after: object, seconds: float) -> None:
    # Unknown counters, no interval, or a counter that went down (its host
    # restarted): never a made-up 0 or a negative rate.
    assert rate(before, after, seconds) is None


def test_queue_rates_per_queue_and_a_new_queue_has_none() -> None:
    before = {"jobs": {"received": 10, "acked": 4}}
    after = {"jobs": {"received": 30, "acked": 14}, "new": {"received": 3, "acked": 0}}
    assert queue_rates(before, after, 2.0) == {
        "jobs": {"received_per_s": 10.0, "acked_per_s": 5.0},
        "new": {"received_per_s": None, "acked_per_s": None},
    }


def test_queue_rates_of_readings_one_after_another() -> None:
    rates = QueueRates()
    first = rates.update({"jobs": {"received": 10, "acked": 4}}, now=100.0)
    assert first == {"jobs": {"received_per_s": None, "acked_per_s": None}}
    second = rates.update({"jobs": {"received": 30, "acked": 14}}, now=102.0)
    assert second == {"jobs": {"received_per_s": 10.0, "acked_per_s": 5.0}}
    third = rates.update({"jobs": {"received": 31, "acked": 14}}, now=103.0)
    assert third == {"jobs": {"received_per_s": 1.0, "acked_per_s": 0.0}}


def test_a_row_has_every_field_and_unknown_ones_are_none() -> None:
    row = queue_row({"ready": 3, "on_disk": 1})
    assert set(QUEUE_FIELDS) <= set(row)
    assert row["ready"] == 3 and row["on_disk"] == 1 and row["acked"] is None


def test_jetstream_rows_take_ready_and_in_flight_from_the_consumer() -> None:
    subjects = {
        "pigeon.q.jobs": 7,  # in the stream: 3 delivered and unacked, 4 not delivered
        "pigeon.q.jobs.dead": 2,
        "pigeon.q.idle": 5,  # nobody consumes it yet
        "pigeon.t.prices": 9,  # a topic, not a queue
    }
    consumers = {"pigeon.q.jobs": PullCounts(4, 3, 1), "pigeon.q.quiet": PullCounts(0, 0, 2)}
    rows = jetstream_rows("pigeon", subjects, consumers)
    assert sorted(rows) == ["idle", "jobs", "jobs.dead", "quiet"]
    expected = {"ready": 4, "in_flight": 3, "consumers": 1, "dead": 2, "stored": 7}
    assert {field: rows["jobs"][field] for field in expected} == expected
    assert rows["jobs"]["received"] is None and rows["jobs"]["delayed"] is None
    assert rows["idle"]["ready"] == 5 and rows["idle"]["in_flight"] == 0
    assert rows["quiet"]["ready"] == 0 and rows["quiet"]["consumers"] == 2
    assert rows["jobs.dead"]["ready"] == 2


def test_declared_rows_leave_out_deleted_queues_and_count_dead_letters() -> None:
    rows = declared_rows({"jobs": (4, 2), "jobs.dead": (3, 0), "gone": None, "gone.dead": None})
    assert sorted(rows) == ["jobs", "jobs.dead"]
    assert rows["jobs"]["ready"] == 4 and rows["jobs"]["consumers"] == 2
    assert rows["jobs"]["dead"] == 3 and rows["jobs"]["in_flight"] is None
    assert rows["jobs.dead"]["dead"] == 0


# -- backends in process ------------------------------------------------------------


async def _traffic(conn: pigeon.Connection, server: pigeon.Connection) -> None:
    """Ready messages in "jobs", dead letters of "bad", calls to "echo"
    (served by ``server``)."""
    await _traffic_without_calls(conn)

    async def echo(message: pigeon.Message) -> object:
        if message.decode() == "boom":
            raise ValueError("boom")
        return message.decode()

    await server.serve("echo", echo)
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:  # until the node has heard the server offer it
        try:
            await conn.request("echo", "hello", timeout=WAIT)
            break
        except pigeon.NoResponders:
            assert asyncio.get_running_loop().time() < deadline, "echo never offered"
            await asyncio.sleep(0.05)
    with pytest.raises(pigeon.Rejected):
        await conn.request("echo", "boom", timeout=WAIT)


async def _until(check: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not await check():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def _exercise(admin: pigeon.admin.Admin) -> None:
    async def two_dead() -> bool:
        return (await admin.queues()).get("bad", {}).get("dead") == 2

    await _until(two_dead, "two dead letters of 'bad'")
    queues = await admin.queues()
    assert queues["jobs"]["ready"] == 4 and queues["jobs"]["received"] == 4
    assert all(set(QUEUE_FIELDS) <= set(row) for row in queues.values())
    services = await admin.services()
    assert set(SERVICE_FIELDS) <= set(services["echo"])
    assert services["echo"]["servers"] == 1
    assert services["echo"]["calls"] == 2 and services["echo"]["errors"] == 1
    assert services["echo"]["p50_ms"] is not None
    letters = await admin.dead("bad", limit=10)
    assert sorted(letter["body"] for letter in letters) == ['{"n":0}', '{"n":1}']
    assert all("no stock" in letter["reason"] for letter in letters)
    assert await admin.purge("jobs") == 4
    assert (await admin.queues())["jobs"]["ready"] == 0
    assert await admin.purge("bad", dead=True) == 2
    assert (await admin.queues())["bad"]["dead"] == 0
    assert await admin.replay("bad") == 0
    assert await admin.ping() >= 0.0


@run
async def test_the_memory_backend_reads_this_process_broker() -> None:
    async with pigeon.connect("memory://admin-test") as conn:
        await _traffic(conn, conn)
        async with await open_admin("memory://admin-test") as admin:
            info = await admin.info()
            assert info["transport"] == "memory" and "echo" in info["services"]
            await _exercise(admin)
    # Once every connection is gone, so is the broker: nothing to show.
    async with await open_admin("memory://admin-test") as admin:
        assert await admin.queues() == {}


@run
async def test_the_node_backend_asks_the_node_admin_services() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    async with pigeon.connect(bind=url, max_attempts=1):
        async with pigeon.connect(url) as conn, pigeon.connect(url) as server:
            await _traffic(conn, server)
            async with await open_admin(url, timeout=WAIT) as admin:
                info = await admin.info()
                assert info["transport"] == "zmq" and info["node"]
                assert "pigeon.purge" in info["services"]
                overview = await admin.overview()
                assert "jobs" in overview["queues"] and overview["node"] == info["node"]
                await _exercise(admin)
                # The servers a node relays to are its peers.
                peers = await admin.peers()
                assert any("echo" in peer["services"] for peer in peers)
                stats = await admin.info()
                assert stats["purged"] == 6  # counted by the node


def test_a_purge_on_a_durable_node_stays_purged_after_a_restart(tmp_path: Path) -> None:
    store = str(tmp_path / "node.db")
    url = f"tcp://127.0.0.1:{free_port()}"

    async def first_life() -> None:
        async with pigeon.connect(bind=url, store=store, max_attempts=1):
            async with pigeon.connect(url) as conn:
                await _traffic_without_calls(conn)
                async with await open_admin(url, timeout=WAIT) as admin:

                    async def two_dead() -> bool:
                        return (await admin.queues()).get("bad", {}).get("dead") == 2

                    await _until(two_dead, "two dead letters of 'bad'")
                    assert await admin.purge("jobs") == 4
                    assert await admin.purge("bad", dead=True) == 2

    async def second_life() -> None:
        async with pigeon.connect(bind=url, store=store) as node:
            queues = node.stats()["queues"]
            assert queues.get("jobs", {}).get("ready", 0) == 0
            assert queues.get("bad.dead", {}).get("ready", 0) == 0
            assert node.stats()["restored"] == 0

    asyncio.run(first_life())
    asyncio.run(second_life())


async def _traffic_without_calls(conn: pigeon.Connection) -> None:
    for n in range(4):
        await conn.send("jobs", {"n": n})

    async def fails(delivery: pigeon.Delivery) -> None:
        raise ValueError("no stock")

    await conn.consume("bad", fails, retry=pigeon.RetryPolicy(max_attempts=1))
    for n in range(2):
        await conn.send("bad", {"n": n})


@run
async def test_nothing_listening_is_unreachable_at_once() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    started = asyncio.get_running_loop().time()
    with pytest.raises(Unreachable, match=f"Nothing reachable at {url}"):
        await open_admin(url, timeout=WAIT)
    # Refused, so said at once rather than after the whole timeout.
    assert asyncio.get_running_loop().time() - started < WAIT
    with pytest.raises(Unreachable, match="no socket file"):
        await open_admin("ipc:///nonexistent/pigeon-admin.sock", timeout=WAIT)


@run
async def test_an_unknown_scheme_is_a_configuration_error() -> None:
    with pytest.raises(pigeon.ConfigurationError, match="no admin backend for http://"):
        await open_admin("http://127.0.0.1:1")
    assert issubclass(NotSupported, pigeon.PigeonError)
