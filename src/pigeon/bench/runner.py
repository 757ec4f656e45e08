"""``pigeon bench``: command line, registry of variants, and the run loop.

Adding a system or a variant is one function plus one :data:`REGISTRY` line.
A variant function takes the parsed options (and ``size=`` for sized
variants, ``curve=True`` for the CURVE rows), runs its processes, and returns
a dict with any of ``msgs_per_s``, ``p50_us``, ``p99_us``, ``peak_rss_mb`` and
``note``; it raises :class:`~pigeon.bench.harness.Skip` when it cannot run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pigeon._extras import install_hint
from pigeon.bench import report
from pigeon.bench.harness import Skip, probe

# "disk" is not a product but a floor: the disk's fsync rate (queue-durable).
SYSTEMS = ("pigeon", "pyzmq", "nats", "rabbitmq", "redis", "disk")
PEERS = SYSTEMS[1:]
SCENARIOS = ("queue", "queue-durable", "rpc", "backlog", "hostile", "fanout")
FIELDS = ("msgs_per_s", "p50_us", "p99_us", "peak_rss_mb")
# What every fanout row reports besides FIELDS (None where it does not apply;
# gaps, missed, dropped and uncounted are pigeon's): see pigeon.bench.fanout.
FANOUT_FIELDS = (
    "subscribers",
    "size",
    "sent",
    "received",
    "lost",
    "gaps",
    "missed",
    "dropped",
    "uncounted",
)


@dataclass(frozen=True)
class Entry:
    """One measured row: which system, which variant, and the function to call.

    Attributes:
        system: One of :data:`SYSTEMS`.
        variant: Row label; ``{size}`` is expanded once per ``--size`` value.
        func: ``"module:function"``, imported only when the row runs, so a
            missing client library only affects its own rows.
        curve_of: For a CURVE row, the variant (of the same system) it is
            the encrypted twin of: ``func`` is called with ``curve=True`` and
            the row reports ``vs_plain`` against that one. ``--no-curve``
            leaves these rows out.
        versus: For a peer's row, the pigeon variant its "pigeon ×" is
            taken against, when that is not the variant of the same name.
        floor: For a pigeon row, the ``(system, variant)`` of the raw row
            that bounds it (the same work without pigeon); the row reports
            ``vs_floor`` against that one.
        kwargs: More keyword arguments for ``func`` (a fanout row's
            ``subscribers``).
    """

    system: str
    variant: str
    func: str
    curve_of: str | None = None
    versus: str | None = None
    floor: tuple[str, str] | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def sized(self) -> bool:
        return "{size}" in self.variant


_Z, _N, _A, _R, _D, _P, _F = (
    f"pigeon.bench.{m}"
    for m in (
        "peers_zmq",
        "peers_nats",
        "peers_amqp",
        "peers_redis",
        "peers_disk",
        "pigeon_side",
        "fanout",
    )
)

# The shape a user writes: a standalone `pigeon node`, a producer in each of
# three styles, three workers; each style against the raw floor for it.
PUSH_PULL = ("pyzmq", "{size}")
ROUND_TRIPS = ("pyzmq", "REQ/REP round trips {size}")
FSYNC = ("disk", "fsync per write")
AWAIT_SEND, SEND_NOWAIT, SEND_MANY = (
    f"node, {style} {{size}}" for style in ("await send", "send_nowait", "send_many")
)


def _node_entries(prefix: str, await_send_floor: tuple[str, str]) -> list[Entry]:
    """The node rows, whose functions are ``{prefix}await_send`` and so on."""
    return [
        Entry("pigeon", AWAIT_SEND, f"{_P}:{prefix}await_send", floor=await_send_floor),
        Entry("pigeon", SEND_NOWAIT, f"{_P}:{prefix}send_nowait", floor=PUSH_PULL),
        Entry("pigeon", SEND_MANY, f"{_P}:{prefix}send_many", floor=PUSH_PULL),
    ]


def _redis_entries(prefix: str) -> list[Entry]:
    """Redis Streams, each producer style against the node row of its kind."""
    return [
        Entry(
            "redis", "XADD one at a time {size}", f"{_R}:{prefix}one_at_a_time", versus=AWAIT_SEND
        ),
        Entry("redis", "XADD pipelined 1000 {size}", f"{_R}:{prefix}pipelined", versus=SEND_MANY),
    ]


def subscribers_label(n: int) -> str:
    """``1`` -> ``1 subscriber``, ``4`` -> ``4 subscribers``."""
    return f"{n} subscriber" if n == 1 else f"{n} subscribers"


def _fanout_entries(n: int) -> list[Entry]:
    """One publisher to ``n`` subscribers: pigeon through a hub node and
    with the publisher binding, each publish style; raw PUB/SUB; NATS core."""
    subs = subscribers_label(n)
    kwargs = (("subscribers", n),)
    pigeon_rows = [
        Entry("pigeon", f"{where}, {style}, {subs}", f"{_F}:{func}", kwargs=kwargs)
        for where, prefix in (("hub node", "hub"), ("publisher binds", "binds"))
        for style, func in (
            ("await publish", f"{prefix}_await_publish"),
            ("publish_nowait + flush", f"{prefix}_publish_nowait"),
        )
    ]
    versus = f"hub node, publish_nowait + flush, {subs}"
    return [
        *pigeon_rows,
        Entry("pyzmq", f"PUB/SUB, {subs}", f"{_F}:pyzmq_pub_sub", versus=versus, kwargs=kwargs),
        Entry("nats", f"core pub/sub, {subs}", f"{_F}:nats_pub_sub", versus=versus, kwargs=kwargs),
    ]


REGISTRY: dict[str, list[Entry]] = {
    "queue": [
        Entry("pigeon", "{size}", f"{_P}:queue"),
        Entry("pigeon", "{size} curve", f"{_P}:queue", curve_of="{size}"),
        Entry("pyzmq", "{size}", f"{_Z}:queue"),
        Entry("pyzmq", "{size} curve", f"{_Z}:queue", curve_of="{size}"),
        Entry("nats", "{size}", f"{_N}:queue"),
        Entry("rabbitmq", "{size}", f"{_A}:queue"),
        *_node_entries("node_", await_send_floor=ROUND_TRIPS),
        Entry(*ROUND_TRIPS, f"{_Z}:req_rep_round_trips"),
        *_redis_entries("queue_"),
    ],
    "queue-durable": [
        Entry("pigeon", "{size} durable", f"{_P}:queue_durable"),
        Entry("nats", "{size} durable", f"{_N}:queue_durable"),
        Entry("rabbitmq", "{size} durable", f"{_A}:queue_durable"),
        *_node_entries("durable_node_", await_send_floor=FSYNC),
        Entry(*PUSH_PULL, f"{_Z}:queue"),
        Entry(*ROUND_TRIPS, f"{_Z}:req_rep_round_trips"),
        Entry(*FSYNC, f"{_D}:fsync_per_write"),
        *_redis_entries("queue_durable_"),
    ],
    "rpc": [
        Entry("pigeon", "1 in flight", f"{_P}:rpc_latency"),
        Entry("pigeon", "curve, 1 in flight", f"{_P}:rpc_latency", curve_of="1 in flight"),
        Entry("pigeon", "10 in flight", f"{_P}:rpc_ten_in_flight"),
        Entry("pigeon", "100 in flight", f"{_P}:rpc_throughput"),
        Entry("pigeon", "curve, 100 in flight", f"{_P}:rpc_throughput", curve_of="100 in flight"),
        Entry("pigeon", "sync, 1 in flight", f"{_P}:rpc_sync_latency"),
        Entry("pigeon", "sync, 100 threads", f"{_P}:rpc_sync_throughput"),
        # Through a node that relays to a server connected to it: the same
        # shape as a call through a broker, so its floor is raw REQ/REP and
        # NATS (a broker between the two) is the peer to compare.
        Entry(
            "pigeon",
            "node relay, 1 in flight",
            f"{_P}:rpc_node_latency",
            floor=("pyzmq", "1 in flight"),
        ),
        Entry(
            "pigeon",
            "node relay, 100 in flight",
            f"{_P}:rpc_node_throughput",
            floor=("pyzmq", "100 in flight"),
        ),
        Entry("pyzmq", "1 in flight", f"{_Z}:rpc_latency"),
        Entry("pyzmq", "curve, 1 in flight", f"{_Z}:rpc_latency", curve_of="1 in flight"),
        Entry("pyzmq", "10 in flight", f"{_Z}:rpc_ten_in_flight"),
        Entry("pyzmq", "100 in flight", f"{_Z}:rpc_throughput"),
        Entry("pyzmq", "curve, 100 in flight", f"{_Z}:rpc_throughput", curve_of="100 in flight"),
        Entry("nats", "1 in flight", f"{_N}:rpc_latency"),
        Entry("nats", "10 in flight", f"{_N}:rpc_ten_in_flight"),
        Entry("nats", "100 in flight", f"{_N}:rpc_throughput"),
        Entry("rabbitmq", "1 in flight", f"{_A}:rpc_latency"),
        Entry("rabbitmq", "100 in flight", f"{_A}:rpc_throughput"),
    ],
    "backlog": [
        Entry("pigeon", "{count} x 100B", f"{_P}:backlog"),
        Entry("pyzmq", "{count} x 100B", f"{_Z}:backlog"),
        Entry("nats", "{count} x 100B", f"{_N}:backlog"),
        Entry("rabbitmq", "{count} x 100B", f"{_A}:backlog"),
    ],
    "fanout": [*_fanout_entries(1), *_fanout_entries(4)],
}


def _availability(opts: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """Per-system check run once before its rows; raises Skip with the reason."""
    from pigeon.bench import pigeon_side

    return {
        "pigeon": pigeon_side.available,
        "pyzmq": lambda: None,
        "nats": lambda: probe(opts.nats_url),
        "rabbitmq": lambda: probe(opts.amqp_url),
        "redis": lambda: _redis_available(opts.redis_url),
        "disk": lambda: None,
    }


def _redis_available(url: str) -> None:
    """Skip redis when redis-py is missing or the server does not answer."""
    try:
        import redis  # noqa: F401 - the import is the check
    except ImportError:
        raise Skip(f"redis-py is not installed: {install_hint('bench')}") from None
    probe(url)


def size_label(size: int) -> str:
    """``16`` -> ``16B``, ``1024`` -> ``1KiB``."""
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= div and size % div == 0:
            return f"{size // div}{unit}"
    return f"{size}B"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``pigeon bench`` arguments."""
    p = argparse.ArgumentParser(
        prog="pigeon bench",
        description=(
            "Compare pigeon with raw pyzmq, NATS, RabbitMQ and Redis Streams "
            "on the same shapes of work."
        ),
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument(
        "--seconds", type=float, default=3.0, help="measuring time per variant (default 3)"
    )
    p.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated peers to compare with (pigeon always runs; "
        "disk is the fsync floor of queue-durable)",
    )
    p.add_argument(
        "--size",
        default=None,
        help="body sizes in bytes for queue scenarios (default 16,1024); "
        "fanout: one size (default 100)",
    )
    p.add_argument("--count", type=int, default=1_000_000, help="backlog size (backlog only)")
    p.add_argument(
        "--store",
        action="store_true",
        help="backlog: pigeon's node keeps the backlog in its durable store (SQLite)",
    )
    p.add_argument(
        "--curve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the CURVE-encrypted rows (pigeon and pyzmq; queue and rpc; default on)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--chart", metavar="PATH", help="write a PNG bar chart of the results")
    p.add_argument(
        "--nats-url", default=os.environ.get("PIGEON_BENCH_NATS_URL", "nats://127.0.0.1:4222")
    )
    p.add_argument(
        "--amqp-url",
        default=os.environ.get("PIGEON_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("PIGEON_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )
    opts = p.parse_args(argv)
    opts.peers = [s.strip() for s in opts.peers.split(",") if s.strip()]
    if bad := [s for s in opts.peers if s not in SYSTEMS]:
        p.error(f"unknown peer(s): {', '.join(bad)}; choose from {', '.join(PEERS)}")
    if opts.size is None:
        opts.size = "100" if opts.scenario == "fanout" else "16,1024"
    opts.sizes = [int(s) for s in opts.size.split(",") if s.strip()]
    if opts.seconds <= 0 or opts.count < 2 or not opts.sizes:
        p.error("--seconds must be > 0, --count >= 2 and --size non-empty")
    if opts.scenario == "fanout" and len(opts.sizes) != 1:
        p.error("fanout takes one --size")
    return opts


@dataclass(frozen=True)
class Row:
    """One row to run: an :class:`Entry` with its size (if any) filled in."""

    system: str
    variant: str
    func: str
    kwargs: dict[str, Any]
    curve_of: str | None  # the plain variant this CURVE row is compared with
    versus: str | None  # the pigeon variant for "pigeon ×", if not its own
    floor: tuple[str, str] | None  # the raw row a pigeon row is compared with


def _rows(scenario: str, systems: list[str], opts: argparse.Namespace) -> list[Row]:
    """Expand the registry into rows: by size, then in registry order of the
    variants (so a CURVE row follows its plain twin), pigeon first per variant."""
    entries = [
        e for e in REGISTRY[scenario] if e.system in systems and (opts.curve or e.curve_of is None)
    ]
    templates = list(dict.fromkeys(e.variant for e in entries))
    keyed: list[tuple[tuple[int, int, int], Row]] = []
    for entry in entries:
        for n, size in enumerate(opts.sizes if entry.sized else [None]):

            def fill(template: str, size: int | None = size) -> str:
                return template.format(size=size_label(size or 0), count=opts.count)

            kwargs: dict[str, Any] = {"size": size} if size else {}
            kwargs.update(entry.kwargs)
            if entry.curve_of is not None:
                kwargs["curve"] = True
            row = Row(
                entry.system,
                fill(entry.variant),
                entry.func,
                kwargs,
                fill(entry.curve_of) if entry.curve_of is not None else None,
                fill(entry.versus) if entry.versus is not None else None,
                (entry.floor[0], fill(entry.floor[1])) if entry.floor is not None else None,
            )
            order = (n, templates.index(entry.variant), systems.index(entry.system))
            keyed.append((order, row))
    return [row for _, row in sorted(keyed, key=lambda k: k[0])]


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Run one scenario and return the JSON-shaped document."""
    systems = ["pigeon"] + [s for s in opts.peers if s != "pigeon"]
    if opts.scenario == "fanout":  # its peers are only those with fanout rows
        systems = [s for s in systems if any(e.system == s for e in REGISTRY["fanout"])]
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    checks = _availability(opts)
    down: set[str] = set()
    for system in systems:
        try:
            checks[system]()
        except Skip as exc:
            down.add(system)
            skipped.append({"system": system, "variant": None, "reason": str(exc)})
    plain_of: dict[tuple[str, str], str] = {}
    versus_of: dict[tuple[str, str], str] = {}
    floor_of: dict[tuple[str, str], tuple[str, str]] = {}
    for r in _rows(opts.scenario, systems, opts):
        system, variant, func, kwargs = r.system, r.variant, r.func, r.kwargs
        if system in down:
            continue
        if r.curve_of is not None:
            plain_of[system, variant] = r.curve_of
        if r.versus is not None:
            versus_of[system, variant] = r.versus
        if r.floor is not None:
            floor_of[system, variant] = r.floor
        print(f"{opts.scenario}: {system} {variant} …", end="", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            module, name = func.split(":")
            row = getattr(importlib.import_module(module), name)(opts, **kwargs)
        except Skip as exc:
            skipped.append({"system": system, "variant": variant, "reason": str(exc)})
            print(f" skipped: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # one broken row must not lose the others
            reason = f"failed: {type(exc).__name__}: {exc}"
            skipped.append({"system": system, "variant": variant, "reason": reason})
            print(f" {reason}", file=sys.stderr)
            continue
        out = {"system": system, "variant": variant}
        out.update({k: row.get(k) for k in FIELDS})
        if opts.scenario == "fanout":
            out.update({k: row.get(k) for k in FANOUT_FIELDS})
        out["note"] = row.get("note")
        results.append(out)
        print(f" {report.short(out)} ({time.monotonic() - t:.1f} s)", file=sys.stderr)
    doc = {"scenario": opts.scenario, "results": results, "skipped": skipped}
    report.add_ratios(doc, plain_of, versus_of=versus_of, floor_of=floor_of)
    if opts.scenario == "fanout":
        report.add_fanout_ratios(doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``pigeon bench``; returns a process exit code."""
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits on --help and on usage errors
        return int(exc.code or 0)
    if opts.scenario == "hostile":
        from pigeon.bench import hostile

        doc = hostile.run(opts)
        print(hostile.table(doc))
        if opts.json:
            print(json.dumps(doc))
        return 0
    doc = run(opts)
    print(report.table(doc))
    if opts.chart:
        try:
            report.chart(doc, opts.chart)
        except ImportError:
            print(
                f"pigeon bench: --chart needs matplotlib: {install_hint('bench')}",
                file=sys.stderr,
            )
            return 2
        print(f"chart written to {opts.chart}", file=sys.stderr)
    if opts.json:
        print(report.to_json(doc))
    return 0
