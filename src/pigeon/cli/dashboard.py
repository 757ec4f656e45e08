"""``pigeon dashboard URL``: serve a live web page of a pigeon system
(see docs/dashboard.md)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import click

from ..dashboard import open_dashboard
from ..dashboard.guard import is_loopback
from ..errors import ConfigurationError
from .options import connect_options, interval_option, key_options, timeout_option

TOKEN_ENV = "PIGEON_DASHBOARD_TOKEN"


@click.command(name="dashboard")
@click.argument("url", envvar="PIGEON_URL")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8642,
    show_default=True,
    help="the port to serve the page on (0: any free port, printed)",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="the address to serve on; anything but loopback lets other machines read the page",
)
@click.option(
    "--token",
    envvar=TOKEN_ENV,
    metavar="TOKEN",
    help=f"what replay and purge must carry (or {TOKEN_ENV}; default: a new one, printed)",
)
@interval_option(1.0)
@click.option(
    "--history",
    "points",
    type=click.IntRange(2, 3600),
    default=120,
    show_default=True,
    metavar="READINGS",
    help="readings each queue's sparkline keeps",
)
@timeout_option()
@key_options
def dashboard(
    url: str,
    port: int,
    host: str,
    token: str | None,
    interval: float,
    points: int,
    timeout: float,
    key: str | None,
    server_key: str | None,
) -> None:
    """Serve a live web page of the pigeon system at URL: queues, services,
    peers; replay or purge dead letters with the printed token.

    It starts even when nothing answers at URL yet (the page says so, and
    keeps trying); a URL it cannot use at all is a usage error (exit 2).
    """
    if token is not None and len(token) < 16:
        raise click.BadParameter("use at least 16 characters", param_hint="--token")
    options: dict[str, Any] = connect_options(key, server_key)
    asyncio.run(_serve(url, host, port, token, interval, points, timeout, options))


async def _serve(
    url: str,
    host: str,
    port: int,
    token: str | None,
    interval: float,
    points: int,
    timeout: float,
    options: dict[str, Any],
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_dashboard(
        url,
        host=host,
        port=port,
        token=token,
        interval=interval,
        timeout=timeout,
        points=points,
        **options,
    ) as board:
        watcher = board.watcher
        await watcher.read_once.wait()
        if isinstance(watcher.failure, ConfigurationError):
            raise watcher.failure  # a URL or key it can never use: exit 2
        where = f"{board.address}#token={board.token}" if token is None else board.address
        state = (
            f"; for now {watcher.error['kind']}: {watcher.error['message']} "
            "(the page says so, and it keeps trying)"
            if watcher.error
            else ""
        )
        click.echo(f"pigeon dashboard: serving {where} for {url}{state}")
        if token is not None:
            click.echo("pigeon dashboard: replay and purge take the token given")
        if not is_loopback(host):
            click.echo(
                f"pigeon dashboard: {host} is reachable from other machines: anyone who "
                "reaches it reads the page, and the token travels unencrypted",
                err=True,
            )
        await stop.wait()
    click.echo("pigeon dashboard: stopped")
