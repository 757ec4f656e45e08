"""Planned change is invisible: workers and servers drain (take nothing new,
finish what runs, hand back the rest at once), and a worker whose host is
lost stops running deliveries nobody can ack any more. Real nodes on tcp
loopback; the host-loss test kills a real ``pigeon node`` process."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from brokers import ANY_PORT
from test_cli_node import start_node

import pigeon
from pigeon.testing.conformance import wait_until

WAIT = 30.0  # bound for what takes well under a second on a quiet machine
LEASE = 60.0  # longer than any test: a redelivery seen came from a hand-back


def bound(conn: pigeon.Connection) -> str:
    return str(conn.stats()["bound"][0])


async def _links_up(conn: pigeon.Connection) -> None:
    def up() -> bool:
        links = conn.stats()["links"].values()
        return bool(links) and all(link["up"] for link in links)

    await wait_until(up, WAIT, "the links")


def test_a_draining_worker_hands_back_what_it_has_not_started() -> None:
    async def scenario() -> None:
        seen: Counter[str] = Counter()
        redelivered: list[str] = []
        release = asyncio.Event()

        async def slow(delivery: pigeon.Delivery) -> None:
            seen[delivery.message.text] += 1
            await release.wait()

        async def fast(delivery: pigeon.Delivery) -> None:
            seen[delivery.message.text] += 1
            if delivery.message.redelivered:
                redelivered.append(delivery.message.text)

        async with pigeon.connect(bind=ANY_PORT) as host:
            url = bound(host)
            async with pigeon.connect(url) as a, pigeon.connect(url) as b:
                await _links_up(a)
                worker_a = await a.consume("jobs", slow, prefetch=10, lease_ttl=LEASE)
                for i in range(10):
                    await host.send("jobs", f"m{i}")
                # A holds all ten and runs the first.
                await wait_until(lambda: worker_a.stats()["received"] == 1, WAIT, "A's first")
                await wait_until(
                    lambda: host.stats()["queues"]["jobs"]["in_flight"] == 10, WAIT, "A's leases"
                )
                await b.consume("jobs", fast, lease_ttl=LEASE)
                draining = asyncio.ensure_future(worker_a.drain(grace=WAIT))
                # The nine A never started reach B now, long before a lease
                # could expire; A's running handler is still running.
                await wait_until(lambda: len(redelivered) == 9, WAIT, "the hand-back")
                assert not draining.done()
                release.set()
                await draining
                assert worker_a.stats()["handed_back"] == 9
                assert worker_a.stats()["acked"] == 1
                await wait_until(
                    lambda: host.stats()["queues"]["jobs"]["acked"] == 10, WAIT, "every ack"
                )
        assert seen == Counter({f"m{i}": 1 for i in range(10)})

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_a_drain_cuts_what_outlives_its_grace_and_hands_it_back() -> None:
    async def scenario() -> None:
        cut: list[str] = []
        done: list[str] = []

        async def forever(delivery: pigeon.Delivery) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cut.append(delivery.message.text)
                raise

        async def fast(delivery: pigeon.Delivery) -> None:
            done.append(delivery.message.text)

        async with pigeon.connect(bind=ANY_PORT) as host:
            url = bound(host)
            async with pigeon.connect(url) as a, pigeon.connect(url) as b:
                await _links_up(a)
                worker_a = await a.consume("jobs", forever, lease_ttl=LEASE)
                await host.send("jobs", "stuck")
                await wait_until(lambda: worker_a.stats()["received"] == 1, WAIT, "A's delivery")
                await b.consume("jobs", fast, lease_ttl=LEASE)
                await worker_a.drain(grace=0.2)
                assert cut == ["stuck"]
                assert worker_a.stats()["handed_back"] == 1
                await wait_until(lambda: done == ["stuck"], WAIT, "B to run it")

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_a_draining_server_loses_no_call() -> None:
    """Callers keep calling while one of two servers drains: every call is
    answered, and the drained server takes no request after it withdrew."""

    async def scenario() -> None:
        async def slowish(message: pigeon.Message) -> str:
            await asyncio.sleep(0.01)
            return "ok"

        async with pigeon.connect(bind=ANY_PORT) as one, pigeon.connect(bind=ANY_PORT) as two:
            server_one = await one.serve("svc", slowish)
            await two.serve("svc", slowish)
            async with pigeon.connect([bound(one), bound(two)]) as client:
                await _links_up(client)
                failures: list[BaseException] = []
                answered = 0
                stop = asyncio.Event()

                async def caller() -> None:
                    nonlocal answered
                    while not stop.is_set():
                        try:
                            await client.request("svc", "x", timeout=WAIT)
                            answered += 1
                        except pigeon.PigeonError as exc:
                            failures.append(exc)

                callers = [asyncio.ensure_future(caller()) for _ in range(8)]
                await wait_until(lambda: server_one.stats()["handled"] >= 20, WAIT, "load")
                await server_one.drain(grace=WAIT)
                handled = server_one.stats()["handled"]
                before = answered
                await wait_until(lambda: answered >= before + 100, WAIT, "calls after")
                stop.set()
                await asyncio.gather(*callers)
                assert failures == []
                assert server_one.stats()["handled"] == handled  # nothing new after the drain
                assert server_one.stats()["cut"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_a_request_cut_by_a_drain_is_answered_by_another_server() -> None:
    async def scenario() -> None:
        started = asyncio.Event()

        async def stuck(message: pigeon.Message) -> str:
            started.set()
            await asyncio.Event().wait()
            return "never"

        async with pigeon.connect(bind=ANY_PORT) as one, pigeon.connect(bind=ANY_PORT) as two:
            server_one = await one.serve("svc", stuck)
            async with pigeon.connect([bound(one), bound(two)]) as client:
                await _links_up(client)
                # Only one serves svc yet: the call goes there and sticks.
                call = asyncio.ensure_future(client.request("svc", "x", timeout=WAIT))
                await started.wait()
                await two.serve("svc", lambda m: "from two")
                await two.serve("probe", lambda m: "here")  # after svc: see below
                # A client that reaches probe has heard that two serves svc.
                await wait_until_answered(client, "probe")
                await server_one.drain(grace=0.2)
                reply = await call
                assert reply.text == "from two"
                assert server_one.stats()["cut"] == 1

    asyncio.run(asyncio.wait_for(scenario(), 100))


async def wait_until_answered(client: pigeon.Connection, service: str) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            await client.request(service, "?", timeout=WAIT)
            return
        except pigeon.NoResponders:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.mark.timeout(120)
def test_a_worker_abandons_what_a_killed_host_leased_it(tmp_path) -> None:
    """A durable node is killed -9 while a worker holds 20 of its messages:
    the worker runs none of them on (their acks could only be stale)."""
    node = start_node(ANY_PORT, str(tmp_path / "node.db"), tmp_path)

    async def scenario() -> None:
        runs: list[str] = []
        cancelled: list[str] = []

        async def hold(delivery: pigeon.Delivery) -> None:
            runs.append(delivery.message.text)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(delivery.message.text)
                raise

        async with pigeon.connect(node.url, heartbeat=0.2) as producer:
            for i in range(20):
                await producer.send("jobs", f"m{i}")
        async with pigeon.connect(node.url, heartbeat=0.2) as conn:
            worker = await conn.consume("jobs", hold, prefetch=20, lease_ttl=LEASE)
            await wait_until(lambda: len(runs) == 1, WAIT, "the first run")
            await wait_until(lambda: worker.stats()["received"] == 1, WAIT, "received")
            started = time.monotonic()
            node.proc.kill()
            node.proc.wait(WAIT)
            await wait_until(lambda: worker.stats()["abandoned"] > 0, WAIT, "the abandonment")
            assert time.monotonic() - started < WAIT
            await asyncio.sleep(0.5)
            assert runs == ["m0"]  # the 19 it held and had not started never ran
            assert cancelled == ["m0"]  # the running handler was told
            assert worker.stats()["abandoned"] == 20

    try:
        asyncio.run(asyncio.wait_for(scenario(), 100))
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(WAIT)
        if node.proc.stdout is not None:
            node.proc.stdout.close()


def test_a_lost_link_is_counted() -> None:
    async def scenario() -> None:
        host = await pigeon.connect(bind=ANY_PORT)
        url = bound(host)
        async with pigeon.connect(url, heartbeat=0.2) as client:
            await _links_up(client)
            assert client.stats()["links_lost"] == 0
            await host.close()
            await wait_until(lambda: client.stats()["links_lost"] == 1, WAIT, "the loss")

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_a_handler_finishing_while_its_connection_closes_may_still_send() -> None:
    async def scenario() -> None:
        running = asyncio.Event()
        release = asyncio.Event()
        async with pigeon.connect(bind=ANY_PORT) as host:
            conn = await pigeon.connect(bound(host))
            await _links_up(conn)

            async def handle(delivery: pigeon.Delivery) -> None:
                running.set()
                await release.wait()
                await conn.send("receipts", delivery.message.text)  # part of its work

            worker = await conn.consume("jobs", handle, lease_ttl=LEASE)
            await host.send("jobs", "m0")
            await asyncio.wait_for(running.wait(), WAIT)
            closing = asyncio.create_task(conn.close(WAIT))
            await wait_until(lambda: worker.stats()["waiting"] == 0, WAIT, "the drain")
            release.set()
            await asyncio.wait_for(closing, 2 * WAIT)
            assert worker.stats()["retried"] == 0, worker.stats()
            receipts: list[str] = []
            await host.consume("receipts", lambda d: receipts.append(d.message.text))
            await wait_until(lambda: receipts == ["m0"], WAIT, "the receipt")
            assert host.stats()["queues"]["jobs"]["ready"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 100))


def test_an_ack_made_in_the_same_turn_as_the_cancel_reaches_the_host_first() -> None:
    """A worker's last ack is batched for the end of the loop turn, while
    stopping consumes sends its Cancel at once. When both happen in one turn
    (a drain that finds its last handler just done), the ack must still reach
    the host first: the other way round, the host takes the lease back on the
    Cancel, finds the ack stale, and the message runs again elsewhere."""

    async def scenario() -> None:
        held: list[pigeon.Delivery] = []
        release = asyncio.Event()
        async with pigeon.connect(bind=ANY_PORT) as host:
            async with pigeon.connect(bound(host)) as worker:
                await _links_up(worker)

                async def keep(delivery: pigeon.Delivery) -> None:
                    held.append(delivery)
                    await release.wait()  # settled by hand below

                await worker.consume("jobs", keep, lease_ttl=LEASE)
                await host.send("jobs", "once")
                await wait_until(lambda: len(held) == 1, WAIT, "the delivery")
                delivery = held[0]
                # One turn, no await between: the ack (batched) and the Cancel.
                delivery.settled = True
                pending = delivery._settler.ack(delivery)
                worker.transport.consumers.cancel("jobs")  # type: ignore[attr-defined]
                if pending is not None:
                    await pending
                release.set()
                await wait_until(
                    lambda: host.stats()["queues"]["jobs"]["acked"] == 1, WAIT, "the ack"
                )
            queue = host.stats()["queues"]["jobs"]
            assert queue["ready"] == 0 and queue["redelivered"] == 0, queue
            assert host.stats()["stale_settles"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))
