"""NATS peers through nats-py: core queue group, JetStream, request-reply.

Written the way the nats-py documentation recommends for speed: core publish
without awaiting anything per message, JetStream ``publish_async`` with the
client's own in-flight window, durable pull consumers with ``fetch`` batches.
Every subject and stream name is unique per run, and streams are deleted by
the parent afterwards even if a child died.
"""

from __future__ import annotations

import asyncio
import time
import uuid
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

# Above this backlog the JetStream row would take minutes (publish ≈ 30 k/s,
# drain ≈ 19 k/s measured here), so it is skipped with that reason instead.
BACKLOG_MAX = 300_000


async def _connect(url: str) -> Any:
    import nats

    async def quiet(exc: Exception) -> None:
        # Slow-consumer notices are expected when a core publisher outruns its
        # subscribers; the loss shows up in the delivered count instead.
        pass

    return await nats.connect(url, connect_timeout=2, allow_reconnect=False, error_cb=quiet)


def _cfg(opts: Any, **extra: Any) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    return {
        "url": opts.nats_url,
        "subject": f"pigeonbench.{tag}",
        "stream": f"PIGEONBENCH_{tag}",
        **extra,
    }


async def _make_stream(js: Any, cfg: dict[str, Any]) -> None:
    """File-backed work-queue stream plus one durable pull consumer shared by workers."""
    from nats.js.api import AckPolicy, RetentionPolicy, StorageType

    await js.add_stream(
        name=cfg["stream"],
        subjects=[cfg["subject"]],
        storage=StorageType.FILE,
        retention=RetentionPolicy.WORK_QUEUE,
    )
    await js.add_consumer(
        cfg["stream"], durable_name="workers", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000
    )


def _delete_stream(cfg: dict[str, Any]) -> None:
    async def go() -> None:
        nc = await _connect(cfg["url"])
        try:
            await nc.jetstream().delete_stream(cfg["stream"])
        except Exception:  # noqa: BLE001 - the stream may never have been created
            pass
        await nc.close()

    asyncio.run(go())


# --------------------------------------------------------------------- queue


def queue_producer(ctl: Ctl) -> None:
    """Core NATS publisher (or JetStream ``publish_async`` when ``js``)."""
    with reporting(ctl):
        asyncio.run(_queue_producer(ctl))


async def _queue_producer(ctl: Ctl) -> None:
    cfg = ctl.cfg
    nc = await _connect(cfg["url"])
    js = nc.jetstream(publish_async_max_pending=4000) if cfg.get("js") else None
    if js:
        await _make_stream(js, cfg)
    ctl.bound.set()
    await wait_workers_async(ctl)
    body, subject = b"x" * cfg["size"], cfg["subject"]
    publish = js.publish_async if js else nc.publish
    n = 0
    t0 = time.perf_counter()
    end = t0 + cfg["seconds"]
    ctl.t0.value = t0
    while time.perf_counter() < end:
        for _ in range(100):
            await publish(subject, body)
        n += 100
    if js:
        await js.publish_async_completed()
    else:
        await nc.flush()
    ctl.sent.value = n
    ctl.done.set()
    await wait_stop(ctl)
    await nc.close()


def queue_worker(ctl: Ctl, i: int) -> None:
    """Queue-group subscriber (core) or durable pull consumer (JetStream)."""
    with reporting(ctl):
        asyncio.run(_queue_worker(ctl, i))


async def _queue_worker(ctl: Ctl, i: int) -> None:
    cfg = ctl.cfg
    nc = await _connect(cfg["url"])
    tally = Tally()
    clock = time.perf_counter
    reporter = asyncio.create_task(publish_until_stop(ctl, i, tally))
    if cfg.get("js"):
        psub = await nc.jetstream().pull_subscribe_bind("workers", stream=cfg["stream"])
        ctl.worker_ready()
        await _fetch_loop(ctl, psub, tally, until=None)
    else:

        async def handle(msg: Any) -> None:
            tally.n += 1
            tally.last = clock()

        await nc.subscribe(
            cfg["subject"],
            queue="workers",
            cb=handle,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1 << 30,
        )
        await nc.flush()  # the subscription is registered on the server
        ctl.worker_ready()
    await reporter
    await nc.close()


async def _fetch_loop(ctl: Ctl, psub: Any, tally: Tally, until: int | None) -> None:
    """Fetch batches of 256 and ack each, until stopped or ``until`` messages."""
    import nats.errors

    clock = time.perf_counter
    while not ctl.stop.is_set() and (until is None or tally.n < until):
        try:
            msgs = await psub.fetch(256, timeout=0.2)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            await msg.ack()  # a publish, not a round trip
        tally.n += len(msgs)
        tally.last = clock()


def queue(opts: Any, size: int) -> dict[str, Any]:
    """Core NATS, 3 subscribers in one queue group, no acks."""
    return run_queue(queue_producer, queue_worker, _cfg(opts, size=size), opts.seconds)


def queue_durable(opts: Any, size: int) -> dict[str, Any]:
    """JetStream file stream, pipelined publish acks, durable pull consumer + acks."""
    cfg = _cfg(opts, size=size, js=True)
    try:
        return run_queue(queue_producer, queue_worker, cfg, opts.seconds)
    finally:
        _delete_stream(cfg)


# ----------------------------------------------------------------------- rpc


def rpc_server(ctl: Ctl) -> None:
    """Echo responder on a unique subject."""
    with reporting(ctl):
        asyncio.run(_rpc_server(ctl))


async def _rpc_server(ctl: Ctl) -> None:
    nc = await _connect(ctl.cfg["url"])

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(ctl.cfg["subject"], cb=echo)
    await nc.flush()
    ctl.bound.set()
    await wait_stop(ctl)
    await nc.close()


def rpc_client(ctl: Ctl) -> None:
    """``nc.request`` from ``window`` concurrent callers."""
    with reporting(ctl):
        asyncio.run(_rpc_client(ctl))


async def _rpc_client(ctl: Ctl) -> None:
    nc = await _connect(ctl.cfg["url"])
    subject = ctl.cfg["subject"]

    async def call(body: bytes) -> None:
        await nc.request(subject, body, timeout=5.0)

    ctl.results.put(await run_callers(call, ctl.cfg["window"], ctl.cfg["seconds"]))
    await nc.close()


def rpc_latency(opts: Any) -> dict[str, Any]:
    """nats-py request, one in flight."""
    return run_rpc(rpc_server, rpc_client, _cfg(opts, window=1), opts.seconds)


def rpc_ten_in_flight(opts: Any) -> dict[str, Any]:
    """``nc.request`` from 10 concurrent callers."""
    return run_rpc(rpc_server, rpc_client, _cfg(opts, window=10), opts.seconds)


def rpc_throughput(opts: Any) -> dict[str, Any]:
    """nats-py request, 100 concurrent."""
    return run_rpc(rpc_server, rpc_client, _cfg(opts, window=100), opts.seconds)


# ------------------------------------------------------------------- backlog


def backlog_holder(ctl: Ctl) -> None:
    """Publishes the backlog into a JetStream stream; nats-server holds it."""
    with reporting(ctl):
        asyncio.run(_backlog_holder(ctl))


async def _backlog_holder(ctl: Ctl) -> None:
    cfg = ctl.cfg
    nc = await _connect(cfg["url"])
    js = nc.jetstream(publish_async_max_pending=4000)
    await _make_stream(js, cfg)
    ctl.bound.set()
    body = b"x" * cfg["size"]
    ctl.t0.value = time.perf_counter()
    for _ in range(cfg["count"]):
        await js.publish_async(cfg["subject"], body)
    await js.publish_async_completed()
    ctl.done.set()
    await wait_stop(ctl)
    await nc.close()


def backlog_worker(ctl: Ctl, i: int) -> None:
    """Drains the stream through the durable pull consumer."""
    with reporting(ctl):
        asyncio.run(_backlog_worker(ctl))


async def _backlog_worker(ctl: Ctl) -> None:
    nc = await _connect(ctl.cfg["url"])
    psub = await nc.jetstream().pull_subscribe_bind("workers", stream=ctl.cfg["stream"])
    tally = Tally()
    t0 = time.perf_counter()
    await _fetch_loop(ctl, psub, tally, until=ctl.cfg["count"])
    ctl.results.put({"n": tally.n, "elapsed": tally.last - t0})
    await nc.close()


def backlog(opts: Any) -> dict[str, Any]:
    """JetStream stream filled first, then drained by one pull consumer."""
    if opts.count > BACKLOG_MAX:
        raise Skip(
            f"too slow at this size: ~{opts.count / 30_000 + opts.count / 19_000:.0f} s "
            f"estimated (publish ≈ 30 k/s, drain ≈ 19 k/s); use --count "
            f"{BACKLOG_MAX} or less to include it"
        )
    pid = find_server_pid("nats-server")
    if pid is None:
        raise Skip("nats-server process not visible here, so its RSS cannot be sampled")
    cfg = _cfg(opts, size=100)
    try:
        return run_backlog(backlog_holder, backlog_worker, cfg, opts.count, rss_pid=pid)
    finally:
        _delete_stream(cfg)
