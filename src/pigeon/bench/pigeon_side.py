"""The pigeon rows: the same shapes as the peers, through pigeon's public API.

In the ``{size}`` rows the producer's process hosts the queue (binds) and
workers connect; in the ``node, …`` rows a standalone ``pigeon node`` process
hosts it and a producer and workers connect to it.  Children
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
from collections.abc import Awaitable, Callable
from typing import Any

from pigeon.bench import curve as curve_mod
from pigeon.bench.harness import (
    ANY_PORT,
    Ctl,
    RssSampler,
    Skip,
    Tally,
    pigeon_node,
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
# Node rows: send_nowait futures gathered at a time, and the workers'
# prefetch (consume()'s default: what a user who sets nothing gets).
NOWAIT_GATHER = 5000
NODE_PREFETCH = 64


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
    """Worker process: connects (to the producer's port, or to ``url``) and
    consumes with ``prefetch`` (default 1000)."""
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
    url = ctl.cfg.get("url") or f"{LOCAL}:{ctl.port.value}"
    async with pigeon.connect(url, **kwargs) as conn:
        _check_secure(conn, kwargs)
        await conn.consume(QUEUE, handle, prefetch=ctl.cfg.get("prefetch", 1000))
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


# ---------------------------------------------------- queue, standalone node
#
# The shape a user writes: a `pigeon node` process hosts the queue, one
# producer process connects and sends, three worker processes connect and
# consume with consume()'s default prefetch.


def node_producer(ctl: Ctl) -> None:
    """Producer process: connects to the node, sends for ``seconds`` in the
    style ``cfg["style"]`` names (a key of :data:`PRODUCER_STYLES`)."""
    with reporting(ctl):
        asyncio.run(_node_producer(ctl))


async def _node_producer(ctl: Ctl) -> None:
    import pigeon

    async with pigeon.connect(ctl.cfg["url"]) as conn:
        ctl.bound.set()
        await wait_workers_async(ctl)
        send_for = PRODUCER_STYLES[ctl.cfg["style"]]
        body = b"x" * ctl.cfg["size"]
        t0 = time.perf_counter()
        ctl.t0.value = t0
        confirmed = await send_for(conn, body, t0 + ctl.cfg["seconds"])
        await conn.flush()
        ctl.sent.value = confirmed
        ctl.done.set()
        await wait_stop(ctl)


class _Backoff:
    """A producer's pause after the node refused sends (its queue holds its
    ``max_memory``): BACKPRESSURE_WAIT, doubled per refusal in a row up to
    BACKPRESSURE_MAX_WAIT, as the host-producer rows wait."""

    def __init__(self) -> None:
        self.delay = BACKPRESSURE_WAIT

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(2 * self.delay, BACKPRESSURE_MAX_WAIT)

    def reset(self) -> None:
        self.delay = BACKPRESSURE_WAIT


async def send_awaited(conn: Any, body: bytes, end: float) -> int:
    """``await conn.send`` one message at a time: each waits for the node's
    confirm (and, when the node is full, for room), like a plain loop."""
    sent = 0
    while time.perf_counter() < end:
        await conn.send(QUEUE, body)
        sent += 1
    return sent


async def send_nowait_gathered(conn: Any, body: bytes, end: float) -> int:
    """``send_nowait`` NOWAIT_GATHER times, then gather those confirms.

    The connection's outbox holds 100,000 unconfirmed sends, so these are
    never refused locally; the node may refuse some (Backpressure), which
    are not counted as sent.
    """
    import pigeon

    backoff = _Backoff()
    confirmed = 0
    while time.perf_counter() < end:
        futures = [conn.send_nowait(QUEUE, body) for _ in range(NOWAIT_GATHER)]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, pigeon.Backpressure):
                raise outcome
        stored = outcomes.count(None)
        confirmed += stored
        if stored < len(outcomes):
            await backoff.wait()
        else:
            backoff.reset()
    return confirmed


async def send_many_awaited(conn: Any, body: bytes, end: float) -> int:
    """``await conn.send_many`` of BATCH messages, one batch at a time."""
    import pigeon

    batch = [body] * BATCH
    backoff = _Backoff()
    confirmed = 0
    while time.perf_counter() < end:
        try:
            await conn.send_many(QUEUE, batch)
        except pigeon.Backpressure:
            # Refused, maybe in part: not counted; the workers catch up.
            await backoff.wait()
            continue
        backoff.reset()
        confirmed += BATCH
    return confirmed


PRODUCER_STYLES: dict[str, Callable[[Any, bytes, float], Awaitable[int]]] = {
    "await send": send_awaited,
    "send_nowait": send_nowait_gathered,
    "send_many": send_many_awaited,
}


def _node_queue(opts: Any, size: int, style: str, store_dir: str | None = None) -> dict[str, Any]:
    """A `pigeon node` (durable when ``store_dir`` is given), a producer in
    ``style`` and three workers; the peak RSS reported is the node's."""
    options = ["--store", os.path.join(store_dir, "node.db")] if store_dir else []
    with pigeon_node(*options) as node, RssSampler(node.pid) as rss:
        cfg = {"size": size, "url": node.url, "style": style, "prefetch": NODE_PREFETCH}
        row = run_queue(node_producer, queue_worker, cfg, opts.seconds)
    return {**row, "peak_rss_mb": rss.peak / 1e6}


def _durable_node_queue(opts: Any, size: int, style: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        return _node_queue(opts, size, style, store_dir=tmp)


def node_await_send(opts: Any, size: int) -> dict[str, Any]:
    """In-memory node; the producer awaits each ``send``."""
    return _node_queue(opts, size, "await send")


def node_send_nowait(opts: Any, size: int) -> dict[str, Any]:
    """In-memory node; ``send_nowait``, confirms gathered every NOWAIT_GATHER."""
    return _node_queue(opts, size, "send_nowait")


def node_send_many(opts: Any, size: int) -> dict[str, Any]:
    """In-memory node; ``send_many`` batches of BATCH, each awaited."""
    return _node_queue(opts, size, "send_many")


def durable_node_await_send(opts: Any, size: int) -> dict[str, Any]:
    """Durable node (``--store``); the producer awaits each ``send``."""
    return _durable_node_queue(opts, size, "await send")


def durable_node_send_nowait(opts: Any, size: int) -> dict[str, Any]:
    """Durable node; ``send_nowait``, confirms gathered every NOWAIT_GATHER."""
    return _durable_node_queue(opts, size, "send_nowait")


def durable_node_send_many(opts: Any, size: int) -> dict[str, Any]:
    """Durable node; ``send_many`` batches of BATCH, each awaited."""
    return _durable_node_queue(opts, size, "send_many")


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


def rpc_relayed_server(ctl: Ctl) -> None:
    """Server process behind a `pigeon node`: it connects to the node (no
    port of its own) and serves an echo service through it."""
    with reporting(ctl):
        asyncio.run(_rpc_relayed_server(ctl))


async def _rpc_relayed_server(ctl: Ctl) -> None:
    import pigeon

    async def echo(message: pigeon.Message) -> bytes:
        return message.body

    async with pigeon.connect(ctl.cfg["url"]) as conn:
        await conn.serve(SERVICE, echo)
        # Ready once the node relays it: a call through the node comes back.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                await conn.request(SERVICE, b"ready?", timeout=5.0)
                break
            except pigeon.NoResponders:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        ctl.bound.set()
        await wait_stop(ctl)


def rpc_client(ctl: Ctl) -> None:
    """Client process: ``window`` concurrent callers for ``seconds``."""
    with reporting(ctl):
        asyncio.run(_rpc_client(ctl))


async def _rpc_client(ctl: Ctl) -> None:
    import pigeon

    kwargs = ctl.cfg.get("client_kwargs", {})
    url = ctl.cfg.get("url") or f"{LOCAL}:{ctl.port.value}"
    async with pigeon.connect(url, **kwargs) as client:
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


def _rpc_through_node(opts: Any, window: int) -> dict[str, Any]:
    with pigeon_node() as node:
        cfg = {"window": window, "url": node.url}
        return run_rpc(rpc_relayed_server, rpc_client, cfg, opts.seconds)


def rpc_node_latency(opts: Any) -> dict[str, Any]:
    """pigeon request/serve through a `pigeon node` that relays to a server
    connected to it (no port of its own), one request in flight."""
    return _rpc_through_node(opts, 1)


def rpc_node_throughput(opts: Any) -> dict[str, Any]:
    """As rpc_node_latency, with 100 requests in flight."""
    return _rpc_through_node(opts, 100)


def rpc_ten_in_flight(opts: Any) -> dict[str, Any]:
    """pigeon request/serve, 10 concurrent requests."""
    return _rpc(opts, 10, False)


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
