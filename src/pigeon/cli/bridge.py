"""``pigeon bridge``: join plain ZeroMQ peers (the seed's own programs) to
pigeon queues and services. See docs/bridges.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from functools import partial
from typing import Any

import click
import zmq.asyncio

import pigeon
from pigeon.bridge import PlainBridge, open_bridge
from pigeon.bridge.base import DEFAULT_MAX_IN_FLIGHT

from .._core.bridging import USAGE, BridgeSpec, Kind, parse_endpoint, parse_spec
from ..errors import ConfigurationError
from .options import Parsed, connect_options, key_options

DESCRIPTION = """\
Bridge plain ZeroMQ peers and pigeon. A plain message is its body as one
frame; multipart or empty ones are counted and dropped (a REQ client gets a
one-frame 'pigeon.error ...' answer instead). A URL may start with bind: or
connect: to override the default.

\b
  --pull URL=QUEUE           a plain PUSH peer feeds QUEUE (connects). At-most-once
                             until the queue's host confirms it stored a message.
  --push URL=QUEUE           QUEUE feeds plain PULL peers (binds). A delivery is
                             acked only once ZeroMQ took it for a peer; no peer is
                             backpressure; at-most-once after the send.
  --rep SERVICE=URL[,URL...] serve SERVICE by calling plain REP servers (connects),
                             lazy pirate: a timeout closes the socket and the call
                             goes to the next server. At-least-once to the servers.
  --req URL=SERVICE          plain REQ clients call SERVICE (binds); every request
                             gets exactly one answer: the reply, or an error.

Each bridge holds at most --max-in-flight messages. SIGINT/SIGTERM stop it:
nothing new is read, what is in flight is finished (or handed back to its
queue), and the counters are printed.
"""


def _spec_options(fn: Any) -> Any:
    for kind, what in reversed(
        (
            (Kind.PULL, "read a plain PUSH peer at URL into QUEUE (connects by default)"),
            (Kind.PUSH, "push QUEUE to plain PULL peers at URL (binds by default)"),
            (Kind.REP, "serve SERVICE by calling plain REP servers (connects by default)"),
            (Kind.REQ, "answer plain REQ clients at URL with SERVICE (binds by default)"),
        )
    ):
        fn = click.option(
            f"--{kind.value}",
            kind.value,
            multiple=True,
            type=Parsed(USAGE[kind], partial(parse_spec, kind), (ConfigurationError,)),
            metavar=USAGE[kind],
            help=f"{what}; repeatable",
        )(fn)
    return fn


@click.command(
    name="bridge",
    help=DESCRIPTION,
    short_help="Bridge plain ZeroMQ PUSH/PULL/REQ/REP peers and pigeon queues and services.",
)
@_spec_options
@click.option(
    "--node",
    multiple=True,
    required=True,
    type=Parsed(
        "URL",
        partial(parse_endpoint, bind_by_default=False, what="--node URL"),
        (ConfigurationError,),
    ),
    metavar="URL",
    help="the pigeon side: a node to connect to, or bind:URL to host the queues and "
    "services here (repeatable)",
)
@click.option(
    "--max-in-flight",
    type=int,
    default=DEFAULT_MAX_IN_FLIGHT,
    help=f"messages each bridge holds at most (default {DEFAULT_MAX_IN_FLIGHT})",
)
@click.option(
    "--drain-timeout",
    type=float,
    default=5.0,
    help="seconds to finish what is in flight on stop (default 5)",
)
@click.option("--json", is_flag=True, help="end with one JSON line of the stats")
@key_options
def bridge(**settings: Any) -> None:
    sys.exit(run(argparse.Namespace(**settings)))


def run(args: argparse.Namespace) -> int:
    specs: list[BridgeSpec] = [*args.pull, *args.push, *args.rep, *args.req]
    if not specs:
        raise SystemExit("pigeon bridge: give at least one of --pull, --push, --rep, --req")
    if args.max_in_flight < 1:
        raise SystemExit("pigeon bridge: --max-in-flight must be >= 1")
    connect_urls = [e.url for e in args.node if not e.bind]
    bind_urls = [e.url for e in args.node if e.bind]
    stats: list[dict[str, Any]] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        context = zmq.asyncio.Context()
        bridges: list[PlainBridge] = []
        try:
            async with pigeon.connect(
                connect_urls or None,
                bind=bind_urls or None,
                **connect_options(args.key, args.server_key),
            ) as conn:
                for spec in specs:
                    bridge = open_bridge(
                        conn, spec.kind, spec, context=context, max_in_flight=args.max_in_flight
                    )
                    await bridge.start()
                    bridges.append(bridge)
                where = ", ".join(str(e) for e in args.node)
                print(f"pigeon bridge: node {where}", flush=True)
                for bridge in bridges:
                    print(f"pigeon bridge: running {bridge.spec}", flush=True)
                await stop.wait()
                print("pigeon bridge: stopping (finishing what is in flight)", flush=True)
                # Plain sides first, so nothing new comes in while the pigeon side drains.
                await asyncio.gather(*(b.close(args.drain_timeout) for b in bridges))
        finally:
            for bridge in bridges:
                await bridge.close(0)
                stats.append(bridge.stats())
            context.term()

    asyncio.run(main())
    for entry in stats:
        counters = ", ".join(
            f"{k} {v}" for k, v in entry.items() if k not in ("bridge", "kind", "name")
        )
        print(f"pigeon bridge: {entry['bridge']}: {counters}", flush=True)
    print("pigeon bridge: stopped", flush=True)
    if args.json:
        print(json.dumps({"bridges": stats}), flush=True)
    return 0
