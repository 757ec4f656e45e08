"""``pigeon demo --with-seed``: the seed's own fountain and responders (raw
pyzmq, examples/seed/) with pigeon processors between them, joined by a
``pigeon bridge``: ``--pull`` from the fountain into the ``words`` queue,
``--rep`` serving ``case`` by calling the two responders.

Run the processor role alone: ``python -m pigeon.cli.demo_seed N URL``
(one JSON line per event on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pigeon

from .._ports import quiet_port
from .demo import report

PROCESSORS = 3
SEED_DIR = Path(__file__).resolve().parents[3] / "examples" / "seed"


def seed_dir() -> Path:
    """Where the seed's ported programs are (a source checkout's examples/seed)."""
    where = Path(os.environ.get("PIGEON_SEED_DIR", SEED_DIR))
    if not (where / "fountain.py").is_file():
        raise SystemExit(
            f"pigeon demo --with-seed: the seed's programs are not in {where} "
            "(they ship in a source checkout's examples/seed; set PIGEON_SEED_DIR)"
        )
    return where


async def processor(number: int, url: str, stop: asyncio.Event) -> None:
    """Take each word from ``words``, have ``case`` change it, report it."""
    async with pigeon.connect(url) as conn:

        async def process(delivery: pigeon.Delivery) -> None:
            reply = await conn.request("case", delivery.body, timeout=10.0)
            word = reply.body.decode()
            event = {
                "ev": "processed",
                "processor": number,
                "id": delivery.message.id,
                "word": word,
                # The seed's responders do not say who they are; the case does.
                "responder": "upper" if word.isupper() else "lower",
                "redelivered": delivery.message.redelivered,
            }
            print(json.dumps(event), flush=True)

        await conn.consume(
            "words", process, prefetch=2, retry=pigeon.RetryPolicy(max_attempts=50, max_delay=1.0)
        )
        print(json.dumps({"ev": "ready", "role": f"processor-{number}"}), flush=True)
        await stop.wait()


class SeedTally:
    """Words sent by the seed's fountain against words processed, as multisets
    (the seed's words carry no id until the bridge stores them)."""

    def __init__(self) -> None:
        self.produced: Counter[str] = Counter()
        self.by_id: dict[str, str] = {}
        self.duplicates = 0
        self.redelivered = 0
        self.by_processor: Counter[str] = Counter()
        self.by_responder: Counter[str] = Counter()
        self.fountain_done = False

    def on_line(self, line: str) -> None:
        if line.startswith("sent "):
            self.produced[line[5:].strip()] += 1
            return
        try:
            event = json.loads(line)
        except ValueError:
            return
        if event.get("ev") != "processed":
            return
        if event["id"] in self.by_id:
            self.duplicates += 1
            return
        self.by_id[event["id"]] = event["word"].lower()
        self.by_processor[f"processor-{event['processor']}"] += 1
        self.by_responder[event["responder"]] += 1
        self.redelivered += bool(event["redelivered"])
        print(event["processor"], event["word"], flush=True)

    def lost(self) -> int:
        return sum((self.produced - Counter(self.by_id.values())).values())

    def summary(self) -> dict[str, Any]:
        processed = sum(self.produced.values()) - self.lost()
        return {
            "produced": sum(self.produced.values()),
            "processed": processed,
            "lost": self.lost(),
            "duplicates": self.duplicates,
            "redelivered": self.redelivered,
            "by_processor": dict(sorted(self.by_processor.items())),
            "by_responder": dict(sorted(self.by_responder.items())),
            "kills": [],
        }


async def _start(tally: SeedTally, *argv: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            tally.on_line(line.decode(errors="replace"))

    asyncio.ensure_future(read())
    return proc


async def run_with_seed(args: argparse.Namespace, tally: SeedTally) -> None:
    seed = seed_dir()
    py = sys.executable
    fountain_url, node_url = (f"tcp://127.0.0.1:{quiet_port()}" for _ in range(2))
    responders = {case: f"tcp://127.0.0.1:{quiet_port()}" for case in ("upper", "lower")}
    procs: list[asyncio.subprocess.Process] = []
    for case, url in responders.items():
        procs.append(await _start(tally, py, str(seed / "responder.py"), url, case))
    bridge = await _start(
        tally,
        py,
        "-m",
        "pigeon.cli.main",
        "bridge",
        "--node",
        f"bind:{node_url}",
        "--pull",
        f"{fountain_url}=words",
        "--rep",
        "case=" + ",".join(responders.values()),
    )
    for n in range(1, PROCESSORS + 1):
        procs.append(await _start(tally, py, "-m", "pigeon.cli.demo_seed", str(n), node_url))
    count = (
        [] if args.seconds is None else ["--count", str(max(1, round(args.seconds * args.rate)))]
    )
    fountain = await _start(
        tally,
        py,
        str(seed / "fountain.py"),
        fountain_url,
        "--interval",
        str(1.0 / args.rate),
        "--echo",
        *count,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait(
        [waiter, asyncio.ensure_future(fountain.wait())], return_when="FIRST_COMPLETED"
    )
    if fountain.returncode is None:
        fountain.send_signal(signal.SIGINT)  # the seed stops on Ctrl-C
        await fountain.wait()
    deadline = loop.time() + args.drain_timeout
    while tally.lost() and loop.time() < deadline:  # noqa: ASYNC110 - lines arrive from readers
        await asyncio.sleep(0.1)
    if tally.lost():
        print("drain: stopped before every word was processed", flush=True)
    for proc in [bridge, *procs]:
        if proc.returncode is None:
            proc.terminate()
    for proc in [bridge, *procs]:
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def run(args: argparse.Namespace) -> int:
    tally = SeedTally()
    asyncio.run(run_with_seed(args, tally))
    return report(tally.summary(), as_json=args.json)


def main() -> None:
    number, url = int(sys.argv[1]), sys.argv[2]

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await processor(number, url, stop)

    asyncio.run(go())


if __name__ == "__main__":
    main()
