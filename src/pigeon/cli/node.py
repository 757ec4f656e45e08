"""``pigeon node``: a standalone node hosting (durable) queues for many
producers and workers; and ``pigeon queues``: what a node hosts."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

import pigeon
from pigeon.transports.zmq.admin import DEAD_SERVICE, INFO_SERVICE, REPLAY_SERVICE


def add_parsers(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="run a node that hosts queues for other processes")
    node.add_argument(
        "--bind",
        action="append",
        required=True,
        metavar="URL",
        help="address to serve on, e.g. tcp://127.0.0.1:5555 (repeatable)",
    )
    node.add_argument(
        "--store", metavar="PATH", help="SQLite file that makes the hosted queues durable"
    )
    node.add_argument(
        "--synchronous",
        choices=("full", "normal"),
        default="full",
        help="full: every confirm is fsynced (default); normal: faster, "
        "may lose the last confirms on power loss",
    )
    node.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    node.set_defaults(func=run_node)

    queues = subparsers.add_parser("queues", help="show the queues a node hosts")
    queues.add_argument("url", help="the node's address, e.g. tcp://127.0.0.1:5555")
    queues.add_argument("--json", action="store_true", help="print the raw JSON")
    queues.add_argument("--timeout", type=float, default=3.0)
    queues.set_defaults(func=run_queues)

    dead = subparsers.add_parser("dead", help="list a queue's dead letters on a node")
    dead.add_argument("url")
    dead.add_argument("queue")
    dead.add_argument("--limit", type=int, default=20)
    dead.add_argument("--json", action="store_true", help="print the raw JSON")
    dead.add_argument("--timeout", type=float, default=3.0)
    dead.set_defaults(func=run_dead)

    replay = subparsers.add_parser("replay", help="move a queue's dead letters back into it")
    replay.add_argument("url")
    replay.add_argument("queue")
    replay.add_argument("--limit", type=int, default=None)
    replay.add_argument("--timeout", type=float, default=3.0)
    replay.set_defaults(func=run_replay)


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
            kept = (
                f"durable in {args.store} ({stats['restored']} messages restored)"
                if args.store
                else "in memory"
            )
            print(f"pigeon node: serving {where}; queues {kept}", flush=True)
            await stop.wait()
            print("pigeon node: stopping (committing what is pending)", flush=True)
        print("pigeon node: stopped", flush=True)

    asyncio.run(main())
    return 0


def _ask(url: str, service: str, payload: Any, timeout: float) -> Any:
    async def main() -> Any:
        # The node is expected to be there: wait for its handshake as long
        # as the whole timeout, not just the default grace.
        async with pigeon.connect(url, connect_grace=timeout) as conn:
            return (await conn.request(service, payload, timeout=timeout)).decode()

    return asyncio.run(main())


def run_queues(args: argparse.Namespace) -> int:
    info: dict[str, Any] = _ask(args.url, INFO_SERVICE, b"", args.timeout)
    if args.json:
        print(json.dumps(info))
        return 0
    columns = (
        "ready",
        "delayed",
        "in_flight",
        "consumers",
        "received",
        "acked",
        "redelivered",
        "dead_lettered",
    )
    print(f"{'queue':<24}" + "".join(f"{c:>14}" for c in columns))
    for name, queue in sorted(info.get("queues", {}).items()):
        print(f"{name:<24}" + "".join(f"{queue.get(c, 0):>14}" for c in columns))
    return 0


def run_dead(args: argparse.Namespace) -> int:
    letters = _ask(args.url, DEAD_SERVICE, {"queue": args.queue, "limit": args.limit}, args.timeout)
    if args.json:
        print(json.dumps(letters))
        return 0
    for letter in letters:
        print(f"{letter['id']}  attempts={letter['attempts']}  {letter['reason']}")
        print(f"    {letter['body']!r}")
    print(f"{len(letters)} dead letter(s) shown for {args.queue!r}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    answer = _ask(
        args.url, REPLAY_SERVICE, {"queue": args.queue, "limit": args.limit}, args.timeout
    )
    print(f"replayed {answer['replayed']} dead letter(s) into {args.queue!r}")
    return 0
