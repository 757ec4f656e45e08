"""Publish-subscribe on brokerless nodes, where the conformance suite does not
reach: a durable node killed -9 and restarted, a subscriber whose link is
cut, keys and grants, scatter-gather through a relaying node, and
``pigeon node --retain``."""

from __future__ import annotations

import asyncio
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest
from brokers import describe, port_taken
from test_faults import Child

import pigeon
from pigeon.security.keys import new_keys
from pigeon.testing.relay import Relay

pytestmark = pytest.mark.timeout(120)

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
WAIT = 30.0  # bound for what takes well under a second on a quiet machine


async def until(predicate, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class NodeProcess:
    """``pigeon node`` with a store and topic history, in its own process."""

    def __init__(self, url: str, store: Path, logs: Path) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            self.err = logs / f"node-{time.monotonic_ns()}.err"
            with open(self.err, "wb") as err:
                self.proc = subprocess.Popen(
                    [
                        *PIGEON,
                        "node",
                        "--bind",
                        url,
                        "--store",
                        str(store),
                        "--heartbeat",
                        "0.5",
                        "--retain",
                        "prices.>:count=5",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            banner = self._first_line()
            served = re.search(r"serving (tcp://\S+?);", banner)
            if served:
                self.url = served.group(1)
                return
            self.kill()
            failure = describe("pigeon node", self.proc.poll(), self.err, banner)
            if not port_taken(failure) or time.monotonic() >= deadline:
                raise AssertionError(f"the node did not start\n{failure}")
            time.sleep(0.2)  # the port of the node just killed: taken a moment longer

    def _first_line(self) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(WAIT):
                self.proc.kill()
                self.proc.wait(10)
                return ""
        return self.proc.stdout.readline()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: nothing is flushed, nothing said goodbye
        self.proc.wait(WAIT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_a_durable_node_killed_keeps_history_and_named_subscriptions(tmp_path: Path) -> None:
    """What a durable node confirmed of its topics survives kill -9: the
    retained history (numbering goes on after it) and what waited in a named
    subscription while its subscriber was away."""
    store = tmp_path / "node.db"
    node = NodeProcess("tcp://127.0.0.1:0", store, tmp_path)

    async def before_the_kill() -> None:
        async with pigeon.connect(node.url) as conn:
            seen: list[int] = []
            audit = await conn.subscribe("prices.>", lambda e: seen.append(e.seq), name="audit")
            for price in range(3):
                await conn.publish("prices.eur", price)
            await until(lambda: len(seen) == 3, "the first 3 prices")
            await audit.close()
            for price in range(3, 7):  # confirmed: on disk, waiting for "audit"
                await conn.publish("prices.eur", price)

    asyncio.run(before_the_kill())
    node.kill()
    node = NodeProcess(node.url, store, tmp_path)
    try:

        async def after_the_restart() -> None:
            async with pigeon.connect(node.url) as conn:
                missed: list[tuple[int, int, bool]] = []

                def note(event: pigeon.Event) -> None:
                    missed.append((event.seq, event.decode(), event.message.redelivered))

                await conn.subscribe("prices.>", note, name="audit")
                await until(lambda: len(missed) == 4, "the 4 prices published while away")
                assert [(seq, price) for seq, price, _ in missed] == [
                    (4, 3),
                    (5, 4),
                    (6, 5),
                    (7, 6),
                ]
                # Stored before the crash: they may have been seen, so marked.
                assert all(redelivered for _, _, redelivered in missed)

                history: list[tuple[int, int]] = []
                async with conn.subscription("prices.eur", last=5) as events:
                    await conn.publish("prices.eur", 7)  # numbered after what was kept
                    async for event in events:
                        history.append((event.seq, event.decode()))
                        if event.decode() == 7:
                            break
                assert history == [(3, 2), (4, 3), (5, 4), (6, 5), (7, 6), (8, 7)]
                with pytest.raises(pigeon.ReplayTrimmed) as trimmed:
                    await conn.subscribe("prices.eur", note, from_seq=1)
                assert trimmed.value.first_retained == 4

        asyncio.run(after_the_restart())
    finally:
        node.kill()


def test_a_named_subscriber_killed_mid_event_hands_it_to_the_next(tmp_path: Path) -> None:
    """kill -9 a subscriber of a named subscription while it handles an
    event: the next subscriber with that name gets the rest and, once the
    node has given the dead one up, that event again, marked redelivered;
    nothing is missed."""

    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", heartbeat=0.5) as hub:
            url = str(hub.stats()["bound"][0])
            first = Child(tmp_path, "subscriber", url, "audit.>", "audit", "hang")
            second = None
            try:
                await first.wait("ready")
                for n in range(3):
                    await hub.publish("audit.login", n)
                await first.wait("got")
                first.kill()
                second = Child(tmp_path, "subscriber", url, "audit.>", "audit", "ack")
                await wait_until_events(second, 3)
                got = sorted((e["seq"], e["redelivered"], e["missed"]) for e in second.events[1:])
                assert got == [(1, True, 0), (2, False, 0), (3, False, 0)], got
                assert hub.stats()["queues"]["pigeon.sub.audit"]["consumers_lost"] == 1
            finally:
                first.close()
                if second is not None:
                    second.close()

    asyncio.run(scenario())


async def wait_until_events(child: Child, count: int) -> None:
    await until(lambda: sum(e["ev"] == "got" for e in child.poll()) >= count, f"{count} events")


def test_a_subscriber_whose_link_is_cut_misses_nothing(tmp_path: Path) -> None:
    """A subscriber's own subscription outlives its lost link (for a grace),
    so what was published while the link was down arrives once it is back,
    numbered with no gap."""

    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", heartbeat=0.2) as hub:
            url = str(hub.stats()["bound"][0])
            with Relay(url) as relay:
                async with pigeon.connect(f"tcp://127.0.0.1:{relay.port}", heartbeat=0.2) as far:
                    seen: list[int] = []
                    sub = await far.subscribe("t.x", lambda e: seen.append(e.seq))
                    await hub.publish("t.x", 0)
                    await until(lambda: seen == [1], "the first event")
                    relay.cut(refuse=True)
                    await until(
                        lambda: hub.stats()["peers_lost"] >= 1, "the hub to give the link up"
                    )
                    for n in range(1, 20):
                        await hub.publish("t.x", n)
                    relay.heal()
                    await until(lambda: len(seen) >= 20, "the 19 published while cut")
                    assert seen == list(range(1, 21))
                    stats = sub.stats()
                    assert (stats["gaps"], stats["missed"]) == (0, 0)
                    assert hub.stats()["topics"]["expired"] == 0

    asyncio.run(scenario())


def test_grants_decide_who_publishes_and_subscribes(tmp_path: Path) -> None:
    """With keys, publishing needs ``send`` on the topic and subscribing
    ``consume`` on the pattern."""
    for name in ("node", "ticker", "reader"):
        new_keys(tmp_path / name)
    acl = tmp_path / "acl.toml"
    acl.write_text(
        '[clients.ticker]\nkey = "ticker.key"\nsend = ["prices.>"]\n\n'
        '[clients.reader]\nkey = "reader.key"\nconsume = ["prices.*"]\n'
    )

    def client(url: str, name: str) -> pigeon.Connection:
        return pigeon.connect(
            url, key=str(tmp_path / f"{name}.key_secret"), server_key=str(tmp_path / "node.key")
        )

    async def scenario() -> None:
        async with pigeon.connect(
            bind="tcp://127.0.0.1:0", key=str(tmp_path / "node.key_secret"), allow=str(acl)
        ) as node:
            url = str(node.stats()["bound"][0])
            async with client(url, "ticker") as ticker, client(url, "reader") as reader:
                seen: list[str] = []
                await reader.subscribe("prices.*", lambda e: seen.append(e.topic))
                await ticker.publish("prices.eur", 1)
                await until(lambda: seen == ["prices.eur"], "the granted publish")
                with pytest.raises(pigeon.Forbidden):
                    await ticker.publish("orders.new", 1, timeout=5)
                with pytest.raises(pigeon.Forbidden):
                    await reader.subscribe("prices.>", lambda e: None)  # wider than granted
                with pytest.raises(pigeon.Forbidden):
                    await ticker.subscribe("prices.*", lambda e: None)
                with pytest.raises(pigeon.Forbidden):
                    await reader.publish("prices.eur", 1, timeout=5)
                assert seen == ["prices.eur"]

    asyncio.run(scenario())


def test_request_all_reaches_servers_behind_a_relaying_node() -> None:
    """Servers connected to a node (Majordomo) each answer a scatter-gather
    made through it, once; a server slower than the deadline gives nothing."""

    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as hub:
            url = str(hub.stats()["bound"][0])
            async with (
                pigeon.connect(url) as one,
                pigeon.connect(url) as two,
                pigeon.connect(url) as slow,
                pigeon.connect(url) as caller,
            ):
                await one.serve("census", lambda m: "one")
                await two.serve("census", lambda m: "two")

                async def late(message: pigeon.Message) -> str:
                    await asyncio.sleep(5)
                    return "slow"

                await slow.serve("census", late)
                await until(
                    lambda: hub.stats()["relay"]["servers"] == 3, "3 servers behind the hub"
                )
                replies = await caller.request_all("census", None, timeout=1.0)
                assert sorted(r.text for r in replies) == ["one", "two"]
                # A server asking is not asked through the hub as well.
                replies = await one.request_all("census", None, timeout=1.0)
                assert sorted(r.text for r in replies) == ["one", "two"]
                with pytest.raises(pigeon.Timeout, match="2 of the 3"):
                    await caller.request_all("census", None, timeout=1.0, min_replies=3)
                with pytest.raises(pigeon.NoResponders):
                    await caller.request_all("nobody", None, timeout=1.0)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ("prices.>", "expected PATTERN:BOUNDS"),
        ("prices.>:count=x", "invalid literal"),
        ("prices.>:weight=3", "unknown bound 'weight'"),
        ("prices.>>:count=3", "whole segments"),
    ],
)
def test_pigeon_node_refuses_a_bad_retain(option: str, error: str) -> None:
    done = subprocess.run(
        [*PIGEON, "node", "--bind", "tcp://127.0.0.1:0", "--retain", option],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 2 and error in done.stderr, done.stderr


def test_short_subscriptions_leave_nothing_behind() -> None:
    """Each subscription of its own has a new queue name: a connecting node
    that opens and ends many keeps nothing of the ended ones, nor does the
    node that hosted them."""

    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0") as hub:
            url = str(hub.stats()["bound"][0])
            async with pigeon.connect(url) as far:
                for n in range(50):
                    async with far.subscription("t.>") as events:
                        await hub.publish("t.x", n)
                        async for _event in events:
                            break
                consumers = far.transport.consumers  # type: ignore[attr-defined]
                assert (len(consumers._verdicts), len(consumers.granted)) == (0, 0)
                assert len(far.stats()["workers"]) <= 1
            # The last Cancel is read by the hub a moment after ``far`` has
            # closed; well before an orphan's grace would remove it instead.
            await until(
                lambda: not hub.stats()["topics"]["subscriptions"], "the last Cancel", timeout=10.0
            )
            assert hub.stats()["topics"]["expired"] == 0
            assert not [q for q in hub.stats()["queues"] if q.startswith("pigeon.tmp.")]

    asyncio.run(scenario())
