"""``pigeon bench hostile``: each attack beside a paced legit load.

For every attack a fresh ``pigeon node`` process runs; a legit producer and
worker (this process) send and receive at a fixed rate, first alone, then
while an attacker process (``python -m pigeon.bench.hostile ATTACK URL S``)
does its worst. Each row reports the legit throughput kept during the attack
(% of before), the legit p99 latency during it, and the node's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import psutil
import zmq
import zmq.asyncio

import pigeon
from pigeon._core import frames, limits
from pigeon.bench.harness import pigeon_node
from pigeon.message import Message, new_id

RATE = 1000  # legit messages per second
LEGIT = b"legit"
TICK = 0.01  # seconds between legit send bursts
KEPT_GOAL = 80.0  # % of the legit throughput each attack must leave
RSS_GOAL_MB = 300.0


# -- the attacker process -------------------------------------------------


class Raw:
    """A peer that speaks pigeon's frames by hand."""

    def __init__(self, url: str, *, read: bool = True) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if not read:
            self.sock.setsockopt(zmq.RCVHWM, 1)
        self.sock.connect(url)

    async def send(self, frame: frames.Frame) -> None:
        await self.sock.send(frames.encode(frame))

    async def send_raw(self, data: bytes) -> None:
        await self.sock.send(data)

    async def drain(self) -> list[frames.Frame]:
        got: list[frames.Frame] = []
        while await self.sock.poll(0):
            try:
                got += frames.decode_all(await self.sock.recv())
            except pigeon.RemoteProtocolError:
                pass
        return got


def _msg(body: bytes = b"x", **fields: Any) -> Message:
    return Message(id=new_id(), body=body, **fields)


async def poison_attempt(raw: Raw) -> None:
    bomb = _msg(attempt=2**64 - 1)
    await raw.send_raw(b"\x01" + msgspec.msgpack.encode([2, "jobs", [bomb]]))
    await raw.send(frames.Send("side", [_msg(attempt=limits.MAX_ATTEMPT)]))
    await raw.send(frames.Consume("side", 10))
    for f in await raw.drain():
        if isinstance(f, frames.Deliver):
            nacks = [(m.id, 0.0, "again") for m in f.messages]
            await raw.send(frames.Settle("side", nacks=nacks))
    await asyncio.sleep(0.005)


async def max_attempts_hijack(raw: Raw) -> None:
    await raw.send(frames.Consume("jobs", 1, 30.0, 1))
    await raw.send(frames.Cancel("jobs"))
    await raw.drain()
    await asyncio.sleep(0.01)


async def hostage_consumer(raw: Raw) -> None:
    # Asks for everything for as long as possible, stays alive, never settles.
    await raw.send(frames.Consume("jobs", limits.MAX_PREFETCH, limits.MAX_SECONDS))
    await raw.send(frames.Hello("hostage", "s"))
    await raw.drain()
    await asyncio.sleep(0.2)


async def queue_flood(raw: Raw) -> None:
    batch = [frames.encode(frames.Consume(f"flood-{new_id()}", 1)) for _ in range(1000)]
    await raw.send_raw(frames.encode_batch(batch))
    await raw.drain()
    await asyncio.sleep(0.01)


async def stats_flood(raw: Raw) -> None:
    for _ in range(100):
        await raw.send(frames.Request(new_id(), "pigeon.info", _msg(b""), 5.0))
    await raw.drain()
    await asyncio.sleep(0.01)


async def batch_bomb(raw: Raw) -> None:
    one = frames.encode(frames.Cancel("nothing"))
    await raw.send_raw(frames.encode_batch([one] * (limits.MAX_BATCH_FRAMES + 1)))
    await raw.drain()
    await asyncio.sleep(0.005)


async def header_bomb(raw: Raw) -> None:
    # As many and as large headers as the wire lets through (the decoder
    # refuses more), many messages a frame.
    fat = [_msg(b"", headers={f"h{n}": "x" * 8000 for n in range(64)}) for _ in range(6)]
    await raw.send(frames.Send("bombs", fat))
    await raw.drain()
    await asyncio.sleep(0.01)


async def burst_no_reader(raw: Raw) -> None:
    await raw.send(frames.Send("burst", [_msg(b"b" * (1 << 20)) for _ in range(4)]))
    await raw.drain()


async def never_reads(raw: Raw) -> None:
    await raw.send(frames.Send("unread", [_msg(b"u" * 1024) for _ in range(1000)]))
    await asyncio.sleep(0.001)


ATTACKS: dict[str, Callable[[Raw], Awaitable[None]]] = {
    "poison attempt": poison_attempt,
    "max-attempts hijack": max_attempts_hijack,
    "hostage consumer": hostage_consumer,
    "queue-name flood": queue_flood,
    "stats flood": stats_flood,
    "batch bomb": batch_bomb,
    "header bomb": header_bomb,
    "burst, no reader": burst_no_reader,
    "never reads": never_reads,
}
# Rows that run an attack against a durable node (--store) instead.
DURABLE_ROWS = {"burst, durable node": "burst, no reader"}


async def _attack(name: str, url: str, seconds: float) -> None:
    raw = Raw(url, read=name != "never reads")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await ATTACKS[name](raw)
    raw.sock.close()
    raw.ctx.term()


# -- the legit load -------------------------------------------------------


async def _legit_phase(url: str, seconds: float) -> tuple[int, list[float]]:
    """Send at RATE for ``seconds``; how many came back, and their latencies."""
    latencies: list[float] = []
    async with pigeon.connect(url) as producer, pigeon.connect(url) as worker:

        def handle(delivery: pigeon.Delivery) -> None:
            if delivery.message.body == LEGIT:  # an attacker may write here too
                latencies.append(time.time() - delivery.message.created_at)

        await worker.consume("jobs", handle)
        per_tick = max(1, int(RATE * TICK))
        start = time.monotonic()
        ticks = 0
        while time.monotonic() - start < seconds:
            try:
                producer.send_many("jobs", [LEGIT] * per_tick)
            except pigeon.Backpressure:
                pass  # counted as not kept
            ticks += 1
            delay = start + ticks * TICK - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
        await asyncio.sleep(0.5)  # what is in flight lands
    return len(latencies), latencies


def _p99_us(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6


class _PeakRss:
    """The peak RSS of a process, sampled while an attack runs."""

    def __init__(self, pid: int) -> None:
        self.peak = 0
        self._ps = psutil.Process(pid)

    def sample(self) -> None:
        try:
            self.peak = max(self.peak, self._ps.memory_info().rss)
        except psutil.Error:
            pass

    def alive(self) -> bool:
        try:
            return bool(self._ps.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False


def _start_attacker(name: str, url: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pigeon.bench.hostile", name, url, str(seconds)],
        stderr=subprocess.PIPE,
        text=True,
    )


async def _row(name: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pigeon-hostile-") as tmp:
        store = ("--store", os.path.join(tmp, "node.db")) if name in DURABLE_ROWS else ()
        with pigeon_node(*store) as node:
            return await _attack_row(name, node.url, _PeakRss(node.pid), seconds)


async def _attack_row(name: str, url: str, rss: _PeakRss, seconds: float) -> dict[str, Any]:
    before, _ = await _legit_phase(url, seconds)
    attacker = _start_attacker(DURABLE_ROWS.get(name, name), url, seconds + 1)
    sampling = True

    async def sample() -> None:
        while sampling:
            rss.sample()
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    try:
        during, latencies = await _legit_phase(url, seconds)
    finally:
        sampling = False
        await sampler
        _, err = attacker.communicate(timeout=60)
    alive = rss.alive()
    kept = 100.0 * during / before if before else 0.0
    note = "" if alive else "node died"
    if attacker.returncode:
        last = err.strip().splitlines()[-1] if err.strip() else str(attacker.returncode)
        note = f"attacker failed: {last}"
    return {
        "attack": name,
        "kept_pct": round(kept, 1),
        "p99_us": _p99_us(latencies),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "node_alive": alive,
        "note": note,
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Every attack in turn; the JSON-shaped document."""
    results = []
    for name in [*ATTACKS, *DURABLE_ROWS]:
        print(f"hostile: {name} …", end="", file=sys.stderr, flush=True)
        row = asyncio.run(_row(name, opts.seconds))
        print(f" kept {row['kept_pct']} %, peak RSS {row['peak_rss_mb']} MB", file=sys.stderr)
        results.append(row)
    return {
        "scenario": "hostile",
        "legit_rate": RATE,
        "goals": {"kept_pct": KEPT_GOAL, "peak_rss_mb": RSS_GOAL_MB},
        "results": results,
    }


def table(doc: dict[str, Any]) -> str:
    head = f"{'attack':<22}{'kept %':>9}{'p99 µs':>10}{'peak RSS MB':>13}  goals met"
    lines = [head, "-" * len(head)]
    for r in doc["results"]:
        met = r["kept_pct"] >= KEPT_GOAL and r["peak_rss_mb"] <= RSS_GOAL_MB and r["node_alive"]
        p99 = f"{r['p99_us']:.0f}" if r["p99_us"] is not None else "-"
        lines.append(
            f"{r['attack']:<22}{r['kept_pct']:>9.1f}{p99:>10}{r['peak_rss_mb']:>13.1f}  "
            f"{'yes' if met else 'no'} {r['note']}".rstrip()
        )
    return "\n".join(lines)


if __name__ == "__main__":
    asyncio.run(_attack(sys.argv[1], sys.argv[2], float(sys.argv[3])))
