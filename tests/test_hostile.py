"""Hostile and buggy peers against a real node, each beside a legit producer
and worker: the node stays up, every legit message is delivered, no legit
message is dead-lettered by another peer's settings, and what the peer made
the node hold stays bounded."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import msgspec
import psutil
import pytest
import zmq
import zmq.asyncio

import pigeon
from pigeon._core import frames, limits
from pigeon.message import Message, new_id

pytestmark = pytest.mark.timeout(120)

LEGIT = 200  # legit messages per scenario
RSS_BOUND = 200 << 20  # what one attack may add to this process
WAIT = 60.0  # upper bound for what takes a second or two when the machine is quiet


class Legit:
    """A producer and a worker doing honest work on ``jobs``."""

    def __init__(self, url: str, *, fail_first: bool = False) -> None:
        self.url = url
        self.fail_first = fail_first  # every job fails its first delivery
        self.got: set[str] = set()
        self.sent: list[str] = []

    def handle(self, delivery: pigeon.Delivery) -> None:
        if self.fail_first and delivery.message.attempt == 1:
            raise RuntimeError("try me again")
        self.got.add(delivery.message.text)

    async def run(self, attack: Callable[[], Awaitable[None]]) -> None:
        async with (
            pigeon.connect(self.url) as producer,
            pigeon.connect(self.url) as worker,
        ):
            await worker.consume(
                "jobs",
                self.handle,
                retry=pigeon.RetryPolicy(max_attempts=5, base_delay=0.01, jitter=0.0),
            )
            # The attack starts once the worker is registered at the node.
            deadline = time.monotonic() + WAIT
            while not worker.stats()["granted"] and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            attacking = asyncio.ensure_future(attack())
            for n in range(LEGIT):
                text = f"job-{n}"
                await producer.send("jobs", text, timeout=WAIT)
                self.sent.append(text)
                if n % 20 == 0:
                    await asyncio.sleep(0.01)
            await attacking
            deadline = time.monotonic() + WAIT
            while len(self.got) < LEGIT and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert self.got == set(self.sent), f"{LEGIT - len(self.got)} legit messages not delivered"


class Raw:
    """A hand-written peer speaking pigeon's frames, for saying what a
    well-behaved client never would."""

    def __init__(self, url: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(url)

    async def send(self, frame: frames.Frame) -> None:
        await self.sock.send(frames.encode(frame))

    async def send_raw(self, data: bytes) -> None:
        await self.sock.send(data)

    async def collect(self, seconds: float) -> list[frames.Frame]:
        got: list[frames.Frame] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await self.sock.poll(50):
                got += frames.decode_all(await self.sock.recv())
        return got

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def _dead_letters(node: pigeon.Connection) -> int:
    return int(node.stats()["queues"].get("jobs.dead", {}).get("ready", 0))


def _scenario(
    attack: Callable[[pigeon.Connection, str], Awaitable[None]],
    *,
    fail_first: bool = False,
    **node_options: object,
):
    async def scenario() -> pigeon.Connection:
        me = psutil.Process(os.getpid())
        before = me.memory_info().rss
        async with pigeon.connect(bind="tcp://127.0.0.1:0", **node_options) as node:
            url = node.stats()["bound"][0]
            await Legit(url, fail_first=fail_first).run(lambda: attack(node, url))
            assert _dead_letters(node) == 0, node.stats()["queues"]
            grown = me.memory_info().rss - before
            # Node, legit peers and attacker share this process.
            assert grown < RSS_BOUND, f"RSS grew by {grown >> 20} MiB"
            return node

    return asyncio.run(asyncio.wait_for(scenario(), 110))


def test_poison_attempt_counts_are_refused_or_reset() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        # Past the wire's bound: the frame is malformed.
        bomb = Message(id=new_id(), body=b"x", attempt=2**64 - 1)
        await raw.send_raw(b"\x01" + msgspec.msgpack.encode([2, "jobs", [bomb]]))
        # Inside the bound: the host counts deliveries itself, from 0.
        near = Message(id=new_id(), body=b"poison", attempt=limits.MAX_ATTEMPT)
        await raw.send(frames.Send("side", [near]))
        await raw.send(frames.Consume("side", 1))
        got = await raw.collect(1.0)
        delivered = [m for f in got if isinstance(f, frames.Deliver) for m in f.messages]
        assert [m.attempt for m in delivered] == [1]
        await raw.send(frames.Settle("side", nacks=[(delivered[0].id, 0.0, "again")]))
        got = await raw.collect(0.5)
        assert any(isinstance(f, frames.Deliver) for f in got)  # the node still answers
        raw.close()
        assert node.stats()["protocol_errors"] >= 1

    _scenario(attack)


def test_a_consumer_cannot_change_the_attempt_limit() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        # A hostile consumer of the same queue asks for max_attempts=1 and
        # leaves at once: nothing it asked changes what others get.
        await raw.send(frames.Consume("jobs", 1, 30.0, 1))
        await raw.send(frames.Cancel("jobs"))
        await raw.collect(0.3)
        raw.close()

    # Every legit job is delivered twice: a queue limit of 1 would kill them all.
    _scenario(attack, fail_first=True)


def test_a_hostage_consumer_gets_the_hosts_bounds() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        await raw.send(frames.Consume("jobs", limits.MAX_PREFETCH, limits.MAX_SECONDS))
        got = await raw.collect(1.0)
        verdicts = [f for f in got if isinstance(f, frames.Verdict)]
        assert verdicts and verdicts[0].allowed
        # Clamped to the host's policy, and told so.
        assert verdicts[0].prefetch == limits.DEFAULT_MAX_PREFETCH
        assert verdicts[0].lease_ttl == 5.0
        raw.close()  # vanishes holding what it took: heartbeats give it back

    _scenario(attack, heartbeat=0.5, lease_ttl=2.0, max_lease_ttl=5.0)


def test_a_flood_of_queue_names_is_bounded() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        for chunk in range(30):
            batch = [frames.encode(frames.Consume(f"flood-{chunk}-{n}", 1)) for n in range(500)]
            for start in range(0, len(batch), limits.MAX_BATCH_FRAMES):
                await raw.send_raw(frames.encode_batch(batch[start : start + 1000]))
            await raw.send(frames.Cancel(f"flood-{chunk}-0"))
        await raw.collect(1.0)
        raw.close()
        stats = node.stats()
        assert len(stats["queues"]) <= 2_000 + 2
        # One peer takes at most its share of the queue table.
        assert sum(q["consumers"] for q in stats["queues"].values()) <= 1_000 + 1

    _scenario(attack, max_queues=2_000, heartbeat=0.5)


def test_a_flood_of_subscriptions_is_bounded() -> None:
    """One peer making subscriptions (and never consuming them) gets its
    share, then a refusal that says why; others still subscribe."""

    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        subscribes = [
            frames.encode(frames.Subscribe(f"pigeon.tmp.flood.{n}", "flood.>")) for n in range(1500)
        ]
        for start in range(0, len(subscribes), limits.MAX_BATCH_FRAMES):
            await raw.send_raw(
                frames.encode_batch(subscribes[start : start + limits.MAX_BATCH_FRAMES])
            )
        await raw.send(frames.Consume("pigeon.tmp.flood.1499", 1))
        verdicts = [f for f in await raw.collect(1.0) if isinstance(f, frames.Verdict)]
        assert [(v.allowed, v.reason) for v in verdicts] == [
            (False, "a peer makes at most 1000 subscriptions here")
        ]
        raw.close()
        assert len(node.stats()["topics"]["subscriptions"]) == 1000
        async with pigeon.connect(url) as other:
            got: list[int] = []
            await other.subscribe("flood.>", lambda e: got.append(e.seq))
            await node.publish("flood.x", 1)
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [1]

    _scenario(attack, heartbeat=0.5)


def test_stats_requests_are_not_kept() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        for _ in range(2_000):
            request = frames.Request(new_id(), "pigeon.info", Message(id=new_id(), body=b""), 5.0)
            await raw.send(request)
        replies = [f for f in await raw.collect(2.0) if isinstance(f, frames.Reply)]
        assert replies
        raw.close()
        transport = node.transport
        router = transport.router  # type: ignore[attr-defined]
        assert len(router.responder.replies._entries) == 0

    _scenario(attack)


def test_a_batch_bomb_and_a_header_bomb_are_refused() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        one = frames.encode(frames.Cancel("nothing"))
        await raw.send_raw(frames.encode_batch([one] * (limits.MAX_BATCH_FRAMES + 1)))
        # 104 kB of headers on an empty body: over the node's 64 kB limit.
        fat = Message(id=new_id(), body=b"", headers={f"h{n}": "x" * 8000 for n in range(13)})
        await raw.send(frames.Send("jobs", [fat]))
        got = await raw.collect(1.0)
        refused = [f for f in got if isinstance(f, frames.Refuse)]
        assert refused and refused[0].refusals[0][1].value == "too large"
        raw.close()
        assert node.stats()["protocol_errors"] >= 1

    _scenario(attack, max_message_size=64 * 1024)


def test_a_burst_with_no_reader_meets_the_memory_alarm() -> None:
    async def scenario() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", max_memory=4 << 20) as node:
            url = node.stats()["bound"][0]
            async with pigeon.connect(url) as flooder:
                body = b"x" * (256 << 10)
                # 16 MiB offered at once, 4 MiB held at most.
                sends = [flooder.send_nowait("burst", body) for _ in range(64)]
                outcomes = await asyncio.gather(*sends, return_exceptions=True)
                refused = [o for o in outcomes if isinstance(o, pigeon.Backpressure)]
                assert refused and all(o is None or o in refused for o in outcomes)
                stats = node.stats()
                assert stats["bytes_held"] <= (4 << 20) + len(body)
                assert stats["memory_refused"] > 0
                # The queue that filled the node waits; another still takes sends.
                await flooder.send("drained", b"small", timeout=WAIT)
                with pytest.raises(pigeon.Backpressure):
                    await flooder.send_nowait("burst", body)
            # Nothing accepted is dropped: a consumer gets every stored one.
            held = node.stats()["queues"]["burst"]["ready"]
            got: list[int] = []
            async with pigeon.connect(url) as reader:
                await reader.consume("burst", lambda d: got.append(len(d.message.body)))
                deadline = time.monotonic() + WAIT
                while len(got) < held and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert len(got) == held
            # With room again, sends are taken again.
            async with pigeon.connect(url) as producer:
                await producer.send("burst", body, timeout=WAIT)

    asyncio.run(asyncio.wait_for(scenario(), 110))


def test_a_consumer_that_never_settles_holds_only_its_first_window() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        await raw.send(frames.Consume("jobs", limits.MAX_PREFETCH, limits.MAX_SECONDS))
        got = await raw.collect(1.5)  # takes, never settles
        taken = [m for f in got if isinstance(f, frames.Deliver) for m in f.messages]
        assert 0 < len(taken) <= limits.DEFAULT_INITIAL_CREDIT
        raw.close()

    _scenario(attack, heartbeat=0.5)


def test_a_peer_that_never_reads_its_answers() -> None:
    async def attack(node: pigeon.Connection, url: str) -> None:
        raw = Raw(url)
        raw.sock.rcvhwm = 1  # and it never calls recv: every answer piles up
        body = b"u" * 1024
        for _ in range(2_000):
            await raw.send(frames.Send("unread", [Message(id=new_id(), body=body)]))
        await asyncio.sleep(0.5)
        raw.close()
        assert node.stats()["queues"]["unread"]["ready"] > 0

    _scenario(attack)


def test_one_caller_cannot_take_every_handler() -> None:
    from pigeon._core.budget import MAX_PEER_REQUESTS

    release = asyncio.Event()

    async def slow(message: pigeon.Message) -> bytes:
        if message.body == b"block":
            await release.wait()
        return message.body

    async def attack(node: pigeon.Connection, url: str) -> None:
        await node.serve("slow", slow)
        raw = Raw(url)
        extra = 50
        for _ in range(MAX_PEER_REQUESTS + extra):
            request = frames.Request(new_id(), "slow", Message(id=new_id(), body=b"block"), 30.0)
            await raw.send(request)
        replies = [f for f in await raw.collect(1.0) if isinstance(f, frames.Reply)]
        busy = [r for r in replies if r.error_kind == "Busy"]
        assert len(busy) == extra and len(replies) == extra  # the rest still run
        # Another caller is served meanwhile, and is told nothing about the first.
        async with pigeon.connect(url) as caller:
            assert (await caller.request("slow", b"hello", timeout=WAIT)).body == b"hello"
        release.set()
        answered = [f for f in await raw.collect(1.0) if isinstance(f, frames.Reply)]
        assert len(answered) == MAX_PEER_REQUESTS and not any(r.error_kind for r in answered)
        raw.close()
        assert node.stats()["peer_busy"] == extra

    _scenario(attack)


def test_repeats_of_a_running_request_wait_within_a_bound() -> None:
    from pigeon.transports.zmq.responder import MAX_WAITERS

    release = asyncio.Event()

    async def slow(message: pigeon.Message) -> bytes:
        await release.wait()
        return b"done"

    async def attack(node: pigeon.Connection, url: str) -> None:
        await node.serve("slow", slow)
        raw = Raw(url)
        request = frames.Request(new_id(), "slow", Message(id=new_id(), body=b""), 30.0)
        repeats = 5_000
        for _ in range(repeats):  # the same id, again and again, while it runs
            await raw.send(request)
        busy = [f for f in await raw.collect(1.0) if isinstance(f, frames.Reply)]
        router = node.transport.router  # type: ignore[attr-defined]
        assert [len(w) for w in router.responder._running.values()] == [MAX_WAITERS]
        assert len(busy) == repeats - MAX_WAITERS and all(r.error_kind == "Busy" for r in busy)
        release.set()
        answered = [f for f in await raw.collect(1.0) if isinstance(f, frames.Reply)]
        assert [r.message.body for r in answered] == [b"done"] * MAX_WAITERS
        assert node.stats()["peer_busy"] == repeats - MAX_WAITERS
        raw.close()

    _scenario(attack)
