"""``pigeon send``, ``pigeon publish`` and ``pigeon request``: put messages
on a queue or a topic, or call a service, from a shell.

Each takes its body from an argument, ``--file`` or stdin, may repeat it
``--count`` times at ``--rate`` per second (paced against the start time,
so a late message does not delay the rest), and shows a progress bar on a
terminal. Sends and publishes are confirmed by their host before the
command says they were sent.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click

import pigeon

from .._core.service_stats import BUCKETS, ServiceTally, upper_edge
from . import bodies
from .options import json_option, key_options, timeout_option
from .reach import open_connection

# Sends in flight before the command waits for their confirmations: enough
# to keep a link busy, few enough that a refusal is seen soon.
_WINDOW = 1000

Advance = Callable[[int], None]


def _message_options(fn: Any) -> Any:
    """The options send, publish and request share."""
    for decorate in reversed(
        (
            click.argument("body", required=False),
            click.option(
                "--file",
                type=click.Path(exists=True, dir_okay=False, allow_dash=True),
                metavar="PATH",
                help="read the body from PATH ('-': stdin)",
            ),
            click.option(
                "--count",
                type=click.IntRange(min=1),
                default=1,
                show_default=True,
                help="how many times to send it",
            ),
            click.option(
                "--rate",
                type=click.FloatRange(min=0, min_open=True),
                metavar="PER_SECOND",
                help="pace the messages at this many per second (default: as fast as they go)",
            ),
            click.option(
                "--header",
                "headers",
                multiple=True,
                metavar="NAME=VALUE",
                callback=bodies.parse_headers,
                help="a header to send (repeatable)",
            ),
            click.option(
                "--content-type",
                metavar="TYPE",
                help="text, json, msgpack or bytes (or their MIME types); json and msgpack "
                "bodies are checked (default: text when the body is UTF-8, else bytes)",
            ),
            timeout_option(5.0),
            key_options,
            json_option,
        )
    ):
        fn = decorate(fn)
    return fn


@contextmanager
def _progress(total: int, label: str, *, as_json: bool) -> Iterator[Advance]:
    """A progress bar on stderr for a run of more than one message, shown
    only when a person watches (stdout and stderr are terminals)."""
    if total < 2 or as_json or not (sys.stdout.isatty() and sys.stderr.isatty()):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


async def _pace(started: float, index: int, rate: float | None) -> None:
    """Wait until message ``index`` is due: ``index / rate`` seconds after
    ``started`` (loop time), however long the earlier ones took."""
    if rate is None:
        return
    loop = asyncio.get_running_loop()
    delay = started + index / rate - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _settle(pending: list[asyncio.Future[None]], timeout: float) -> None:
    """Wait for the confirmations of ``pending`` (then empty it).

    Raises:
        the first send's own error (Forbidden, MessageTooLarge, ...), or
        Timeout: some were not confirmed within ``timeout``.
    """
    if not pending:
        return
    done, late = await asyncio.wait(pending, timeout=timeout)
    pending.clear()
    errors = [f.exception() for f in done if not f.cancelled() and f.exception() is not None]
    for future in late:
        future.add_done_callback(_retrieve)
    if errors:
        raise errors[0]  # type: ignore[misc]
    if late:
        raise pigeon.Timeout(f"{len(late)} message(s) not confirmed within {timeout:g} s")


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _produce(
    count: int,
    rate: float | None,
    timeout: float,
    nowait: Callable[[], asyncio.Future[None]],
    waiting: Callable[[], Awaitable[Any]],
    advance: Advance,
) -> float:
    """Send ``count`` messages with ``nowait``; returns the seconds it took.

    A full outbox or queue (Backpressure) is waited out with ``waiting``,
    the same send that waits for room, so nothing is dropped or resent.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    pending: list[asyncio.Future[None]] = []
    for index in range(count):
        await _pace(started, index, rate)
        try:
            pending.append(nowait())
        except pigeon.Backpressure:
            await _settle(pending, timeout)
            await waiting()
        if len(pending) >= _WINDOW:
            await _settle(pending, timeout)
        advance(1)
    await _settle(pending, timeout)
    return loop.time() - started


@dataclass(frozen=True, slots=True)
class _Run:
    """How a command's run of messages goes (its shared options)."""

    count: int
    rate: float | None
    timeout: float
    key: str | None
    server_key: str | None
    as_json: bool


def _produce_at(
    url: str,
    label: str,
    run: _Run,
    nowait: Callable[[pigeon.Connection], asyncio.Future[None]],
    waiting: Callable[[pigeon.Connection], Awaitable[Any]],
) -> float:
    """Connect to ``url`` and send ``run.count`` messages with ``nowait``
    (``waiting`` when one meets Backpressure); returns the seconds it took."""

    async def main() -> float:
        async with open_connection(
            url, timeout=run.timeout, key=run.key, server_key=run.server_key
        ) as conn:
            with _progress(run.count, label, as_json=run.as_json) as advance:
                return await _produce(
                    run.count,
                    run.rate,
                    run.timeout,
                    lambda: nowait(conn),
                    lambda: waiting(conn),
                    advance,
                )

    return asyncio.run(main())


def _summary(verb: str, count: int, where: str, seconds: float) -> str:
    rate = f" ({count / seconds:,.0f}/s)" if seconds > 0 and count > 1 else ""
    return (
        f"{verb} {count} message{'s' if count != 1 else ''} to {where!r} in {seconds:.3f} s{rate}"
    )


def _report(verb: str, key: str, where: str, count: int, seconds: float, *, as_json: bool) -> None:
    if as_json:
        rate = count / seconds if seconds > 0 else None
        click.echo(json.dumps({"sent": count, key: where, "seconds": seconds, "rate": rate}))
    else:
        click.echo(_summary(verb, count, where, seconds))


@click.command(name="send")
@click.argument("url")
@click.argument("queue")
@_message_options
@click.option(
    "--delay",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="store it now, deliver it no sooner than SECONDS from now",
)
def send(
    url: str,
    queue: str,
    body: str | None,
    file: str | None,
    count: int,
    rate: float | None,
    headers: dict[str, str],
    content_type: str | None,
    timeout: float,
    key: str | None,
    server_key: str | None,
    as_json: bool,
    delay: float | None,
) -> None:
    """Send BODY to QUEUE at URL (BODY, --file PATH, or stdin).

    Each message counts as sent once the queue's host confirmed it stored it.
    """
    value, ctype = bodies.payload(bodies.read_body(body, file), content_type)
    options: dict[str, Any] = {"headers": headers or None, "content_type": ctype, "delay": delay}
    seconds = _produce_at(
        url,
        f"send {queue}",
        _Run(count, rate, timeout, key, server_key, as_json),
        lambda conn: conn.send_nowait(queue, value, **options),
        lambda conn: conn.send(queue, value, timeout=timeout, **options),
    )
    _report("sent", "queue", queue, count, seconds, as_json=as_json)


@click.command(name="publish")
@click.argument("url")
@click.argument("topic")
@_message_options
def publish(
    url: str,
    topic: str,
    body: str | None,
    file: str | None,
    count: int,
    rate: float | None,
    headers: dict[str, str],
    content_type: str | None,
    timeout: float,
    key: str | None,
    server_key: str | None,
    as_json: bool,
) -> None:
    """Publish BODY on TOPIC at URL (BODY, --file PATH, or stdin).

    Each message counts as published once the topic's host (or broker) took it.
    """
    value, ctype = bodies.payload(bodies.read_body(body, file), content_type)
    options: dict[str, Any] = {"headers": headers or None, "content_type": ctype}
    seconds = _produce_at(
        url,
        f"publish {topic}",
        _Run(count, rate, timeout, key, server_key, as_json),
        lambda conn: conn.publish_nowait(topic, value, **options),
        lambda conn: conn.publish(topic, value, timeout=timeout, **options),
    )
    _report("published", "topic", topic, count, seconds, as_json=as_json)


@click.command(name="request", short_help="Call SERVICE at URL with BODY and print the reply.")
@click.argument("url")
@click.argument("service")
@_message_options
def request(
    url: str,
    service: str,
    body: str | None,
    file: str | None,
    count: int,
    rate: float | None,
    headers: dict[str, str],
    content_type: str | None,
    timeout: float,
    key: str | None,
    server_key: str | None,
    as_json: bool,
) -> None:
    """Call SERVICE at URL with BODY (BODY, --file PATH, or stdin) and print
    the reply: its text on a terminal, its bytes to a pipe. With --count,
    the calls go one after another and the latency p50/p99 is printed.
    With --json, each reply is a line as it comes, then a summary line."""
    value, ctype = bodies.payload(bodies.read_body(body, file), content_type)
    # Latencies go into the node's fixed buckets, so a long run holds no
    # more than one counter per bucket; replies are printed as they come.
    latency = ServiceTally()

    async def main() -> tuple[pigeon.Message | None, float]:
        last: pigeon.Message | None = None
        loop = asyncio.get_running_loop()
        async with open_connection(url, timeout=timeout, key=key, server_key=server_key) as conn:
            started = loop.time()
            with _progress(count, f"request {service}", as_json=as_json) as advance:
                for index in range(count):
                    await _pace(started, index, rate)
                    sent = loop.time()
                    last = await conn.request(
                        service,
                        value,
                        timeout=timeout,
                        headers=headers or None,
                        content_type=ctype,
                    )
                    latency.record(loop.time() - sent, failed=False)
                    if as_json:
                        click.echo(json.dumps(bodies.as_json(last)))
                    advance(1)
            return last, loop.time() - started

    last, seconds = asyncio.run(main())
    p50, p99 = latency.percentile(0.50), latency.percentile(0.99)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "requests": count,
                    "seconds": seconds,
                    "rate": count / seconds if seconds > 0 else None,
                    "p50": _finite(p50),
                    "p99": _finite(p99),
                }
            )
        )
    elif count == 1 and last is not None:  # one call made (or it raised)
        _print_body(last.body)
    else:
        click.echo(
            f"{count} replies from {service!r} in {seconds:.3f} s"
            f"{f' ({count / seconds:,.0f}/s)' if seconds > 0 else ''}; "
            f"latency p50 {_ms(p50)}, p99 {_ms(p99)}"
        )


def _finite(seconds: float | None) -> float | None:
    """A bucket's edge for JSON: None beyond the last bucket (no JSON number)."""
    return None if seconds is None or math.isinf(seconds) else seconds


def _ms(seconds: float | None) -> str:
    edge = _finite(seconds)
    return f"{edge * 1000:.2f} ms" if edge is not None else f"over {upper_edge(BUCKETS - 1):.0f} s"


def _print_body(body: bytes) -> None:
    """A reply as text on a terminal, as its exact bytes to a pipe or file."""
    if sys.stdout.isatty():
        click.echo(bodies.as_text(body))
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
