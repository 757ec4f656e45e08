"""``pigeon node``: a standalone node hosting (durable) queues for many
producers and workers; and ``pigeon queues``: what a node hosts."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

import pigeon
from pigeon.transports.zmq.node import INFO_SERVICE


def add_parsers(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="run a node that hosts queues for other processes")
    node.add_argument("--bind", action="append", required=True, metavar="URL",
                      help="address to serve on, e.g. tcp://127.0.0.1:5555 (repeatable)")
    node.add_argument("--store", metavar="PATH",
                      help="SQLite file that makes the hosted queues durable")
    node.add_argument("--synchronous", choices=("full", "normal"), default="full",
                      help="full: every confirm is fsynced (default); normal: faster, "
                           "may lose the last confirms on power loss")
    node.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    node.set_defaults(func=run_node)

    queues = subparsers.add_parser("queues", help="show the queues a node hosts")
    queues.add_argument("url", help="the node's address, e.g. tcp://127.0.0.1:5555")
    queues.add_argument("--json", action="store_true", help="print the raw JSON")
    queues.add_argument("--timeout", type=float, default=3.0)
    queues.set_defaults(func=run_queues)


def run_node(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"heartbeat": args.heartbeat}
    if args.store:
        options.update(store=args.store, synchronous=args.synchronous)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with pigeon.connect(bind=args.bind, **options) as node:
            stats = node.stats()
            where = ", ".join(stats["bound"])
            kept = f"durable in {args.store} ({stats['restored']} messages restored)" \
                if args.store else "in memory"
            print(f"pigeon node: serving {where}; queues {kept}", flush=True)
            await stop.wait()
            print("pigeon node: stopping (committing what is pending)", flush=True)
        print("pigeon node: stopped", flush=True)

    asyncio.run(main())
    return 0


def run_queues(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        async with pigeon.connect(args.url) as conn:
            reply = await conn.request(INFO_SERVICE, b"", timeout=args.timeout)
            info: dict[str, Any] = reply.decode()
            return info

    info = asyncio.run(main())
    if args.json:
        print(json.dumps(info))
        return 0
    columns = ("ready", "delayed", "in_flight", "consumers", "received", "acked",
               "redelivered", "dead_lettered")
    print(f"{'queue':<24}" + "".join(f"{c:>14}" for c in columns))
    for name, queue in sorted(info.get("queues", {}).items()):
        print(f"{name:<24}" + "".join(f"{queue.get(c, 0):>14}" for c in columns))
    return 0
