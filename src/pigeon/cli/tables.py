"""How the operating commands show what the admin layer answers: rich
tables sized to their content (a count nobody knows shows as ``-``)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from ..admin import QUEUE_FIELDS, SERVICE_FIELDS

UNKNOWN = "-"


def console() -> Console:
    """A console on stdout; off a terminal, wide enough that no table is
    squeezed (a table takes only the width it needs)."""
    if sys.stdout.isatty():
        return Console(highlight=False)
    return Console(width=max(shutil.get_terminal_size().columns, 400), highlight=False)


def cell(value: Any) -> str:
    if value is None:
        return UNKNOWN
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def queues_table(
    queues: Mapping[str, Mapping[str, Any]],
    rates: Mapping[str, Mapping[str, float | None]] | None = None,
    *,
    title: str | None = None,
) -> Table:
    """One row per queue: ``QUEUE_FIELDS``, then rates per second if given."""
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    table.add_column("queue", no_wrap=True)
    rate_columns = ("received_per_s", "acked_per_s") if rates is not None else ()
    for name in (*QUEUE_FIELDS, *rate_columns):
        table.add_column(name.replace("_per_s", "/s"), justify="right", no_wrap=True)
    for name, row in sorted(queues.items()):
        values = [cell(row.get(field)) for field in QUEUE_FIELDS]
        if rates is not None:
            values += [cell((rates.get(name) or {}).get(field)) for field in rate_columns]
        table.add_row(name, *values)
    return table


def services_table(services: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per service: ``SERVICE_FIELDS``."""
    table = Table(title="services", title_justify="left", box=None, pad_edge=False)
    table.add_column("service", no_wrap=True)
    for name in SERVICE_FIELDS:
        table.add_column(name, justify="right", no_wrap=True)
    for name, row in sorted(services.items()):
        table.add_row(name, *(cell(row.get(field)) for field in SERVICE_FIELDS))
    return table


def peers_table(peers: list[dict[str, Any]]) -> Table:
    table = Table(title="peers", title_justify="left", box=None, pad_edge=False)
    for name in ("address", "node", "up", "services"):
        table.add_column(name, no_wrap=name != "services")
    for peer in peers:
        table.add_row(
            cell(peer.get("address")),
            cell(peer.get("node")),
            cell(peer.get("up")),
            ", ".join(peer.get("services") or []) or UNKNOWN,
        )
    return table


def info_table(info: Mapping[str, Any]) -> Table:
    """What a system is, one line a field."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key in ("transport", "address", "node", "version"):
        table.add_row(key, cell(info.get(key)))
    table.add_row("services", ", ".join(info.get("services") or []) or UNKNOWN)
    table.add_row("peers", str(len(info.get("peers") or [])))
    return table


def top_view(
    address: str,
    queues: Mapping[str, Mapping[str, Any]],
    rates: Mapping[str, Mapping[str, float | None]],
    services: Mapping[str, Mapping[str, Any]],
    interval: float,
) -> Group:
    return Group(
        queues_table(queues, rates, title=f"queues at {address} (every {interval:g} s; q quits)"),
        "",
        services_table(services),
    )
