"""The operating commands: ``pigeon queues``, ``dead``, ``replay``,
``purge``, ``top``, ``ping`` and ``info``, on every transport, through
``pigeon.admin``. Each has ``--json``; each exits 69 with "Nothing reachable
at URL" when nothing answers (see ``cli.exits``)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console, RenderableType
from rich.live import Live

from ..admin import Admin, Unreachable, open_admin
from ..admin.rates import QueueRates
from . import tables
from .keypress import quit_keys
from .options import connect_options, interval_option, json_option, key_options, timeout_option

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

MEMORY_NOTE = (
    "memory:// is the in-process broker of this process: from a separate "
    "pigeon command it is an empty broker of its own (and inproc:// reaches "
    "nothing)."
)


def _url_argument(fn: F) -> F:
    return click.argument("url", envvar="PIGEON_URL", metavar="URL")(fn)


def _queue_names_option(fn: F) -> F:
    return click.option(
        "--queue",
        "queue_names",
        multiple=True,
        metavar="NAME",
        help="a queue to show on RabbitMQ beside the ones pigeon declared (repeatable)",
    )(fn)


def _run(
    url: str,
    timeout: float,
    options: dict[str, Any],
    work: Callable[[Admin], Awaitable[T]],
) -> T:
    # aio-pika logs a refused connection itself; the command says it once.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    if url.startswith("inproc://"):
        # Only the process that binds it can reach it; this one does not.
        raise Unreachable(url, "an inproc:// address is reached only from its own process")

    async def main() -> T:
        async with await open_admin(url, timeout=timeout, **options) as admin:
            return await work(admin)

    return asyncio.run(main())


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, default=str))


# -- pigeon queues ------------------------------------------------------------


@click.command(name="queues", epilog=MEMORY_NOTE)
@_url_argument
@click.option("--watch", is_flag=True, help="keep showing them, with rates per second")
@interval_option(2.0)
@json_option
@timeout_option()
@key_options
@_queue_names_option
def queues_command(
    url: str,
    watch: bool,
    interval: float,
    as_json: bool,
    timeout: float,
    key: str | None,
    server_key: str | None,
    queue_names: tuple[str, ...],
) -> None:
    """Show the queues at URL: ready, delayed, in flight, consumers, counters
    and dead letters (a dash where the system does not say)."""
    options = _admin_options(key, server_key, queue_names)
    if not watch:
        overview = _run(url, timeout, options, lambda admin: admin.overview())
        if as_json:
            _print_json(overview)
        else:
            tables.console().print(tables.queues_table(overview["queues"]))
        return

    async def watching(admin: Admin) -> None:
        readings = QueueRates()
        with _live(as_json) as live:
            while True:
                overview = await admin.overview()
                rates = readings.update(overview["queues"], time.monotonic())
                if as_json:
                    _print_json({**overview, "rates": rates})
                    sys.stdout.flush()
                elif live is not None:
                    live.update(
                        tables.queues_table(overview["queues"], rates, title=url), refresh=True
                    )
                await asyncio.sleep(interval)

    _until_interrupted(lambda: _run(url, timeout, options, watching))


# -- pigeon dead / replay / purge -------------------------------------------


@click.command(name="dead", epilog=MEMORY_NOTE)
@_url_argument
@click.argument("queue")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="letters shown at most",
)
@json_option
@timeout_option()
@key_options
def dead_command(
    url: str,
    queue: str,
    limit: int,
    as_json: bool,
    timeout: float,
    key: str | None,
    server_key: str | None,
) -> None:
    """List the oldest dead letters of QUEUE (left in place)."""
    letters = _run(url, timeout, _admin_options(key, server_key), lambda a: a.dead(queue, limit))
    if as_json:
        _print_json(letters)
        return
    for letter in letters:
        click.echo(f"{letter['id']}  attempts={letter['attempts']}  {letter['reason']}")
        click.echo(f"    {letter['body']!r}")
    click.echo(f"{len(letters)} dead letter(s) shown for {queue!r}")


@click.command(name="replay", epilog=MEMORY_NOTE)
@_url_argument
@click.argument("queue")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=None,
    help="letters moved at most (default all)",
)
@json_option
@timeout_option()
@key_options
def replay_command(
    url: str,
    queue: str,
    limit: int | None,
    as_json: bool,
    timeout: float,
    key: str | None,
    server_key: str | None,
) -> None:
    """Move the dead letters of QUEUE back into it."""
    moved = _run(url, timeout, _admin_options(key, server_key), lambda a: a.replay(queue, limit))
    if as_json:
        _print_json({"queue": queue, "replayed": moved})
        return
    click.echo(f"replayed {moved} dead letter(s) into {queue!r}")


@click.command(name="purge", epilog=MEMORY_NOTE)
@_url_argument
@click.argument("queue")
@click.option("--dead", "of_dead", is_flag=True, help="remove its dead letters instead")
@click.option("--yes", "-y", is_flag=True, help="do not ask to confirm")
@json_option
@timeout_option()
@key_options
def purge_command(
    url: str,
    queue: str,
    of_dead: bool,
    yes: bool,
    as_json: bool,
    timeout: float,
    key: str | None,
    server_key: str | None,
) -> None:
    """Remove the ready messages of QUEUE (its dead letters with --dead);
    messages in flight stay with their consumers. Asks first on a terminal."""
    what = f"the dead letters of {queue!r}" if of_dead else f"the ready messages of {queue!r}"
    if not yes and sys.stdin.isatty():
        click.confirm(f"Remove {what} at {url}?", abort=True)
    purged = _run(
        url, timeout, _admin_options(key, server_key), lambda a: a.purge(queue, dead=of_dead)
    )
    if as_json:
        _print_json({"queue": queue, "dead": of_dead, "purged": purged})
        return
    click.echo(f"purged {purged} message(s): {what}")


# -- pigeon top ---------------------------------------------------------------


@click.command(name="top", epilog=MEMORY_NOTE)
@_url_argument
@interval_option(2.0)
@click.option(
    "--count", type=click.IntRange(min=1), default=None, help="stop after this many readings"
)
@json_option
@timeout_option()
@key_options
@_queue_names_option
def top_command(
    url: str,
    interval: float,
    count: int | None,
    as_json: bool,
    timeout: float,
    key: str | None,
    server_key: str | None,
    queue_names: tuple[str, ...],
) -> None:
    """A live view of URL: queues with rates per second, services with calls,
    errors and latency; q or Ctrl-C quits. --json prints one snapshot a line."""
    options = _admin_options(key, server_key, queue_names)

    async def showing(admin: Admin) -> None:
        rates_of = QueueRates()
        readings = 0
        with _live(as_json) as live, quit_keys() as quit_pressed:
            while count is None or readings < count:
                queues, services = await admin.queues(), await admin.services()
                rates = rates_of.update(queues, time.monotonic())
                readings += 1
                if as_json:
                    _print_json({"queues": queues, "rates": rates, "services": services})
                    sys.stdout.flush()
                elif live is not None:
                    live.update(
                        tables.top_view(url, queues, rates, services, interval), refresh=True
                    )
                if count is not None and readings >= count:
                    break
                try:
                    await asyncio.wait_for(quit_pressed.wait(), interval)
                    return
                except TimeoutError:
                    pass

    _until_interrupted(lambda: _run(url, timeout, options, showing))


# -- pigeon ping / info --------------------------------------------------------


@click.command(name="ping", epilog=MEMORY_NOTE)
@_url_argument
@click.option("--count", "-c", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--interval", type=click.FloatRange(min=0), default=1.0, show_default=True, metavar="S"
)
@json_option
@timeout_option()
@key_options
def ping_command(
    url: str,
    count: int,
    interval: float,
    as_json: bool,
    timeout: float,
    key: str | None,
    server_key: str | None,
) -> None:
    """Round trips to URL (exit 69 when nothing answers)."""

    async def pinging(admin: Admin) -> None:
        for n in range(count):
            if n:
                await asyncio.sleep(interval)
            seconds = await admin.ping()
            if as_json:
                _print_json({"address": url, "seq": n + 1, "ms": round(seconds * 1000, 3)})
            else:
                click.echo(f"answer from {url}: seq={n + 1} time={seconds * 1000:.2f} ms")

    _until_interrupted(lambda: _run(url, timeout, _admin_options(key, server_key), pinging))


@click.command(name="info", epilog=MEMORY_NOTE)
@_url_argument
@json_option
@timeout_option()
@key_options
def info_command(
    url: str, as_json: bool, timeout: float, key: str | None, server_key: str | None
) -> None:
    """What URL is: transport, address, node or broker version, services, peers."""
    info = _run(url, timeout, _admin_options(key, server_key), lambda admin: admin.info())
    if as_json:
        _print_json(info)
        return
    out = tables.console()
    out.print(tables.info_table(info))
    if info.get("peers"):
        out.print()
        out.print(tables.peers_table(info["peers"]))


# -- helpers -------------------------------------------------------------------


def _admin_options(
    key: str | None, server_key: str | None, queue_names: tuple[str, ...] = ()
) -> dict[str, Any]:
    options = connect_options(key, server_key)
    if queue_names:
        options["queues"] = list(queue_names)
    return options


class _NoLive:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


class _Printed:
    """Off a terminal a live view is each reading printed in turn."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def __enter__(self) -> _Printed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def update(self, view: RenderableType, refresh: bool = True) -> None:
        self.console.print(view)
        self.console.print()


def _live(as_json: bool) -> Any:
    """A live view on stdout (none for --json, which prints lines)."""
    if as_json:
        return _NoLive()
    console = tables.console()
    if not console.is_terminal:
        return _Printed(console)
    return Live(console=console, auto_refresh=False, redirect_stderr=False)


def _until_interrupted(run: Callable[[], object]) -> None:
    """Run a view until it ends or Ctrl-C, which ends it quietly."""
    try:
        run()
    except KeyboardInterrupt:
        pass


COMMANDS = (
    queues_command,
    dead_command,
    replay_command,
    purge_command,
    top_command,
    ping_command,
    info_command,
)
