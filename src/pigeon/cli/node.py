"""``pigeon node``: a standalone node hosting (durable) queues for many
producers and workers (``pigeon queues`` and the other operating commands,
in ``cli.operate``, show and change what it hosts)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import click

import pigeon
from pigeon._core import topics

from ..logs import configure as configure_logs
from .options import Parsed, log_options


def _retention(text: str) -> tuple[str, dict[str, Any]]:
    """``PATTERN:count=N,bytes=B,age=S`` as (pattern, retain() keywords)."""
    pattern, sep, bounds = text.rpartition(":")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PATTERN:BOUNDS, e.g. 'prices.>:count=100,age=3600'"
        )
    fields: dict[str, Any] = {}
    for item in bounds.split(","):
        name, eq, value = item.partition("=")
        try:
            if name == "count":
                fields["max_count"] = int(value)
            elif name == "bytes":
                fields["max_bytes"] = _size(value)
            elif name == "age":
                fields["max_age"] = float(value)
            else:
                raise ValueError(f"unknown bound {name!r} (count, bytes or age)")
            if not eq:
                raise ValueError(f"{name} needs a value ({name}=...)")
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    try:
        topics.check_pattern(pattern)
        topics.Retention(**fields).check()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return pattern, fields


def _size(text: str) -> int:
    """A byte count: digits, with an optional K, M or G (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}")
    return int(digits) * scale


@click.command(name="node")
@click.option(
    "--bind",
    multiple=True,
    required=True,
    metavar="URL",
    help="address to serve on, e.g. tcp://127.0.0.1:5555 (repeatable)",
)
@click.option("--store", metavar="PATH", help="SQLite file that makes the hosted queues durable")
@click.option(
    "--synchronous",
    type=click.Choice(["full", "normal"]),
    default="full",
    help="full: every confirm is fsynced (default); normal: faster, "
    "may lose the last confirms on power loss",
)
@click.option(
    "--min-free-disk",
    type=Parsed("BYTES", _size, (argparse.ArgumentTypeError,)),
    metavar="BYTES",
    help="refuse new messages while less than this is free on the store's "
    "filesystem (default 64M; 0 turns it off; K, M, G suffixes)",
)
@click.option(
    "--salvage",
    is_flag=True,
    help="open a damaged store anyway: keep what checks out, quarantine the rest",
)
@click.option("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
@click.option("--key", metavar="PATH.key_secret", help="this node's secret key (or PIGEON_KEY)")
@click.option("--allow", metavar="ACL.toml", help="the client keys let in and what each may do")
@click.option("--insecure", is_flag=True, help="serve an address other machines reach without keys")
@click.option(
    "--max-attempts",
    type=int,
    default=0,
    help="deliveries after which a message is dead-lettered (default 0: no host limit)",
)
@click.option("--max-queues", type=int, default=10_000, help="queues held at most (default 10000)")
@click.option(
    "--queues",
    metavar="FILE",
    help='per-queue policies: a TOML file of [queue."NAME"] tables (names or patterns) '
    "with max_attempts, max_length, max_bytes, max_prefetch, lease_ttl, max_lease_ttl, "
    "max_delay",
)
@click.option(
    "--max-prefetch",
    type=int,
    default=1000,
    help="unsettled deliveries one consumer may hold (default 1000)",
)
@click.option(
    "--max-lease-ttl",
    type=float,
    default=3600.0,
    metavar="SECONDS",
    help="longest lease a consumer may ask for (default 3600)",
)
@click.option(
    "--max-memory",
    type=int,
    default=128 << 20,
    metavar="BYTES",
    help="bytes of bodies held before the fullest queues refuse sends (default 128 MiB)",
)
@click.option(
    "--retain",
    multiple=True,
    type=Parsed("PATTERN:BOUNDS", _retention, (argparse.ArgumentTypeError,)),
    metavar="PATTERN:BOUNDS",
    help="keep history of the topics PATTERN matches, e.g. 'prices.>:count=100,age=3600' "
    "(count messages per topic, bytes, age in seconds; repeatable)",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="serve Prometheus metrics on PORT at /metrics (0: any free port; needs the metrics extra)",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="the address the metrics endpoint listens on",
)
@log_options
def node_command(**settings: Any) -> None:
    """Run a node that hosts queues for other processes."""
    configure_logs(settings.pop("log_level"), settings.pop("log_format"))
    sys.exit(run_node(argparse.Namespace(**settings)))


def _metrics(port: int | None) -> list[Any]:
    """The middleware ``--metrics-port`` asks for (none without it)."""
    if port is None:
        return []
    try:
        from .. import metrics
    except ImportError as exc:
        raise click.UsageError(f"--metrics-port: {exc}") from None
    return [metrics.PrometheusMetrics()]


def run_node(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {
        "heartbeat": args.heartbeat,
        "max_attempts": args.max_attempts,
        "max_queues": args.max_queues,
        "max_prefetch": args.max_prefetch,
        "max_lease_ttl": args.max_lease_ttl,
        "max_memory": args.max_memory,
    }
    if args.key:
        options["key"] = args.key
    if args.allow:
        options["allow"] = args.allow
    if args.queues:
        options["queues"] = args.queues
    if args.insecure:
        options["insecure"] = True
    if args.store:
        options.update(store=args.store, synchronous=args.synchronous, salvage=args.salvage)
        if args.min_free_disk is not None:
            options["min_free_disk"] = args.min_free_disk

    middleware = _metrics(getattr(args, "metrics_port", None))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with pigeon.connect(bind=args.bind, middleware=middleware, **options) as node:
            for pattern, bounds in args.retain:
                await node.retain(pattern, **bounds)
            if args.allow:
                loop.add_signal_handler(signal.SIGHUP, _reload, node)
            stats = node.stats()
            where = ", ".join(stats["bound"])
            kept = (
                f"durable in {args.store} ({stats['restored']} messages restored)"
                if args.store
                else "in memory"
            )
            keys = f"; keys on, ACL {args.allow}" if args.allow else ""
            print(f"pigeon node: serving {where}; queues {kept}{keys}", flush=True)
            if middleware:
                from ..metrics import serve_metrics

                try:
                    endpoint = serve_metrics(args.metrics_port, args.metrics_host)
                except OSError as exc:
                    raise pigeon.ConfigurationError(
                        f"--metrics-port {args.metrics_port}: cannot listen on "
                        f"{args.metrics_host}: {exc.strerror or exc}"
                    ) from None
                print(f"pigeon node: metrics on {endpoint.url}", flush=True)
            report = (stats.get("store") or {}).get("salvage")
            if report:
                print(
                    f"pigeon node: store salvaged: {report['damage']}; kept "
                    f"{report['rows_kept']} rows, quarantined {report['quarantined']}, "
                    f"brought back {report['recovered_commits']} of "
                    f"{report['missing_commits']} missing commits; the damaged files "
                    f"are kept as {report['kept_as']}",
                    flush=True,
                )
            await stop.wait()
            print("pigeon node: stopping (committing what is pending)", flush=True)
        print("pigeon node: stopped", flush=True)

    asyncio.run(main())
    return 0


def _reload(node: pigeon.Connection) -> None:
    """SIGHUP: read the ACL file again; a bad file keeps the old one."""
    try:
        stopped = node.reload_acl()
    except pigeon.PigeonError as exc:
        print(f"pigeon node: ACL not reloaded, the old one stays: {exc}", flush=True)
        return
    print(f"pigeon node: ACL reloaded ({stopped} consumer(s) lost their grant)", flush=True)
