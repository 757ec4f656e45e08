"""``pigeon subscribe`` and ``pigeon tail``: print the events published on
topics matching a pattern as they arrive, one line each; ``tail`` starts in
the topics' retained history.

Ctrl-C (or SIGTERM) ends a run cleanly, with the count of events on
stderr; a closed pipe (``| head``) ends it quietly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import click

import pigeon

from . import bodies
from .options import json_option, key_options, timeout_option
from .reach import open_connection


def _line(event: pigeon.Event, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {"topic": event.topic, "seq": event.seq, "missed": event.missed}
            | bodies.as_json(event.message)
        )
    return f"{event.topic} {event.seq} {bodies.as_text(event.message.body)}"


async def until_signal(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until it ends or SIGINT/SIGTERM comes; a signal cancels
    it and is not an error (what was printed so far is the answer).

    Raises:
        whatever ``work`` raised.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        working.cancel()
    try:
        await working
    except asyncio.CancelledError:
        if not stop.is_set():
            raise  # cancelled from outside, not by a signal


def follow(
    command: str,
    url: str,
    pattern: str,
    *,
    count: int | None,
    timeout: float,
    key: str | None,
    server_key: str | None,
    as_json: bool,
    **start: Any,
) -> None:
    """Print the events of a subscription to ``pattern`` until ``count`` of
    them came, or a signal; ``start`` are ``Connection.subscription``
    keywords (``name``, ``last``, ``from_seq``)."""

    async def main() -> int:
        seen = 0
        async with open_connection(url, timeout=timeout, key=key, server_key=server_key) as conn:

            async def consume() -> None:
                nonlocal seen
                closed = False
                async with conn.subscription(pattern, **start) as events:
                    async for event in events:
                        if event.missed and not as_json:
                            click.echo(
                                f"pigeon {command}: {event.missed} event(s) of {event.topic} "
                                f"missed before {event.seq}",
                                err=True,
                            )
                        try:
                            sys.stdout.write(_line(event, as_json=as_json) + "\n")
                            sys.stdout.flush()
                        except BrokenPipeError:
                            # Raised out of the loop, the subscription would take
                            # it as the event's handler failing (and log it).
                            closed = True
                            break
                        seen += 1
                        if count is not None and seen >= count:
                            return
                if closed:
                    raise BrokenPipeError  # the reader went away: end quietly

            await until_signal(consume())
        return seen

    seen = asyncio.run(main())
    click.echo(f"pigeon {command}: {seen} event(s)", err=True)


def _subscription_options(fn: Any) -> Any:
    for decorate in reversed(
        (
            click.argument("url"),
            click.argument("pattern"),
            click.option(
                "--count",
                type=click.IntRange(min=1),
                help="stop after this many events (default: until Ctrl-C)",
            ),
            timeout_option(5.0),
            key_options,
            json_option,
        )
    ):
        fn = decorate(fn)
    return fn


@click.command(
    name="subscribe", short_help="Print the events on topics matching PATTERN as they arrive."
)
@_subscription_options
@click.option(
    "--name",
    help="a durable subscription: kept while nobody listens, shared by every subscriber "
    "with this name",
)
def subscribe(
    url: str,
    pattern: str,
    count: int | None,
    timeout: float,
    key: str | None,
    server_key: str | None,
    as_json: bool,
    name: str | None,
) -> None:
    """Print the events published on topics matching PATTERN at URL as they
    arrive: 'topic seq body', or with --json one object per line (topic, seq,
    missed, headers, body as text or base64)."""
    follow(
        "subscribe",
        url,
        pattern,
        count=count,
        timeout=timeout,
        key=key,
        server_key=server_key,
        as_json=as_json,
        name=name,
    )


@click.command(
    name="tail", short_help="Print the retained events of topics matching PATTERN, then follow."
)
@_subscription_options
@click.option(
    "--last",
    type=click.IntRange(min=1),
    help="start with the last N retained events of each matching topic (default 10)",
)
@click.option(
    "--from-seq",
    type=click.IntRange(min=0),
    metavar="SEQ",
    help="start at this number in the retained history",
)
def tail(
    url: str,
    pattern: str,
    count: int | None,
    timeout: float,
    key: str | None,
    server_key: str | None,
    as_json: bool,
    last: int | None,
    from_seq: int | None,
) -> None:
    """Print the retained events of the topics matching PATTERN at URL, then
    follow new ones as they arrive (the topics must be retained: see
    pigeon node --retain)."""
    if last is not None and from_seq is not None:
        raise click.UsageError("give --last or --from-seq, not both")
    start = {"from_seq": from_seq} if from_seq is not None else {"last": last or 10}
    follow(
        "tail",
        url,
        pattern,
        count=count,
        timeout=timeout,
        key=key,
        server_key=server_key,
        as_json=as_json,
        **start,
    )
