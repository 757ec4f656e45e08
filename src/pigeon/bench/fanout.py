"""``pigeon bench fanout``: one publisher to 1 and to 4 subscribers, each in
its own process, for pigeon, raw pyzmq PUB/SUB and nats-py core pub-sub.

The figure of a row is deliveries/s: the messages received by all the
subscribers together ÷ (last delivery − first publish). Every row also
says what was published (``sent``) and what never arrived (``lost`` =
sent × subscribers − received); pigeon's rows add what its subscribers
counted as gaps (``gaps``, ``missed``: ``sub.stats()``), what its topic
host dropped (``dropped``: ``stats()["topics"]``), and ``uncounted``: the
lost messages no subscriber saw as missed (0 when every gap is counted).

pigeon is measured in the shape a user writes, over tcp loopback:

- ``hub node``: a standalone ``pigeon node --bind`` process hosts the
  topics; the publisher and the subscribers connect to it.
- ``publisher binds``: the publisher's own node binds and hosts them; the
  subscribers connect to it (the seed's fountain shape).

The publisher is a plain loop: ``await conn.publish(topic, body)`` per
message, or ``conn.publish_nowait(topic, body)`` per message with one
``await conn.flush()`` at the end (and a flush whenever ``publish_nowait``
raises Backpressure: the connection holds 100,000 unconfirmed sends).
Subscribers are ``await conn.subscribe(pattern, async_handler)`` with the
defaults (``drop-oldest``, buffer 10,000, prefetch 64).

Raw pyzmq: PUB binds, the SUBs connect and subscribe to everything; the PUB
sends a warm-up message every 10 ms until every SUB has received one (the
slow-joiner barrier), then the data, then a sentinel every 10 ms until every
SUB has seen it. Default HWM: PUB drops silently what a SUB cannot take.
nats-py: core NATS ``publish``/``subscribe`` on a subject unique to the run,
each subscriber its own connection (no queue group).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from pigeon.bench.harness import (
    ANY_PORT,
    CTX,
    GRACE_S,
    Children,
    Ctl,
    Skip,
    pigeon_node,
    poll_until,
    port_of,
    reporting,
    wait_stop,
    wait_workers_async,
)
from pigeon.bench.shapes import _wait, collect

TOPIC = "bench.fanout.ticks"
PATTERN = "bench.fanout.>"
LOCAL = "tcp://127.0.0.1"
# Once publishing is over, the drain ends when every subscriber has all it
# will get: all of it, or (for a lossy row) nothing new for QUIET_S seconds.
QUIET_S = 1.0
INFO_SERVICE = "pigeon.info"  # a node's stats, asked of the hub


# --------------------------------------------------------------------- shape


def run_fanout(
    publisher: Callable[..., Any],
    subscriber: Callable[..., Any],
    cfg: dict[str, Any],
    seconds: float,
    n_subs: int,
) -> dict[str, Any]:
    """One publisher process, ``n_subs`` subscriber processes; the row.

    The publisher sets ``bound`` once subscribers may connect, waits until
    every subscriber is ready (``ctl.ready``), publishes for ``seconds``,
    sets ``sent`` and ``done``. A subscriber publishes its count and the time
    of its last delivery every 10 ms, and adds itself to ``finished`` once it
    has all it will get. After the drain the parent sets ``stop``; each
    child then puts one result dict (a subscriber's has ``received`` and,
    for pigeon, its gap counts; the publisher's may have ``dropped``).
    """
    finished = CTX.Value("i", 0)
    ctl = Ctl(n_subs, dict(cfg, seconds=seconds, finished=finished))
    drain_s = max(GRACE_S, 4 * seconds)
    with Children(ctl) as kids:
        kids.start(publisher, ctl)
        _wait(ctl.bound.is_set, GRACE_S, "publisher to be ready", kids)
        for i in range(n_subs):
            kids.start(subscriber, ctl, i)
        _wait(ctl.done.is_set, 2 * GRACE_S + seconds, "publisher to finish", kids)
        sent = ctl.sent.value
        deadline = time.monotonic() + drain_s
        seen, quiet_since = -1, time.monotonic()
        while finished.value < n_subs and time.monotonic() < deadline:
            if bad := kids.failed():
                raise Skip(f"child failed: {', '.join(bad)}")
            total = sum(ctl.counts)
            if total != seen:
                seen, quiet_since = total, time.monotonic()
            elif time.monotonic() - quiet_since > QUIET_S:
                break
            time.sleep(0.01)
        ctl.stop.set()
        reports = collect(ctl, n_subs + 1, GRACE_S, kids)
        kids.finish(GRACE_S)
        if bad := kids.failed():
            raise Skip(f"child failed: {', '.join(bad)}")
    subs = [r for r in reports if r.get("role") == "subscriber"]
    (pub,) = [r for r in reports if r.get("role") == "publisher"]
    received = sum(r["received"] for r in subs)
    if received == 0:
        raise Skip("no message was delivered")
    elapsed = max(ctl.last) - ctl.t0.value
    row: dict[str, Any] = {
        "msgs_per_s": received / elapsed,
        "subscribers": n_subs,
        "size": cfg["size"],
        "sent": sent,
        "received": received,
        "lost": sent * n_subs - received,
    }
    notes = [f"lost {row['lost']} of {sent * n_subs}"] if row["lost"] else []
    if "missed" in subs[0]:  # pigeon: what the subscribers and the host counted
        row["gaps"] = sum(r["gaps"] for r in subs)
        row["missed"] = sum(r["missed"] for r in subs)
        row["dropped"] = pub.get("dropped")
        row["uncounted"] = row["lost"] - row["missed"]
        before_first = sum(r["first_seq"] - 1 for r in subs if r["first_seq"])
        if before_first:
            notes.append(f"{before_first} of them before a subscriber's first delivery (counted)")
        if repeats := sum(r["repeats"] for r in subs):
            notes.append(f"{repeats} repeats")
        if redelivered := sum(r["redelivered"] for r in subs):
            notes.append(f"{redelivered} first deliveries flagged redelivered")
        if unhandled := sum(r["delivered"] for r in subs) - received:
            notes.append(f"{unhandled} delivered but never handled")
    row["note"] = "; ".join(notes) or None
    return row


class _Seen:
    """A subscriber's tally: count, time of the last delivery, and (pigeon)
    the first and last topic numbers it got."""

    __slots__ = ("n", "last", "first_seq", "last_seq")

    def __init__(self) -> None:
        self.n = 0
        self.last = 0.0
        self.first_seq = 0
        self.last_seq = 0


async def _report_until_stop(ctl: Ctl, i: int, seen: _Seen, has_all: Callable[[], bool]) -> None:
    """Every 10 ms: publish the tally; once ``has_all()``, count this
    subscriber finished (once). Returns when the parent says stop."""
    finished = False

    def tick() -> bool:
        nonlocal finished
        ctl.last[i] = seen.last
        ctl.counts[i] = seen.n
        if not finished and ctl.done.is_set() and has_all():
            finished = True
            with ctl.cfg["finished"].get_lock():
                ctl.cfg["finished"].value += 1
        return bool(ctl.stop.is_set())

    await poll_until(tick)
    ctl.last[i] = seen.last
    ctl.counts[i] = seen.n


# -------------------------------------------------------------------- pigeon


async def publish_awaited(conn: Any, body: bytes, end: float) -> int:
    """``await conn.publish`` one message at a time."""
    n = 0
    while time.perf_counter() < end:
        await conn.publish(TOPIC, body)
        n += 1
    return n


async def publish_nowait_flushed(conn: Any, body: bytes, end: float) -> int:
    """``conn.publish_nowait`` per message; ``await conn.flush()`` at the end,
    and whenever the connection's unconfirmed sends are full (Backpressure)."""
    import pigeon

    publish = conn.publish_nowait
    n = 0
    while time.perf_counter() < end:
        try:
            publish(TOPIC, body)
        except pigeon.Backpressure:
            await conn.flush()
            continue
        n += 1
    await conn.flush()
    return n


PUBLISH_STYLES: dict[str, Callable[[Any, bytes, float], Awaitable[int]]] = {
    "await publish": publish_awaited,
    "publish_nowait": publish_nowait_flushed,
}


def pigeon_publisher(ctl: Ctl) -> None:
    """Publisher process: connects to the hub (``cfg["url"]``) or binds."""
    with reporting(ctl):
        asyncio.run(_pigeon_publisher(ctl))


async def _pigeon_publisher(ctl: Ctl) -> None:
    import pigeon

    url = ctl.cfg.get("url")
    where: dict[str, Any] = {"url": url} if url else {"bind": ANY_PORT}
    async with pigeon.connect(**where) as conn:
        if not url:
            ctl.port.value = port_of(conn.stats()["bound"][0])
        ctl.bound.set()
        await wait_workers_async(ctl)

        async def subscriptions() -> int:
            return len((await _topic_stats(conn, url))["subscriptions"])

        deadline = time.monotonic() + GRACE_S
        while await subscriptions() < ctl.n_workers:  # every one bound at the host
            if time.monotonic() > deadline:
                raise TimeoutError("the subscriptions did not reach the host")
            await asyncio.sleep(0.01)
        publish_for = PUBLISH_STYLES[ctl.cfg["style"]]
        body = b"x" * ctl.cfg["size"]
        t0 = time.perf_counter()
        ctl.t0.value = t0
        sent = await publish_for(conn, body, t0 + ctl.cfg["seconds"])
        ctl.sent.value = sent
        ctl.done.set()
        await wait_stop(ctl)
        topics = await _topic_stats(conn, url)
        ctl.results.put(
            {
                "role": "publisher",
                **{k: topics[k] for k in ("published", "dropped", "refused", "blocked")},
            }
        )


async def _topic_stats(conn: Any, url: str | None) -> dict[str, Any]:
    """The topic host's stats: this node's, or the hub's (``pigeon.info``)."""
    if not url:
        topics: dict[str, Any] = conn.stats()["topics"]
        return topics
    reply = await conn.request(INFO_SERVICE, {"limit": 1}, timeout=10.0)
    found: dict[str, Any] = reply.decode()["topics"]
    return found


def pigeon_subscriber(ctl: Ctl, i: int) -> None:
    """Subscriber process: connects (to the hub or the publisher) and
    subscribes with an async handler and the defaults."""
    with reporting(ctl):
        asyncio.run(_pigeon_subscriber(ctl, i))


async def _pigeon_subscriber(ctl: Ctl, i: int) -> None:
    import pigeon

    seen = _Seen()
    clock = time.perf_counter

    async def handle(event: pigeon.Event) -> None:
        seen.n += 1
        seen.last = clock()
        seen.last_seq = event.seq
        if not seen.first_seq:
            seen.first_seq = event.seq

    url = ctl.cfg.get("url") or f"{LOCAL}:{ctl.port.value}"
    async with pigeon.connect(url) as conn:
        sub = await conn.subscribe(PATTERN, handle)
        ctl.worker_ready()
        await _report_until_stop(ctl, i, seen, lambda: seen.last_seq >= ctl.sent.value)
        stats = sub.stats()
        ctl.results.put(
            {
                "role": "subscriber",
                "received": seen.n,
                "first_seq": seen.first_seq,
                "delivered": stats["received"],  # to the subscriber, handled or not
                **{k: stats[k] for k in ("gaps", "missed", "repeats", "redelivered")},
            }
        )


def _pigeon(opts: Any, subscribers: int, style: str, hub: bool) -> dict[str, Any]:
    cfg = {"size": opts.sizes[0], "style": style}
    if not hub:
        return run_fanout(pigeon_publisher, pigeon_subscriber, cfg, opts.seconds, subscribers)
    with pigeon_node() as node:
        cfg["url"] = node.url
        return run_fanout(pigeon_publisher, pigeon_subscriber, cfg, opts.seconds, subscribers)


def hub_await_publish(opts: Any, subscribers: int) -> dict[str, Any]:
    """A `pigeon node` hosts the topic; the publisher awaits each publish."""
    return _pigeon(opts, subscribers, "await publish", hub=True)


def hub_publish_nowait(opts: Any, subscribers: int) -> dict[str, Any]:
    """A `pigeon node` hosts the topic; publish_nowait, one flush at the end."""
    return _pigeon(opts, subscribers, "publish_nowait", hub=True)


def binds_await_publish(opts: Any, subscribers: int) -> dict[str, Any]:
    """The publisher's node binds and hosts the topic; it awaits each publish."""
    return _pigeon(opts, subscribers, "await publish", hub=False)


def binds_publish_nowait(opts: Any, subscribers: int) -> dict[str, Any]:
    """The publisher's node binds and hosts the topic; publish_nowait, one flush."""
    return _pigeon(opts, subscribers, "publish_nowait", hub=False)


# --------------------------------------------------------------- raw pyzmq


def _control(kind: bytes, size: int) -> bytes:
    """A warm-up or sentinel message: one byte longer than a data message,
    so a SUB tells them apart by length alone."""
    return kind * (size + 1)


def zmq_publisher(ctl: Ctl) -> None:
    """PUB bound on a random port: barrier, data for ``seconds``, sentinel."""
    import zmq

    with reporting(ctl):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUB)
        ctl.port.value = sock.bind_to_random_port(LOCAL)
        ctl.bound.set()
        size = ctl.cfg["size"]
        warm, sentinel = _control(b"w", size), _control(b"s", size)
        deadline = time.monotonic() + GRACE_S
        while ctl.ready.value < ctl.n_workers:  # every SUB got a warm-up
            if time.monotonic() > deadline:
                raise TimeoutError("subscribers did not join")
            sock.send(warm)
            time.sleep(0.01)
        body = b"x" * size
        send = sock.send
        n = 0
        t0 = time.perf_counter()
        end = t0 + ctl.cfg["seconds"]
        ctl.t0.value = t0
        while True:
            for _ in range(1000):  # check the clock only every 1000 sends
                send(body)
            n += 1000
            if time.perf_counter() >= end:
                break
        ctl.sent.value = n
        ctl.done.set()
        while not ctl.stop.wait(0.01):
            send(sentinel)
        ctl.results.put({"role": "publisher"})
        sock.close(linger=0)
        ctx.term()


def zmq_subscriber(ctl: Ctl, i: int) -> None:
    """SUB connected to the PUB, subscribed to everything; counts until the
    sentinel."""
    import zmq

    with reporting(ctl):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.rcvtimeo = 50  # wake up regularly to publish the tally and see stop
        sock.connect(f"{LOCAL}:{ctl.port.value}")
        size = ctl.cfg["size"]
        warm = _control(b"w", size)
        recv = sock.recv
        while True:  # the barrier: the PUB knows of us once we hear it
            try:
                if recv() == warm:
                    break
            except zmq.Again:
                if ctl.stop.is_set():
                    raise TimeoutError("no warm-up message arrived") from None
        ctl.worker_ready()
        clock = time.perf_counter
        n, last = 0, 0.0
        ended = False
        while not ended and not ctl.stop.is_set():
            try:
                while True:
                    m = recv()
                    if len(m) == size:
                        last = clock()
                        n += 1
                        if not n & 0x3FF:
                            ctl.last[i], ctl.counts[i] = last, n
                    elif m[:1] == b"s":
                        ended = True
                        break
            except zmq.Again:
                pass
            ctl.last[i], ctl.counts[i] = last, n
        if ended:
            with ctl.cfg["finished"].get_lock():
                ctl.cfg["finished"].value += 1
        ctl.stop.wait(10 * GRACE_S)
        ctl.results.put({"role": "subscriber", "received": n})
        sock.close(linger=0)
        ctx.term()


def pyzmq_pub_sub(opts: Any, subscribers: int) -> dict[str, Any]:
    """Raw pyzmq PUB → ``subscribers`` SUBs, default HWM (PUB drops silently)."""
    cfg = {"size": opts.sizes[0]}
    return run_fanout(zmq_publisher, zmq_subscriber, cfg, opts.seconds, subscribers)


# ------------------------------------------------------------------ nats-py


def nats_publisher(ctl: Ctl) -> None:
    """Core NATS publisher: ``publish`` without awaiting anything per message."""
    with reporting(ctl):
        asyncio.run(_nats_publisher(ctl))


async def _nats_publisher(ctl: Ctl) -> None:
    from pigeon.bench.peers_nats import _connect

    cfg = ctl.cfg
    nc = await _connect(cfg["url"])
    ctl.bound.set()
    await wait_workers_async(ctl)
    body, subject = b"x" * cfg["size"], cfg["subject"]
    publish = nc.publish
    n = 0
    t0 = time.perf_counter()
    end = t0 + cfg["seconds"]
    ctl.t0.value = t0
    while time.perf_counter() < end:
        for _ in range(100):
            await publish(subject, body)
        n += 100
    await nc.flush()
    ctl.sent.value = n
    ctl.done.set()
    await wait_stop(ctl)
    ctl.results.put({"role": "publisher"})
    await nc.close()


def nats_subscriber(ctl: Ctl, i: int) -> None:
    """Core NATS subscriber on its own connection (every one gets everything)."""
    with reporting(ctl):
        asyncio.run(_nats_subscriber(ctl, i))


async def _nats_subscriber(ctl: Ctl, i: int) -> None:
    from pigeon.bench.peers_nats import _connect

    nc = await _connect(ctl.cfg["url"])
    seen = _Seen()
    clock = time.perf_counter

    async def handle(msg: Any) -> None:
        seen.n += 1
        seen.last = clock()

    await nc.subscribe(
        ctl.cfg["subject"], cb=handle, pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30
    )
    await nc.flush()  # the subscription is registered on the server
    ctl.worker_ready()
    await _report_until_stop(ctl, i, seen, lambda: seen.n >= ctl.sent.value)
    ctl.results.put({"role": "subscriber", "received": seen.n})
    await nc.close()


def nats_pub_sub(opts: Any, subscribers: int) -> dict[str, Any]:
    """nats-py core publish → ``subscribers`` subscriptions, no queue group."""
    cfg = {
        "size": opts.sizes[0],
        "url": opts.nats_url,
        "subject": f"pigeonbench.fanout.{uuid.uuid4().hex[:12]}",
    }
    return run_fanout(nats_publisher, nats_subscriber, cfg, opts.seconds, subscribers)
