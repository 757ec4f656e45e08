"""Handler runs wasted when a durable node is killed under its workers.

    python benchmarks/host_kill.py [--count N] [--kills K]

A `pigeon node --store` is filled with N messages of 16 B; three worker
processes (prefetch 64, a 2 ms async handler) drain it. Part way, the node is
killed with SIGKILL, left down for a second, and started again on the same
port and store (K times). Deliveries a worker holds when its host dies can no
longer be acked: the node gives them out again when it comes back. Every
handler run of a message beyond its first is counted ("runs again"), as
are the runs started while the node was down ("runs, host down": each
started for nothing, since no ack can reach a node that is gone and the
restarted node gives the message out again) and the runs cut short. A run
again that is not one of those was a run whose ack the node had not yet
written when it was killed. The run is made twice: with ``abandon_on_host_loss`` (the
default: the worker drops what the dead host leased it and cancels the
running handlers) and without it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pigeon

HEARTBEAT = 0.5
WORKER = f"""
import asyncio, sys, time, pigeon
async def main():
    abandon = sys.argv[2] == "1"
    async with pigeon.connect(sys.argv[1], heartbeat={HEARTBEAT!r}) as conn:
        async def handle(delivery):
            mid = delivery.message.text
            print("run", mid, time.time(), flush=True)
            try:
                await asyncio.sleep(0.002)
            except asyncio.CancelledError:
                print("cut", mid, flush=True)
                raise
            print("done", mid, flush=True)
        await conn.consume("jobs", handle, prefetch=64, abandon_on_host_loss=abandon)
        await asyncio.Event().wait()
asyncio.run(main())
"""


def start_node(port: int, store: str) -> subprocess.Popen[str]:
    """A node on ``port``; retried while the port is still held by the last one."""
    for _ in range(100):
        node = subprocess.Popen(
            [
                *(sys.executable, "-m", "pigeon.cli.main", "node"),
                *("--bind", f"tcp://127.0.0.1:{port}", "--store", store),
                *("--heartbeat", str(HEARTBEAT)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert node.stdout is not None
        banner = node.stdout.readline()
        if "serving" in banner:
            return node
        node.wait(10)
        time.sleep(0.1)
    raise RuntimeError("the node did not start")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def fill(url: str, count: int) -> None:
    async with pigeon.connect(url) as producer:
        await producer.send_many("jobs", [f"m{i}" for i in range(count)])
        await producer.flush(60.0)


def run(count: int, kills: int, abandon: bool) -> dict[str, int]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pigeon-host-kill-") as tmp:
        store = str(Path(tmp) / "node.db")
        node = start_node(port, store)
        url = f"tcp://127.0.0.1:{port}"
        asyncio.run(fill(url, count))
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, url, "1" if abandon else "0"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        runs: Counter[str] = Counter()
        done: set[str] = set()
        cut = 0
        down: list[tuple[float, float]] = []  # (killed, back) wall-clock times
        started_at: list[float] = []
        selector = selectors.DefaultSelector()
        for worker in workers:
            assert worker.stdout is not None
            os.set_blocking(worker.stdout.fileno(), False)
            selector.register(worker.stdout, selectors.EVENT_READ)
        buffers = {w.stdout: "" for w in workers}

        def read(timeout: float) -> None:
            nonlocal cut
            for key, _ in selector.select(timeout):
                chunk = key.fileobj.read()  # type: ignore[union-attr]
                if not chunk:
                    continue
                buffers[key.fileobj] += chunk  # type: ignore[index]
                *lines, buffers[key.fileobj] = buffers[key.fileobj].split("\n")  # type: ignore[index]
                for line in lines:
                    kind, _, rest = line.partition(" ")
                    mid, _, when = rest.partition(" ")
                    if kind == "run":
                        runs[mid] += 1
                        started_at.append(float(when))
                    elif kind == "done":
                        done.add(mid)
                    elif kind == "cut":
                        cut += 1

        try:
            for k in range(kills):
                # Kill at an even share of the way through.
                target = count * (k + 1) // (kills + 1)
                while len(done) < target:
                    read(0.1)
                killed = time.time()
                node.kill()
                node.wait(10)
                assert node.stdout is not None
                node.stdout.close()
                down_until = time.monotonic() + 1.0
                while time.monotonic() < down_until:
                    read(0.05)
                down.append((killed, time.time()))  # (before it can serve again)
                node = start_node(port, store)
            deadline = time.monotonic() + 120
            while len(done) < count and time.monotonic() < deadline:
                read(0.1)
            quiet_until = time.monotonic() + 1.0
            while time.monotonic() < quiet_until:
                read(0.1)
        finally:
            for process in [*workers, node]:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
                if process.stdout is not None:
                    process.stdout.close()
        starts = sum(runs.values())
        return {
            "messages": count,
            "processed": len(done),
            "handler runs": starts,
            "runs again": starts - len(done),
            "runs, host down": sum(1 for t in started_at if any(a <= t < b for a, b in down)),
            "cut short": cut,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--kills", type=int, default=1)
    args = parser.parse_args()
    rows = [("abandon_on_host_loss", run(args.count, args.kills, True))]
    rows.append(("abandon_on_host_loss=False", run(args.count, args.kills, False)))
    fields = list(rows[0][1])
    print(f"{'worker setting':<28}" + "  ".join(f"{f:>15}" for f in fields))
    for name, row in rows:
        print(f"{name:<28}" + "  ".join(f"{row[f]:>15,}" for f in fields))


if __name__ == "__main__":
    main()
