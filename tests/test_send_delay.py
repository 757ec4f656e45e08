"""``send(delay=)`` and ``send(not_before=)``: never delivered before the
time asked, on every transport, and durable where the queue is durable (a
real ``pigeon node --store`` killed with SIGKILL still delivers it, no
earlier than its time).

Checks are "not before" (a lower bound on the wall clock) and "arrives"
(within generous timeouts); nothing here asserts that anything is fast.
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import AMQP_URL, ANY_PORT, NATS_URL, require

import pigeon
import pigeon.sync
from pigeon._core.headers import NOT_BEFORE
from pigeon.errors import ConfigurationError

DELAY = 1.5
ARRIVAL_TIMEOUT = 60.0
SLACK = 0.001  # the ledger maps wall time onto the loop's clock: rounding only


def unique(prefix: str = "delay") -> str:
    return prefix + uuid.uuid4().hex[:10]


async def receive(
    conn: pigeon.Connection, queue: str, count: int
) -> list[tuple[str, float, float]]:
    """Consume ``queue`` until ``count`` messages came: (body, wall time,
    the not-before time it carries, 0.0 if none)."""
    got: list[tuple[str, float, float]] = []
    done = asyncio.Event()

    async def handler(delivery: pigeon.Delivery) -> None:
        due = float(delivery.message.headers.get(NOT_BEFORE, 0.0))
        got.append((delivery.decode(), time.time(), due))
        await delivery.ack()
        if len(got) >= count:
            done.set()

    await conn.consume(queue, handler)
    await asyncio.wait_for(done.wait(), ARRIVAL_TIMEOUT)
    return got


async def delayed_and_not(conn: pigeon.Connection, queue: str) -> dict[str, float]:
    """Send one message with ``delay``, one with ``not_before`` and one
    plain; return when each arrived, after checking none came early."""
    receiving = asyncio.ensure_future(receive(conn, queue, 3))
    sent_at = time.time()
    await conn.send(queue, "delay", delay=DELAY)
    due = time.time() + DELAY
    await conn.send(queue, "not_before", not_before=due)
    await conn.send(queue, "plain")
    received = await receiving
    got = {body: at for body, at, _ in received}
    assert got["delay"] >= sent_at + DELAY - SLACK
    assert got["not_before"] >= due - SLACK
    assert got["plain"] < got["delay"] and got["plain"] < got["not_before"]  # order, not speed
    return got


async def first_runs_unflagged(conn: pigeon.Connection, queue: str) -> None:
    """A delayed message's first run is attempt 1, not marked redelivered
    (a hold on the way is not a delivery), and a retry after it is flagged."""
    seen: list[tuple[int, bool]] = []
    done = asyncio.Event()

    async def handler(delivery: pigeon.Delivery) -> None:
        seen.append((delivery.message.attempt, delivery.message.redelivered))
        if len(seen) == 1:
            await delivery.nack(delay=0.2)
        else:
            await delivery.ack()
            done.set()

    await conn.consume(queue, handler)
    await conn.send(queue, "once", delay=0.5)
    await asyncio.wait_for(done.wait(), ARRIVAL_TIMEOUT)
    assert seen == [(1, False), (2, True)]


@pytest.mark.timeout(90)
def test_memory() -> None:
    async def scenario() -> None:
        async with pigeon.connect("memory://" + unique()) as conn:
            queue = unique()
            await conn.send(queue, "held", delay=30)
            queues = conn.stats()["queues"]
            assert queues[queue]["delayed"] == 1 and queues[queue]["ready"] == 0
            await delayed_and_not(conn, unique())
            assert conn.stats()["queues"][queue]["scheduled"] == 1

    asyncio.run(scenario())


@pytest.mark.timeout(90)
def test_tcp_through_a_node() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind=ANY_PORT) as node:
            url = node.stats()["bound"][0]
            async with pigeon.connect(url) as conn:
                await delayed_and_not(conn, unique())
                await first_runs_unflagged(conn, unique())
            # The node's own sends to a queue it hosts, one and many at once.
            await delayed_and_not(node, unique())
            queue = unique()
            before = time.time()
            await node.send_many(queue, ["a", "b"], delay=1.0)
            got = await receive(node, queue, 2)
            assert all(at >= before + 1.0 - SLACK for _, at, _ in got), got

    asyncio.run(scenario())


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_nats() -> None:
    async def scenario() -> None:
        async with pigeon.connect(require(NATS_URL)) as conn:
            await delayed_and_not(conn, unique())
            assert conn.stats()["held"] >= 2  # naks of early deliveries
            await first_runs_unflagged(conn, unique())

    asyncio.run(scenario())


@pytest.mark.broker
@pytest.mark.timeout(90)
def test_amqp() -> None:
    async def scenario() -> None:
        async with pigeon.connect(require(AMQP_URL)) as conn:
            queue = unique()
            await delayed_and_not(conn, queue)
            assert conn.stats()["sent_delayed"] == 2
            await first_runs_unflagged(conn, unique())
            assert any(q.startswith(queue + ".delay.") for q in conn.stats()["declared"])

    asyncio.run(scenario())


@pytest.mark.timeout(90)
def test_sync_twin() -> None:
    with pigeon.sync.connect("memory://" + unique()) as conn:
        queue = unique()
        sent_at = time.time()
        conn.send(queue, "later", delay=1.0)
        conn.send_many(queue, ["a", "b"], not_before=sent_at + 1.0)
        conn.send_nowait(queue, "c", delay=1.0).result(10)
        got: list[float] = []
        conn.consume(queue, lambda message: got.append(time.time()))
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while len(got) < 4:
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
    assert min(got) >= sent_at + 1.0 - SLACK


# -- durable: a node killed with SIGKILL -------------------------------------


class Node:
    def __init__(self, store: Path, out: Path) -> None:
        self.out = out
        with open(out, "wb") as sink:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pigeon.cli.main",
                    "node",
                    "--bind",
                    ANY_PORT,
                    "--store",
                    str(store),
                    "--heartbeat",
                    "0.2",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            banner = re.search(r"serving (tcp://\S+?);", out.read_text())
            if banner:
                self.url = banner.group(1)
                return
            assert self.popen.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        if node.popen.poll() is None:
            node.kill()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_durable_node_killed_still_delivers_no_earlier(tmp_path: Path, nodes: list[Node]) -> None:
    store = tmp_path / "queues.db"
    first = Node(store, tmp_path / "first.out")
    nodes.append(first)
    queue = unique()
    hold = 6.0  # long enough that the node is dead and back before it is due

    async def send() -> float:
        async with pigeon.connect(first.url) as conn:
            before = time.time()
            await conn.send(queue, "delay", delay=hold)
            await conn.send(queue, "not_before", not_before=time.time() + hold)
            return before

    before = asyncio.run(send())
    first.kill()  # both confirmed, so both on disk
    second = Node(store, tmp_path / "second.out")
    nodes.append(second)

    async def take() -> list[tuple[str, float, float]]:
        async with pigeon.connect(second.url) as conn:
            return await receive(conn, queue, 2)

    got = asyncio.run(take())
    assert sorted(body for body, _, _ in got) == ["delay", "not_before"]
    # Each carries the time it asked for (at least ``hold`` after it was
    # sent), and arrived no earlier, though the node that took it died.
    assert all(due >= before + hold for _, _, due in got), got
    assert all(at >= due - SLACK for _, at, due in got), got


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        ({"delay": -1}, ">= 0"),
        ({"delay": math.nan}, ">= 0"),
        ({"delay": math.inf}, ">= 0"),
        ({"delay": 1, "not_before": time.time() + 1}, "not both"),
        ({"not_before": math.nan}, "finite time"),
        ({"delay": 31 * 86_400}, "max_delay"),
        ({"not_before": time.time() + 31 * 86_400}, "max_delay"),
    ],
)
def test_bad_delays_are_refused_naming_the_rule(options: dict[str, Any], rule: str) -> None:
    async def scenario() -> None:
        async with pigeon.connect("memory://" + unique()) as conn:
            with pytest.raises(ConfigurationError, match=rule):
                await conn.send("q", "x", **options)
            with pytest.raises(ConfigurationError, match=rule):
                conn.send_nowait("q", "x", **options)
            with pytest.raises(ConfigurationError, match=rule):
                conn.send_many("q", ["x"], **options)
            assert "q" not in conn.stats()["queues"]  # nothing was queued

    asyncio.run(scenario())
