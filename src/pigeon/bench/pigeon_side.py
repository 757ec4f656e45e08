"""The pigeon rows: the same shapes as the peers, through pigeon's public API.

The producer's process hosts the queue (binds); workers connect.  Children
import :mod:`pigeon` themselves, so if the public API is missing the rows are
reported as skipped by :func:`available` before any process starts.

With ``curve=True`` the node that binds gets ``key=`` and ``allow=`` and the
others ``key=`` and ``server_key=`` (fresh keys from :mod:`pigeon.bench.curve`);
every node checks that it is secure exactly when it was given keys.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pigeon.bench import curve as curve_mod
from pigeon.bench.harness import (
    ANY_PORT,
    Ctl,
    Skip,
    Tally,
    port_of,
    publish_until_stop,
    reporting,
    wait_stop,
    wait_workers_async,
)
from pigeon.bench.shapes import run_backlog, run_callers, run_queue, run_rpc

QUEUE = "bench"
SERVICE = "echo"
LOCAL = "tcp://127.0.0.1"
# Unconfirmed sends the producer allows before awaiting the oldest confirm:
# bounds the producer's memory the way HWM bounds raw pyzmq's.
WINDOW = 10_000
BATCH = 1000
# Seconds the producer waits after the host refused a batch (Backpressure),
# doubled after each refusal in a row up to the maximum.
BACKPRESSURE_WAIT = 0.02
BACKPRESSURE_MAX_WAIT = 0.32


def available() -> None:
    """Raise Skip unless the async and public entry points exist."""
    try:
        import pigeon

        pigeon.connect  # noqa: B018 - attribute access is the check
    except (ImportError, AttributeError) as exc:
        raise Skip(f"pigeon transport unavailable: {type(exc).__name__}: {exc}") from None


def _bound_port(node: Any, kwargs: dict[str, Any]) -> int:
    """The port a node that bound :data:`ANY_PORT` got, once it is checked to
    use keys exactly when it was given them."""
    _check_secure(node, kwargs)
    return port_of(node.stats()["bound"][0])


def _check_secure(conn: Any, kwargs: dict[str, Any]) -> None:
    """A CURVE row must be encrypted, and a plain one must not be."""
    if bool(conn.stats()["secure"]) != ("key" in kwargs):
        raise RuntimeError(f"connect(**{kwargs}) gave secure={conn.stats()['secure']}")


def _durable_kwargs(tmpdir: str) -> dict[str, Any]:
    """Keyword arguments asking ``pigeon.connect`` for an on-disk queue store."""
    return {"store": os.path.join(tmpdir, "bench.db")}


# --------------------------------------------------------------------- queue


def queue_producer(ctl: Ctl) -> None:
    """Host process: binds, hosts the queue, sends for ``seconds``."""
    with reporting(ctl):
        asyncio.run(_queue_producer(ctl))


async def _queue_producer(ctl: Ctl) -> None:
    import pigeon

    kwargs = ctl.cfg.get("node_kwargs", {})
    async with pigeon.connect(bind=ANY_PORT, **kwargs) as node:
        ctl.port.value = _bound_port(node, kwargs)
        ctl.bound.set()
        await wait_workers_async(ctl)
        body = b"x" * ctl.cfg["size"]
        batch = [body] * BATCH
        pending: list[asyncio.Future[None]] = []
        wait = BACKPRESSURE_WAIT
        n = 0
        t0 = time.perf_counter()
        end = t0 + ctl.cfg["seconds"]
        ctl.t0.value = t0
        while time.perf_counter() < end:
            # send_many: each message is its own envelope, leased and acked one
            # by one; the batch only shares the hand-over and one confirm future.
            try:
                pending.append(node.send_many(QUEUE, batch))
            except pigeon.Backpressure:
                # The host holds all the bodies it may (max_memory); nothing of
                # this batch was queued. Wait for the workers, as a producer
                # must. A refused batch was built for nothing (1,000 envelopes
                # made in the host's thread), so back off: 256 MiB of bodies
                # is about a second of work for the workers, and a pause of at
                # most BACKPRESSURE_MAX_WAIT cannot starve them.
                await asyncio.sleep(wait)
                wait = min(2 * wait, BACKPRESSURE_MAX_WAIT)
                continue
            wait = BACKPRESSURE_WAIT
            n += BATCH
            if len(pending) * BATCH > WINDOW:
                await pending.pop(0)  # bound what is unconfirmed
            else:
                await asyncio.sleep(0)  # let the node's I/O run
        await node.flush()
        ctl.sent.value = n
        ctl.done.set()
        await wait_stop(ctl)  # keep hosting until the workers have it all


def queue_worker(ctl: Ctl, i: int) -> None:
    """Worker process: connects and consumes with prefetch 1000."""
    with reporting(ctl):
        asyncio.run(_queue_worker(ctl, i))


async def _queue_worker(ctl: Ctl, i: int) -> None:
    import pigeon

    tally = Tally()
    clock = time.perf_counter

    async def handle(message: Any) -> None:
        tally.n += 1
        tally.last = clock()

    kwargs = ctl.cfg.get("client_kwargs", {})
    async with pigeon.connect(f"{LOCAL}:{ctl.port.value}", **kwargs) as conn:
        _check_secure(conn, kwargs)
        await conn.consume(QUEUE, handle, prefetch=1000)
        ctl.worker_ready()
        await publish_until_stop(ctl, i, tally)


def _maybe_curve(
    shape: Callable[..., dict[str, Any]],
    serving: Callable[..., None],
    calling: Callable[..., None],
    cfg: dict[str, Any],
    opts: Any,
    curve: bool,
) -> dict[str, Any]:
    """Run ``shape`` plain, or with fresh keys: the node binds with a key and
    an ACL, and the other side connects with keys."""
    if not curve:
        return shape(serving, calling, cfg, opts.seconds)
    with curve_mod.curve_keys() as keys:
        cfg = {
            **cfg,
            "node_kwargs": curve_mod.node_kwargs(keys),
            "client_kwargs": curve_mod.client_kwargs(keys),
        }
        return shape(serving, calling, cfg, opts.seconds)


def queue(opts: Any, size: int, curve: bool = False) -> dict[str, Any]:
    """pigeon acked work queue: host+producer → 3 workers; with ``curve``, the
    node binds with a key and an ACL and the workers connect with keys."""
    return _maybe_curve(run_queue, queue_producer, queue_worker, {"size": size}, opts, curve)


def queue_durable(opts: Any, size: int) -> dict[str, Any]:
    """pigeon work queue with an on-disk store (confirm = stored)."""
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        cfg = {"size": size, "node_kwargs": _durable_kwargs(tmp)}
        return run_queue(queue_producer, queue_worker, cfg, opts.seconds)


# ----------------------------------------------------------------------- rpc


def rpc_server(ctl: Ctl) -> None:
    """Server process: binds and serves an echo service."""
    with reporting(ctl):
        asyncio.run(_rpc_server(ctl))


async def _rpc_server(ctl: Ctl) -> None:
    import pigeon

    async def echo(message: pigeon.Message) -> bytes:
        return message.body

    kwargs = ctl.cfg.get("node_kwargs", {})
    async with pigeon.connect(bind=ANY_PORT, **kwargs) as node:
        await node.serve(SERVICE, echo)
        ctl.port.value = _bound_port(node, kwargs)
        ctl.bound.set()
        await wait_stop(ctl)


def rpc_client(ctl: Ctl) -> None:
    """Client process: ``window`` concurrent callers for ``seconds``."""
    with reporting(ctl):
        asyncio.run(_rpc_client(ctl))


async def _rpc_client(ctl: Ctl) -> None:
    import pigeon

    kwargs = ctl.cfg.get("client_kwargs", {})
    async with pigeon.connect(f"{LOCAL}:{ctl.port.value}", **kwargs) as client:
        _check_secure(client, kwargs)

        async def call(body: bytes) -> None:
            await client.request(SERVICE, body, timeout=5.0)

        result = await run_callers(call, ctl.cfg["window"], ctl.cfg["seconds"])
    ctl.results.put(result)


def rpc_sync_client(ctl: Ctl) -> None:
    """Client process on the blocking API: ``window`` threads calling."""
    with reporting(ctl):
        ctl.results.put(_rpc_sync_client(ctl))


def _rpc_sync_client(ctl: Ctl) -> dict[str, Any]:
    import threading

    import pigeon.sync

    body = b"x" * 16
    with pigeon.sync.connect(f"{LOCAL}:{ctl.port.value}") as client:
        for _ in range(200):  # warm up
            client.request(SERVICE, body, timeout=5.0)
        window, lat, lock = ctl.cfg["window"], [], threading.Lock()
        end = time.perf_counter() + ctl.cfg["seconds"]

        def caller() -> None:
            mine = []
            while time.perf_counter() < end:
                t = time.perf_counter_ns()
                client.request(SERVICE, body, timeout=5.0)
                mine.append(time.perf_counter_ns() - t)
            with lock:
                lat.extend(mine)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=caller) for _ in range(window)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
    return {"n": len(lat), "elapsed": elapsed, "lat_ns": lat if window == 1 else None}


def rpc_sync_latency(opts: Any) -> dict[str, Any]:
    """pigeon.sync request/serve, one request in flight."""
    return run_rpc(rpc_server, rpc_sync_client, {"window": 1}, opts.seconds)


def rpc_sync_throughput(opts: Any) -> dict[str, Any]:
    """pigeon.sync request/serve, 100 threads each with one request in flight."""
    return run_rpc(rpc_server, rpc_sync_client, {"window": 100}, opts.seconds)


def _rpc(opts: Any, window: int, curve: bool) -> dict[str, Any]:
    return _maybe_curve(run_rpc, rpc_server, rpc_client, {"window": window}, opts, curve)


def rpc_latency(opts: Any, curve: bool = False) -> dict[str, Any]:
    """pigeon request/serve, one request in flight (``curve``: with keys and an ACL)."""
    return _rpc(opts, 1, curve)


def rpc_throughput(opts: Any, curve: bool = False) -> dict[str, Any]:
    """pigeon request/serve, 100 concurrent requests (``curve``: with keys and an ACL)."""
    return _rpc(opts, 100, curve)


# ------------------------------------------------------------------- backlog


def backlog_holder(ctl: Ctl) -> None:
    """Host process: queues ``count`` messages before any worker connects."""
    with reporting(ctl):
        asyncio.run(_backlog_holder(ctl))


async def _backlog_holder(ctl: Ctl) -> None:
    import pigeon

    # No memory alarm here: the row measures what holding the backlog costs.
    options: dict[str, Any] = {"max_memory": None}
    if ctl.cfg.get("store"):
        options["store"] = ctl.cfg["store"]
    async with pigeon.connect(bind=ANY_PORT, **options) as node:
        ctl.port.value = _bound_port(node, {})
        ctl.bound.set()
        body = b"x" * ctl.cfg["size"]
        send = node.send_nowait
        ctl.t0.value = time.perf_counter()
        # A producer paced on confirms, one chunk at a time: the row measures
        # what holding the backlog costs, not a producer's unconfirmed sends.
        for start in range(0, ctl.cfg["count"], 10_000):
            for _ in range(min(10_000, ctl.cfg["count"] - start)):
                confirmed = send(QUEUE, body)
            await confirmed
        await node.flush()
        ctl.done.set()
        await wait_stop(ctl)


def backlog_worker(ctl: Ctl, i: int) -> None:
    """Worker process: connects and drains the backlog."""
    with reporting(ctl):
        asyncio.run(_backlog_worker(ctl))


async def _backlog_worker(ctl: Ctl) -> None:
    import pigeon

    count = ctl.cfg["count"]
    clock = time.perf_counter
    times = [0.0, 0.0]
    seen = 0
    finished = asyncio.Event()

    async def handle(message: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            times[0] = clock()
        elif seen == count:
            times[1] = clock()
            finished.set()

    async with pigeon.connect(f"{LOCAL}:{ctl.port.value}") as conn:
        await conn.consume(QUEUE, handle, prefetch=1000)
        await finished.wait()
    ctl.results.put({"n": count - 1, "elapsed": times[1] - times[0]})


def backlog(opts: Any) -> dict[str, Any]:
    """pigeon: the backlog lives in the host (producer) process; with
    ``--store``, in a durable node (SQLite, fsynced)."""
    if not getattr(opts, "store", False):
        return run_backlog(backlog_holder, backlog_worker, {"size": 100}, opts.count)
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        cfg = {"size": 100, "store": os.path.join(tmp, "backlog.db")}
        return run_backlog(backlog_holder, backlog_worker, cfg, opts.count)
