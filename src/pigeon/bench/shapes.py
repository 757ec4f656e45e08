"""Benchmark shapes: queue, rpc, backlog and a process alone, run identically
for every system.

Each shape starts the system's child functions as separate processes, waits on
shared state with deadlines (a benchmark never hangs), and turns what the
children report into one result row.
"""

from __future__ import annotations

import asyncio
import queue as queue_mod
import time
from collections.abc import Callable
from typing import Any

from pigeon.bench.harness import GRACE_S, Children, Ctl, RssSampler, Skip, percentile


def _wait(pred: Callable[[], bool], timeout: float, what: str, kids: Children) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise Skip(f"timed out waiting for {what}")
        if bad := kids.failed():
            raise Skip(f"child failed while waiting for {what}: {', '.join(bad)}")
        time.sleep(0.005)


def collect(ctl: Ctl, n: int, timeout: float, kids: Children) -> list[dict[str, Any]]:
    """Receive ``n`` result dicts from children; a child's ``error`` key skips."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        try:
            item = ctl.results.get(timeout=0.2)
        except queue_mod.Empty:
            if time.monotonic() > deadline:
                raise Skip("timed out waiting for child results") from None
            if bad := kids.failed():
                raise Skip(f"child failed: {', '.join(bad)}") from None
            continue
        if "error" in item:
            raise Skip(f"child failed: {kids.failure(item['error'])}")
        out.append(item)
    return out


def run_queue(
    producer: Callable[..., Any],
    worker: Callable[..., Any],
    cfg: dict[str, Any],
    seconds: float,
    n_workers: int = 3,
) -> dict[str, Any]:
    """One producer, ``n_workers`` workers; end-to-end delivered msgs/s.

    The producer sends for ``seconds`` and publishes how many it sent; the
    producer stays alive until the workers have counted every message (a
    lossy system is stopped after a drain timeout), so no result depends on
    socket linger.  Rate = delivered / (last delivery - first send).
    """
    ctl = Ctl(n_workers, dict(cfg, seconds=seconds))
    drain_s = max(GRACE_S, 4 * seconds)
    with Children(ctl) as kids:
        kids.start(producer, ctl)
        _wait(ctl.bound.is_set, GRACE_S, "producer to bind", kids)
        for i in range(n_workers):
            kids.start(worker, ctl, i)
        _wait(ctl.done.is_set, GRACE_S + seconds, "producer to finish", kids)
        sent = ctl.sent.value
        deadline = time.monotonic() + drain_s
        while sum(ctl.counts) < sent and time.monotonic() < deadline and not kids.failed():
            time.sleep(0.01)
        delivered = sum(ctl.counts)
        ctl.stop.set()
        kids.finish(GRACE_S)
        if bad := kids.failed():
            raise Skip(f"child failed: {', '.join(bad)}")
    if delivered == 0:
        raise Skip("no message was delivered")
    elapsed = max(ctl.last) - ctl.t0.value
    note = None if delivered >= sent else f"lost {sent - delivered} of {sent} sent"
    return {"msgs_per_s": delivered / elapsed, "note": note}


def run_rpc(
    server: Callable[..., Any], client: Callable[..., Any], cfg: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """One server process and one client process; the client reports its figures.

    The client returns ``{"n": completed, "elapsed": s, "lat_ns": [...]}``;
    latencies are optional (throughput variants omit them).
    """
    ctl = Ctl(0, dict(cfg, seconds=seconds))
    with Children(ctl) as kids:
        kids.start(server, ctl)
        _wait(ctl.bound.is_set, GRACE_S, "server to bind", kids)
        kids.start(client, ctl)
        (res,) = collect(ctl, 1, GRACE_S + seconds, kids)
        ctl.stop.set()
        kids.finish(GRACE_S)
    row: dict[str, Any] = {"msgs_per_s": res["n"] / res["elapsed"]}
    if lat := sorted(res.get("lat_ns") or []):
        row["p50_us"] = percentile(lat, 50) / 1e3
        row["p99_us"] = percentile(lat, 99) / 1e3
    return row


def run_alone(child: Callable[..., Any], cfg: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One process that measures on its own for ``seconds`` (a floor such as
    the disk's fsync rate); it reports ``{"n": operations, "elapsed": s}``."""
    ctl = Ctl(0, dict(cfg, seconds=seconds))
    with Children(ctl) as kids:
        kids.start(child, ctl)
        (res,) = collect(ctl, 1, GRACE_S + seconds, kids)
        kids.finish(GRACE_S)
    return {"msgs_per_s": res["n"] / res["elapsed"]}


def run_backlog(
    holder: Callable[..., Any],
    worker: Callable[..., Any],
    cfg: dict[str, Any],
    count: int,
    rss_pid: int | None = None,
) -> dict[str, Any]:
    """Queue ``count`` messages with no consumer, then drain them with one worker.

    The holder sets ``bound`` once it can be reached and ``done`` once the
    whole backlog is queued; only then is the worker started.  The worker
    reports ``{"n", "elapsed"}`` for the drain.  Peak RSS is sampled from
    ``rss_pid`` (a broker) or, by default, from the holder process itself.
    """
    ctl = Ctl(1, dict(cfg, count=count))
    timeout = GRACE_S + count / 2_000  # nothing here is slower than ~2 k msgs/s
    with Children(ctl) as kids:
        proc = kids.start(holder, ctl)
        pid = rss_pid or proc.pid
        if pid is None:
            raise Skip("the holder process did not start")
        with RssSampler(pid) as rss:
            _wait(ctl.bound.is_set, GRACE_S, "holder to bind", kids)
            _wait(ctl.done.is_set, timeout, "backlog to be queued", kids)
            fill_s = time.perf_counter() - ctl.t0.value
            kids.start(worker, ctl, 0)
            (res,) = collect(ctl, 1, timeout, kids)
        ctl.stop.set()
        kids.finish(GRACE_S)
    note = f"filled in {fill_s:.1f} s"
    if rss_pid:
        note += f"; broker RSS at start {rss.first / 1e6:.0f} MB"
    return {"msgs_per_s": res["n"] / res["elapsed"], "peak_rss_mb": rss.peak / 1e6, "note": note}


async def run_callers(call: Any, window: int, seconds: float) -> dict[str, Any]:
    """Run ``window`` callers of ``call`` for ``seconds``; record each latency."""
    body = b"x" * 16
    for _ in range(200):  # warm up
        await call(body)
    clock = time.perf_counter_ns
    lat: list[int] = []
    end = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < end:
            t = clock()
            await call(body)
            lat.append(clock() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(window)))
    elapsed = time.perf_counter() - t0
    return {"n": len(lat), "elapsed": elapsed, "lat_ns": lat}
