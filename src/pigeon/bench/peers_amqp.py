"""RabbitMQ peers through aio-pika: transient and durable queues, RPC.

The producer declares a uniquely named queue; three worker processes consume
it with a prefetch window and ack each message.  Durable runs use persistent
messages and publisher confirms with 256 publishes in flight (awaiting each
confirm in turn is ~4× slower and not how anyone would publish in bulk).
The parent deletes the queue afterwards even if a child died.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pigeon.bench.harness import (
    Ctl,
    Skip,
    Tally,
    find_server_pid,
    publish_until_stop,
    reporting,
    wait_stop,
    wait_workers_async,
)
from pigeon.bench.shapes import run_backlog, run_callers, run_queue, run_rpc

IN_FLIGHT = 256
PREFETCH = 256
# Above this backlog the row would take minutes (publish ≈ 3 k/s measured
# here), so it is skipped with that reason instead.
BACKLOG_MAX = 50_000


def _cfg(opts: Any, **extra: Any) -> dict[str, Any]:
    return {"url": opts.amqp_url, "queue": f"pigeonbench.{uuid.uuid4().hex[:12]}", **extra}


async def _connect(url: str) -> Any:
    import aio_pika

    return await aio_pika.connect(url, timeout=2)


def _delete_queue(cfg: dict[str, Any]) -> None:
    async def go() -> None:
        conn = await _connect(cfg["url"])
        async with conn:
            channel = await conn.channel()
            await channel.queue_delete(cfg["queue"])

    asyncio.run(go())


@contextlib.contextmanager
def _own_queue(opts: Any, **kw: Any) -> Iterator[dict[str, Any]]:
    """A config with its own queue name; the queue is deleted afterwards."""
    cfg = _cfg(opts, **kw)
    try:
        yield cfg
    finally:
        _delete_queue(cfg)


async def _publisher(conn: Any, cfg: dict[str, Any]) -> Any:
    """Return ``publish(body)``: confirmed and pipelined when ``confirm`` (or ``durable``)."""
    import aio_pika

    durable = cfg.get("durable", False)
    confirm = cfg.get("confirm", durable)
    channel = await conn.channel(publisher_confirms=confirm)
    await channel.declare_queue(cfg["queue"], durable=durable)
    exchange, key = channel.default_exchange, cfg["queue"]
    mode = aio_pika.DeliveryMode.PERSISTENT if durable else aio_pika.DeliveryMode.NOT_PERSISTENT
    if not confirm:

        async def publish(body: bytes) -> None:
            await exchange.publish(aio_pika.Message(body, delivery_mode=mode), key)

        publish.drain = _nothing  # type: ignore[attr-defined]
        return publish

    slots = asyncio.Semaphore(IN_FLIGHT)
    tasks: set[asyncio.Task[Any]] = set()

    async def one(body: bytes) -> None:
        try:
            await exchange.publish(aio_pika.Message(body, delivery_mode=mode), key)
        finally:
            slots.release()

    async def publish_confirmed(body: bytes) -> None:
        await slots.acquire()
        task = asyncio.create_task(one(body))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def drain() -> None:
        await asyncio.gather(*tasks)

    publish_confirmed.drain = drain  # type: ignore[attr-defined]
    return publish_confirmed


async def _nothing() -> None:
    pass


# --------------------------------------------------------------------- queue


def queue_producer(ctl: Ctl) -> None:
    """Declares the queue and publishes for ``seconds``."""
    with reporting(ctl):
        asyncio.run(_queue_producer(ctl))


async def _queue_producer(ctl: Ctl) -> None:
    conn = await _connect(ctl.cfg["url"])
    async with conn:
        publish = await _publisher(conn, ctl.cfg)
        ctl.bound.set()
        await wait_workers_async(ctl)
        body = b"x" * ctl.cfg["size"]
        n = 0
        t0 = time.perf_counter()
        end = t0 + ctl.cfg["seconds"]
        ctl.t0.value = t0
        while time.perf_counter() < end:
            for _ in range(100):
                await publish(body)
            n += 100
        await publish.drain()
        ctl.sent.value = n
        ctl.done.set()
        await wait_stop(ctl)


def queue_worker(ctl: Ctl, i: int) -> None:
    """Consumes with prefetch and acks each message."""
    with reporting(ctl):
        asyncio.run(_queue_worker(ctl, i))


async def _queue_worker(ctl: Ctl, i: int) -> None:
    tally = Tally()
    clock = time.perf_counter
    conn = await _connect(ctl.cfg["url"])
    async with conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(ctl.cfg["queue"])

        async def handle(message: Any) -> None:
            await message.ack()
            tally.n += 1
            tally.last = clock()

        await queue.consume(handle)
        ctl.worker_ready()
        await publish_until_stop(ctl, i, tally)


def queue(opts: Any, size: int) -> dict[str, Any]:
    """Transient queue, 3 consumers, acks."""
    with _own_queue(opts, size=size) as cfg:
        return run_queue(queue_producer, queue_worker, cfg, opts.seconds)


def queue_durable(opts: Any, size: int) -> dict[str, Any]:
    """Durable queue, persistent messages, pipelined publisher confirms."""
    with _own_queue(opts, size=size, durable=True) as cfg:
        return run_queue(queue_producer, queue_worker, cfg, opts.seconds)


# ----------------------------------------------------------------------- rpc


def rpc_server(ctl: Ctl) -> None:
    """Consumes requests, replies to ``reply_to`` with the ``correlation_id``."""
    with reporting(ctl):
        asyncio.run(_rpc_server(ctl))


async def _rpc_server(ctl: Ctl) -> None:
    import aio_pika

    conn = await _connect(ctl.cfg["url"])
    async with conn:
        channel = await conn.channel()
        queue = await channel.declare_queue(ctl.cfg["queue"], auto_delete=True)
        exchange = channel.default_exchange

        async def echo(message: Any) -> None:
            reply = aio_pika.Message(message.body, correlation_id=message.correlation_id)
            await exchange.publish(reply, routing_key=message.reply_to)

        # no_ack on both sides: an RPC retried by its caller needs no broker ack.
        await queue.consume(echo, no_ack=True)
        ctl.bound.set()
        await wait_stop(ctl)


def rpc_client(ctl: Ctl) -> None:
    """Exclusive reply queue + a future per correlation id."""
    with reporting(ctl):
        asyncio.run(_rpc_client(ctl))


async def _rpc_client(ctl: Ctl) -> None:
    import aio_pika

    conn = await _connect(ctl.cfg["url"])
    async with conn:
        channel = await conn.channel()
        replies = await channel.declare_queue(exclusive=True)
        waiting: dict[str, asyncio.Future[Any]] = {}

        async def on_reply(message: Any) -> None:
            fut = waiting.pop(message.correlation_id, None)
            if fut is not None and not fut.done():
                fut.set_result(message.body)

        await replies.consume(on_reply, no_ack=True)
        exchange, key, loop = channel.default_exchange, ctl.cfg["queue"], asyncio.get_running_loop()

        async def call(body: bytes) -> None:
            cid = uuid.uuid4().hex
            fut = waiting[cid] = loop.create_future()
            await exchange.publish(
                aio_pika.Message(body, correlation_id=cid, reply_to=replies.name), key
            )
            await asyncio.wait_for(fut, 5.0)

        ctl.results.put(await run_callers(call, ctl.cfg["window"], ctl.cfg["seconds"]))


def rpc_latency(opts: Any) -> dict[str, Any]:
    """aio-pika RPC, one in flight."""
    with _own_queue(opts, window=1) as cfg:
        return run_rpc(rpc_server, rpc_client, cfg, opts.seconds)


def rpc_throughput(opts: Any) -> dict[str, Any]:
    """aio-pika RPC, 100 concurrent."""
    with _own_queue(opts, window=100) as cfg:
        return run_rpc(rpc_server, rpc_client, cfg, opts.seconds)


# ------------------------------------------------------------------- backlog


def backlog_holder(ctl: Ctl) -> None:
    """Publishes the backlog (transient, confirmed); the broker holds it."""
    with reporting(ctl):
        asyncio.run(_backlog_holder(ctl))


async def _backlog_holder(ctl: Ctl) -> None:
    conn = await _connect(ctl.cfg["url"])
    async with conn:
        publish = await _publisher(conn, ctl.cfg)
        ctl.bound.set()
        body = b"x" * ctl.cfg["size"]
        ctl.t0.value = time.perf_counter()
        for _ in range(ctl.cfg["count"]):
            await publish(body)
        await publish.drain()
        ctl.done.set()
        await wait_stop(ctl)


def backlog_worker(ctl: Ctl, i: int) -> None:
    """Drains the queue with one consumer and acks."""
    with reporting(ctl):
        asyncio.run(_backlog_worker(ctl))


async def _backlog_worker(ctl: Ctl) -> None:
    count, clock = ctl.cfg["count"], time.perf_counter
    tally = Tally()
    finished = asyncio.Event()
    conn = await _connect(ctl.cfg["url"])
    async with conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(ctl.cfg["queue"])

        async def handle(message: Any) -> None:
            await message.ack()
            tally.n += 1
            if tally.n == count:
                tally.last = clock()
                finished.set()

        t0 = clock()
        await queue.consume(handle)
        await asyncio.wait_for(finished.wait(), 10 * count / 1000 + 30)
    ctl.results.put({"n": count, "elapsed": tally.last - t0})


def backlog(opts: Any) -> dict[str, Any]:
    """Queue filled first (confirmed), then drained by one consumer."""
    if opts.count > BACKLOG_MAX:
        raise Skip(
            f"too slow at this size: ~{2 * opts.count / 3_000:.0f} s estimated "
            f"(publish and drain ≈ 3 k/s each); use --count {BACKLOG_MAX} or less "
            "to include it"
        )
    pid = find_server_pid("beam.smp")
    if pid is None:
        raise Skip("RabbitMQ (beam.smp) process not visible here, so its RSS cannot be sampled")
    # Confirmed publishes, so "queued" really means the broker holds them all.
    with _own_queue(opts, size=100, durable=False, confirm=True) as cfg:
        return run_backlog(backlog_holder, backlog_worker, cfg, opts.count, rss_pid=pid)
