"""Network faults between real pigeon processes, made by a userspace TCP relay
(pigeon.testing.relay) on loopback: a slow, jittery, stalling link under
request-reply, and a worker cut off from its host for longer than its lease.

The children are tests/partitionproc.py processes, read and killed with the
``Child`` helper of tests/test_faults.py. Every wait is for a condition, with
a bound far above what a quiet machine needs; the only fixed waits are the
faults' own lengths.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import ANY_PORT
from faultproc import HEARTBEAT
from test_faults import WAIT, Child, bound, wait_for_service

import pigeon
from pigeon.testing.conformance import wait_until
from pigeon.testing.relay import Direction, Relay

PARTITIONPROC = str(Path(__file__).with_name("partitionproc.py"))

# A peer is lost after ``heartbeat × heartbeat_misses`` seconds of silence.
# A stall silences both ends (a server only answers Hellos; it sends none of
# its own), for the stall plus the delay's spread (0.2 s) plus, on an idle
# link, up to a heartbeat interval until the next Hello, plus whatever a busy
# machine adds. With the suite's HEARTBEAT of 0.5 s, heartbeat_misses=2
# (1 s) fails here (a call raises NoResponders: a false loss), the default 3
# (1.5 s) passes on a quiet machine with a few tenths of a second to spare,
# and heartbeat_misses=10 (5 s), set on both ends, is what makes the link
# tolerant of 1 s stalls on a busy machine too.
TOLERANT_MISSES = 10
# The link of test (a): 200 ms one way, ± 100 ms, and stalls of up to 1 s
# (seconds, which way), with a gap of 0.5 s of plain delay after each.
DELAY, JITTER = 0.2, 0.1
STALLS = [
    (0.5, Direction.BOTH),
    (1.0, Direction.TO_TARGET),
    (0.8, Direction.TO_CLIENT),
    (1.0, Direction.BOTH),
    (0.3, Direction.TO_TARGET),
    (1.0, Direction.BOTH),
]
CALL_TIMEOUT = 5.0  # each call's deadline
CALLERS = 4  # calls in flight at once, so some call is always crossing the link
PROBE_QUEUE = "partition.probe"  # consumed through the link: a lost peer would count


class PartitionChild(Child):
    """A partitionproc.py process; test_faults' Child reads its events, tells
    it lines and kills it."""

    SCRIPT = PARTITIONPROC


@pytest.fixture
def children(tmp_path) -> Iterator[Callable[..., Child]]:
    """Starts partitionproc.py children; kills every one after the test."""
    started: list[Child] = []

    def start(*args: str) -> Child:
        child = PartitionChild(tmp_path, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    """Relays the test opens, closed after it even when it fails."""
    opened: list[Relay] = []
    yield opened
    for relay in opened:
        relay.close()


class LinkWatch:
    """Samples whether every link of ``conn`` is up, every 10 ms: the client
    counts no link losses of its own. A sample can miss a short loss; the
    retries it causes cannot (every call in flight on a lost link moves on)."""

    def __init__(self, conn: pigeon.Connection) -> None:
        self.conn = conn
        self.downs = 0
        self._task = asyncio.ensure_future(self._watch())

    def up(self) -> bool:
        return all(link["up"] for link in self.conn.stats()["links"].values())

    async def _watch(self) -> None:
        was_up = True
        while True:
            now_up = self.up()
            if was_up and not now_up:
                self.downs += 1
            was_up = now_up
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop sampling; raises what stopped it, if it failed (a watch that
        died would otherwise report no losses)."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


async def server_stats(client: pigeon.Connection) -> dict:
    """The far node's ``stats()``, asked over the link (``pigeon.info``)."""
    reply = await client.request("pigeon.info", {"after": "", "limit": 10}, timeout=WAIT)
    return dict(reply.decode())


async def run_stalls(relay: Relay, stalls: list[tuple[float, Direction]]) -> None:
    for seconds, direction in stalls:
        relay.stall(seconds, direction=direction)
        await asyncio.sleep(seconds + 0.5)  # the stall, then a gap of plain delay


async def call_until(
    client: pigeon.Connection, done: asyncio.Event, latencies: list[float]
) -> None:
    n = 0
    while not done.is_set():
        n += 1
        started = time.monotonic()
        # A missed deadline raises Timeout; a false peer loss, NoResponders.
        reply = await client.request("svc", f"{id(latencies)}-{n}", timeout=CALL_TIMEOUT)
        latencies.append(time.monotonic() - started)
        assert reply.text == f"far:{id(latencies)}-{n}"


async def start_server(children, misses: int) -> tuple[Child, str]:
    server = children("server", ANY_PORT, str(misses))
    return server, (await server.wait("ready"))["url"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_calls_meet_their_deadlines_over_a_slow_stalling_link_without_false_alarms(
    children, relays
) -> None:
    async def scenario() -> None:
        _server, url = await start_server(children, TOLERANT_MISSES)
        relay = Relay(url, delay=DELAY, jitter=JITTER, seed=1)
        relays.append(relay)
        async with pigeon.connect(
            relay.url, heartbeat=HEARTBEAT, heartbeat_misses=TOLERANT_MISSES
        ) as client:
            # The first handshake takes several round trips of 0.4 s or more,
            # longer than connect_grace (0.5 s): until it is done a call may
            # find nobody, so wait for the service before timing anything.
            await wait_for_service(client, "svc", timeout=WAIT)
            # A peer with a consumer that the server gave up would count in
            # its peers_lost (a bare caller would not).
            await client.consume(PROBE_QUEUE, lambda d: None)
            watch = LinkWatch(client)
            done = asyncio.Event()
            latencies: list[list[float]] = [[] for _ in range(CALLERS)]
            callers = [asyncio.ensure_future(call_until(client, done, lat)) for lat in latencies]
            try:
                await run_stalls(relay, STALLS)
            finally:
                done.set()
                await asyncio.gather(*callers)
                await watch.stop()
            every = [t for lat in latencies for t in lat]
            assert all(lat for lat in latencies), "every caller finished calls"
            # The faults were there: some call waited out a whole 1 s stall.
            assert max(every) >= 1.0, f"no call crossed a stall: {max(every):.2f} s"
            stats = client.stats()
            assert stats["request_retries"] == 0  # no call moved on: its server was never lost
            assert stats["late_replies"] == 0
            assert watch.downs == 0, "the client gave the link up"
            assert watch.up()
            far = await server_stats(client)
            assert far["peers_lost"] == 0, "the server gave the client up"
            assert far["queues"][PROBE_QUEUE]["consumers_lost"] == 0
            assert far["protocol_errors"] == 0
            assert relay.stats().cut == 0 and relay.stats().accepted == 1

    asyncio.run(asyncio.wait_for(scenario(), 160))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stall_past_the_heartbeat_grace_is_a_lost_peer_both_ends(children, relays) -> None:
    """The control for the test above: the same counters do see a peer loss
    when a stall outlasts the grace (here 0.5 s × 2)."""

    async def scenario() -> None:
        _server, url = await start_server(children, 2)
        relay = Relay(url, delay=DELAY, jitter=JITTER, seed=2)
        relays.append(relay)
        async with pigeon.connect(relay.url, heartbeat=HEARTBEAT, heartbeat_misses=2) as client:
            await wait_for_service(client, "svc", timeout=WAIT)
            await client.consume(PROBE_QUEUE, lambda d: None)
            watch = LinkWatch(client)
            relay.stall()
            try:
                # Stalled both ways: nothing comes back, so the link goes down
                # (and the server, hearing nothing, gives the client up).
                await wait_until(lambda: watch.downs >= 1, WAIT, "the client to give up the link")
                with pytest.raises(pigeon.NoResponders):
                    await client.request("svc", "anyone?", timeout=CALL_TIMEOUT)
                await asyncio.sleep(1.5)  # past the server's grace too
            finally:
                relay.heal()
            # Healed: the held Hellos arrive, the link comes back, calls work.
            await wait_until(watch.up, WAIT, "the link to come back")
            await wait_for_service(client, "svc", timeout=WAIT)
            await watch.stop()
            far = await server_stats(client)
            assert far["peers_lost"] >= 1
            assert far["queues"][PROBE_QUEUE]["consumers_lost"] >= 1

    asyncio.run(asyncio.wait_for(scenario(), 100))


# Test (b): a worker cut off from its host for longer than its lease.
QUEUE = "partition.jobs"
MESSAGES = 20
HELD = 5  # the cut-off worker's prefetch: what it holds when the cut comes
LEASE_TTL = 2.0
CUT_FOR = 10.0


def events(child: Child, kind: str) -> list[dict]:
    return [e for e in child.poll() if e["ev"] == kind]


async def link_becomes(child: Child, state: str, relay: Relay) -> None:
    """Wait until the worker says its link through ``relay`` is ``state``
    (``up`` or ``down``)."""
    try:
        await wait_until(lambda: link_state(child) == state, WAIT, f"the worker's link {state}")
    except AssertionError as exc:
        why = f"{exc}\n{relay.stats()}\nevents: {child.events}\n{child.describe()}"
        raise AssertionError(why) from None


def link_state(child: Child) -> str:
    """What the worker last said of its link: ``up``, ``down`` or nothing yet."""
    said = [e["ev"] for e in child.poll() if e["ev"] in ("up", "down")]
    if child.proc.poll() is not None:
        raise AssertionError(f"the worker exited\n{child.describe()}")
    return said[-1] if said else ""


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("durable", [False, True], ids=["memory", "durable"])
def test_a_worker_cut_off_past_its_lease_loses_its_leases_and_its_late_acks_are_stale(
    children, relays, tmp_path, durable
) -> None:
    store = str(tmp_path / "queues.db") if durable else None

    async def scenario() -> None:
        async with pigeon.connect(bind=ANY_PORT, heartbeat=HEARTBEAT, store=store) as host:
            relay = Relay(bound(host))
            relays.append(relay)
            cut_off = children("late_acking_worker", relay.url, QUEUE, str(HELD), str(LEASE_TTL))
            await cut_off.wait("ready")
            ids = [f"job-{i}" for i in range(MESSAGES)]
            for i, mid in enumerate(ids):
                await host.send(QUEUE, f"m{i}", message_id=mid)
            await wait_until(
                lambda: len(events(cut_off, "got")) == HELD, WAIT, "the worker to hold its share"
            )
            held = events(cut_off, "got")
            assert all(not e["redelivered"] and e["attempt"] == 1 for e in held), held
            held_ids = {e["id"] for e in held}

            assert relay.cut(refuse=True) == 1
            cut_at = time.monotonic()
            await link_becomes(cut_off, "down", relay)
            got: list[pigeon.Message] = []
            async with pigeon.connect(bound(host), heartbeat=HEARTBEAT) as other:
                await other.consume(QUEUE, lambda d: got.append(d.message))
                # While the partition lasts, the other worker gets the rest
                # and, once the leases are gone (lease expiry or the lost
                # heartbeats, whichever first), the cut-off worker's share.
                await wait_until(
                    lambda: host.stats()["queues"][QUEUE]["acked"] == MESSAGES,
                    WAIT,
                    "every message acked by the other worker",
                )
                await asyncio.sleep(max(0.0, cut_at + CUT_FOR - time.monotonic()))
                relay.heal()
                await link_becomes(cut_off, "up", relay)
                cut_off.tell("release")
                await cut_off.wait("released")
                # The late acks reach the host, which no longer leases those
                # messages to that worker: counted stale, applied nowhere.
                await wait_until(
                    lambda: host.stats()["queues"][QUEUE]["stale_settles"] >= HELD,
                    WAIT,
                    "the late acks to arrive",
                )
            late_acks = {e["id"] for e in events(cut_off, "acked")}
            assert late_acks == held_ids
            queue = host.stats()["queues"][QUEUE]
            assert queue["acked"] == MESSAGES  # each message acked once
            assert queue["stale_settles"] == HELD
            assert (queue["ready"], queue["in_flight"], queue["on_disk"]) == (0, 0, 0)
            assert queue["redelivered"] >= HELD
            assert queue["dead_lettered"] == 0
            # The other worker had every message once; the cut-off worker's
            # share came to it marked redelivered, the rest unmarked.
            assert sorted(m.id for m in got) == sorted(ids)
            for message in got:
                if message.id in held_ids:
                    assert message.redelivered and message.attempt >= 2, message
                else:
                    assert not message.redelivered and message.attempt == 1, message
            assert relay.stats().refused >= 1  # it did try to come back during the cut
        if durable:
            # Nothing acked comes back from disk, and the stale acks removed nothing twice.
            async with pigeon.connect(bind=ANY_PORT, store=store) as reopened:
                assert reopened.stats()["restored"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 160))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_send_made_during_a_partition_is_confirmed_after_heal(relays) -> None:
    queue = "partition.sends"

    async def scenario() -> None:
        async with pigeon.connect(bind=ANY_PORT, heartbeat=HEARTBEAT) as host:
            relay = Relay(bound(host))
            relays.append(relay)
            async with pigeon.connect(relay.url, heartbeat=HEARTBEAT) as producer:
                await producer.send(queue, "before", timeout=WAIT)
                relay.cut(refuse=True)
                during = asyncio.ensure_future(producer.send(queue, "during", timeout=WAIT))
                # The producer keeps reconnecting; each try is reset on arrival,
                # as a proxy in front of a host that is down would do.
                await wait_until(lambda: relay.stats().refused >= 3, WAIT, "three refused tries")
                relay.heal()
                await during  # kept unconfirmed, resent once the link is back
                assert host.stats()["queues"][queue]["ready"] == 2
                assert producer.stats()["auth_failures"] == 0  # it has no keys

    asyncio.run(asyncio.wait_for(scenario(), 100))
