"""Rendering of a benchmark document: text table, JSON line, PNG chart.

Everything here works from the JSON-shaped document returned by
:func:`pigeon.bench.runner.run`, so a saved ``--json`` line can be re-rendered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


def _num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def short(row: dict[str, Any]) -> str:
    """One-line summary of a result row for the progress output."""
    parts = [f"{_num(row.get('msgs_per_s'))} msgs/s"]
    if row.get("p50_us") is not None:
        parts.append(f"p50 {_num(row['p50_us'])} µs p99 {_num(row['p99_us'])} µs")
    if row.get("peak_rss_mb") is not None:
        parts.append(f"peak RSS {_num(row['peak_rss_mb'])} MB")
    return ", ".join(parts)


def ratio(row: dict[str, Any], pigeon: dict[str, Any] | None) -> float | None:
    """How many times better pigeon is than ``row`` (> 1: pigeon better).

    Latency variants (one request in flight) compare p50; all others
    compare throughput, even where they report latencies too.
    """
    if not pigeon:
        return None
    latency_row = str(row.get("variant", "")).endswith("1 in flight")
    if latency_row and row.get("p50_us") and pigeon.get("p50_us"):
        return float(row["p50_us"] / pigeon["p50_us"])
    if row.get("msgs_per_s") and pigeon.get("msgs_per_s"):
        return float(pigeon["msgs_per_s"] / row["msgs_per_s"])
    return None


Key = tuple[str, str]  # (system, variant)


def add_ratios(
    doc: dict[str, Any],
    plain_of: dict[Key, str],
    *,
    versus_of: dict[Key, str] | None = None,
    floor_of: dict[Key, Key] | None = None,
) -> None:
    """Put the ratios into every result row of ``doc``.

    ``pigeon_x``: the "pigeon ×" column, :func:`ratio` against pigeon's row of
    the same variant, or of the variant ``versus_of[system, variant]`` names
    (Redis's XADD rows against the node rows of the same producer style).
    ``vs_plain``: for a CURVE row, how it compares with the
    same system's row without CURVE (``plain_of[system, variant]`` names that
    variant), as :func:`ratio` does it: its throughput ÷ the plain row's, or
    the plain p50 ÷ its p50 for latency rows; < 1 means CURVE costs.
    ``floor`` and ``vs_floor``: for a pigeon row measured against a raw
    floor (``floor_of[system, variant]``, such as raw PUSH/PULL for the node's
    send_many), the floor's ``"system variant"`` and this row's throughput ÷
    the floor's; < 1 means below the floor. Rows these do not apply to get
    None.
    """
    results = doc["results"]
    by_key = {(r["system"], r["variant"]): r for r in results}
    versus_of, floor_of = versus_of or {}, floor_of or {}
    for r in results:
        key = (r["system"], r["variant"])
        r["pigeon_x"] = ratio(r, by_key.get(("pigeon", versus_of.get(key, r["variant"]))))
        plain = plain_of.get(key)
        base = by_key.get((r["system"], plain)) if plain is not None else None
        r["vs_plain"] = ratio(base, r) if base is not None else None
        floor = floor_of.get(key)
        below = by_key.get(floor) if floor is not None else None
        r["floor"] = " ".join(floor) if floor is not None else None
        r["vs_floor"] = _throughput_ratio(r, below) if below is not None else None


def add_fanout_ratios(doc: dict[str, Any]) -> None:
    """Put ``vs_pyzmq`` and ``vs_nats`` into every row of a fanout document:
    for a pigeon row, its deliveries/s ÷ those of the raw pyzmq PUB/SUB row
    and of the nats-py row with as many subscribers (None without one, and
    on the peers' own rows)."""
    peers = {
        (r["system"], r.get("subscribers")): r
        for r in doc["results"]
        if r["system"] in ("pyzmq", "nats")
    }
    for r in doc["results"]:
        for system in ("pyzmq", "nats"):
            peer = peers.get((system, r.get("subscribers")))
            mine = r["system"] == "pigeon" and peer is not None
            r[f"vs_{system}"] = _throughput_ratio(r, peer) if mine and peer else None


def _throughput_ratio(row: dict[str, Any], base: dict[str, Any]) -> float | None:
    if row.get("msgs_per_s") and base.get("msgs_per_s"):
        return float(row["msgs_per_s"] / base["msgs_per_s"])
    return None


def table(doc: dict[str, Any]) -> str:
    """Fixed-width table of results followed by the skipped systems.

    The "vs plain" column is there when some row has ``vs_plain`` (CURVE
    rows), the "vs floor" one when some row has ``vs_floor`` (node rows).
    A fanout document has columns of its own (:func:`fanout_table`).
    """
    if doc["scenario"] == "fanout":
        return fanout_table(doc)
    results = doc["results"]
    curve = any(r.get("vs_plain") is not None for r in results)
    floors = any(r.get("vs_floor") is not None for r in results)
    head: tuple[str, ...] = ("system", "variant", "msgs/s", "p50 µs", "p99 µs", "peak RSS MB")
    head += ("pigeon ×",) + (("vs plain",) if curve else ()) + (("vs floor",) if floors else ())
    head += ("note",)
    body = [
        (
            r["system"],
            r["variant"],
            _num(r["msgs_per_s"]),
            _num(r["p50_us"]),
            _num(r["p99_us"]),
            _num(r["peak_rss_mb"]),
            _num(r.get("pigeon_x"), 2),
            *((_num(r.get("vs_plain"), 2),) if curve else ()),
            *((_floor_cell(r),) if floors else ()),
            r.get("note") or "",
        )
        for r in results
    ]
    last_number = len(head) - 2
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = [f"scenario: {doc['scenario']}"]
    for i, cells in enumerate([head, *body]):
        lines.append(
            "  ".join(
                str(c).rjust(w) if 2 <= j <= last_number else str(c).ljust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not results:
        lines.append("(no results)")
    for s in doc["skipped"]:
        where = f" {s['variant']}" if s.get("variant") else ""
        lines.append(f"skipped: {s['system']}{where}: {s['reason']}")
    lines.append(
        "pigeon ×: > 1 means pigeon is better (throughput ratio, or p50 ratio for latency rows)"
    )
    if curve:
        lines.append(
            "vs plain: a CURVE row against the same system without CURVE "
            "(< 1 means CURVE costs; same ratios)"
        )
    if floors:
        lines.append(
            "vs floor: a node row's msgs/s ÷ that of the raw row named beside it "
            "(< 1 means below that floor)"
        )
    return "\n".join(lines)


def _grid(head: Sequence[str], body: Sequence[Sequence[object]], left: int) -> list[str]:
    """Fixed-width lines: the first ``left`` columns and the last one
    left-aligned, the others right-aligned; a rule under the head."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = []
    for i, cells in enumerate([head, *body]):
        lines.append(
            "  ".join(
                str(c).ljust(w) if j < left or j == len(head) - 1 else str(c).rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def fanout_table(doc: dict[str, Any]) -> str:
    """The fanout rows: deliveries/s, the ratios, and what was lost and counted."""
    results = doc["results"]
    head = (
        "system",
        "variant",
        "deliveries/s",
        "× pyzmq",
        "× nats",
        "pigeon ×",
        "sent",
        "lost",
        "gaps",
        "missed",
        "dropped",
        "uncounted",
        "note",
    )
    body = [
        (
            r["system"],
            r["variant"],
            _num(r["msgs_per_s"]),
            _num(r.get("vs_pyzmq"), 2),
            _num(r.get("vs_nats"), 2),
            _num(r.get("pigeon_x"), 2),
            _num(r.get("sent")),
            _num(r.get("lost")),
            _num(r.get("gaps")),
            _num(r.get("missed")),
            _num(r.get("dropped")),
            _num(r.get("uncounted")),
            r.get("note") or "",
        )
        for r in results
    ]
    size = next((r.get("size") for r in results if r.get("size")), None)
    lines = [f"scenario: fanout ({_num(size)} B messages, tcp loopback)"]
    lines += _grid(head, body, left=2)
    if not results:
        lines.append("(no results)")
    for s in doc["skipped"]:
        where = f" {s['variant']}" if s.get("variant") else ""
        lines.append(f"skipped: {s['system']}{where}: {s['reason']}")
    lines += [
        "deliveries/s: messages received by all subscribers ÷ (last delivery − first publish)",
        "× pyzmq, × nats: a pigeon row's deliveries/s ÷ those of raw PUB/SUB, of nats-py core,"
        " with as many subscribers; pigeon ×: the hub publish_nowait row ÷ that peer row",
        "lost: sent × subscribers − received; gaps, missed: counted by pigeon's subscribers;"
        " dropped: by its topic host; uncounted: lost − missed (0: every gap counted)",
    ]
    return "\n".join(lines)


def _floor_cell(row: dict[str, Any]) -> str:
    if row.get("vs_floor") is None:
        return "-"
    return f"{_num(row['vs_floor'], 2)} of {row['floor']}"


def to_json(doc: dict[str, Any]) -> str:
    """The document as one line of JSON (NaN becomes null)."""

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    out = {
        "scenario": doc["scenario"],
        "results": [{k: clean(v) for k, v in r.items()} for r in doc["results"]],
        "skipped": doc["skipped"],
    }
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def chart(doc: dict[str, Any], path: str) -> None:
    """Write a grouped bar chart: one panel per metric present, bars per system.

    Throughput uses a log axis because the systems span three orders of magnitude.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot import
    import matplotlib.pyplot as plt

    metrics = [
        (k, label, log)
        for k, label, log in (
            ("msgs_per_s", "msgs/s (log)", True),
            ("p50_us", "p50 µs", False),
            ("p99_us", "p99 µs", False),
            ("peak_rss_mb", "peak RSS MB", False),
        )
        if any(r.get(k) is not None for r in doc["results"])
    ]
    variants = list(dict.fromkeys(r["variant"] for r in doc["results"]))
    systems = list(dict.fromkeys(r["system"] for r in doc["results"]))
    fig, axes = plt.subplots(
        1, max(1, len(metrics)), figsize=(5 * max(1, len(metrics)), 4), squeeze=False
    )
    width = 0.8 / max(1, len(systems))
    for ax, (key, label, log) in zip(axes[0], metrics, strict=False):
        for i, system in enumerate(systems):
            vals = [
                next(
                    (
                        r.get(key)
                        for r in doc["results"]
                        if r["system"] == system and r["variant"] == v
                    ),
                    None,
                )
                for v in variants
            ]
            xs = [x + i * width for x in range(len(variants))]
            ax.bar(xs, [math.nan if v is None else v for v in vals], width, label=system)
        ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(variants))])
        ax.set_xticklabels(variants, rotation=15)
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
    axes[0][0].legend()
    fig.suptitle(f"pigeon bench {doc['scenario']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
