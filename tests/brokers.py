"""What the tests need from the network: brokers, which may not be running
(skip with a reason on a machine without one, fail when ``CI`` is set: CI
must have them), and TCP ports, which other programs on the machine may take
at any moment.

Ports: whatever can bind ``tcp://127.0.0.1:0`` and report the port it got
should (``Connection.stats()["bound"]``, the ``pigeon node`` banner). Where a
test needs a port before anything binds it, :func:`free_port` picks one and
the test retries the whole start with a new one when the bind is refused
(:func:`port_taken`, :func:`retry_on_port_clash`): between picking and
binding, someone else may have taken it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import pytest

import pigeon

NATS_URL = os.environ.get("PIGEON_NATS_URL", "nats://127.0.0.1:4222")
AMQP_URL = os.environ.get("PIGEON_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
_DEFAULT_PORTS = {"nats": 4222, "amqp": 5672}

ANY_PORT = "tcp://127.0.0.1:0"  # bind here and read the port back
ADDRESS_IN_USE = os.strerror(98)  # "Address already in use" (EADDRINUSE on Linux)

T = TypeVar("T")


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), 1.0):
            return True
    except OSError:
        return False


# Brokers found not to answer their protocol's greeting, with when to look
# again: meanwhile every test that needs one fails (or skips) at once instead
# of each waiting out its own timeouts against a broker that is up but stuck.
_stuck: dict[str, tuple[str, float]] = {}
_LOOK_AGAIN = 60.0


def greets(url: str, wait: float = 5.0) -> str | None:
    """None if the broker at ``url`` answers its protocol's opening (NATS
    sends ``INFO``; RabbitMQ answers the AMQP header with a method frame);
    otherwise why not. A port that accepts and then says nothing is a stuck
    broker, which a plain connect would not notice."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    try:
        with socket.create_connection((host, port), 1.0) as sock:
            sock.settimeout(wait)
            if parts.scheme == "amqp":
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                first, expected = sock.recv(1), b"\x01"  # a method frame: Connection.Start
            else:
                first, expected = sock.recv(5), b"INFO "
    except TimeoutError:
        return f"the broker at {host}:{port} accepted a connection but said nothing in {wait:g} s"
    except OSError as exc:
        return f"no broker at {host}:{port} ({exc.strerror or exc})"
    if not first.startswith(expected):
        return f"the broker at {host}:{port} answered {first!r}, not its protocol's greeting"
    return None


def require(url: str) -> str:
    """Return ``url`` if its broker answers; otherwise skip (or fail in CI)."""
    reason, until = _stuck.get(url, (None, 0.0))
    if reason is None or time.monotonic() >= until:
        # Twice, so one slow moment on a loaded machine is not a stuck broker.
        reason = greets(url) and greets(url)
    if reason is not None:
        _stuck[url] = (reason, max(until, time.monotonic() + _LOOK_AGAIN))
        unavailable(reason)
    _stuck.pop(url, None)
    return url


def unavailable(reason: str) -> NoReturn:
    """Skip the test for want of a broker (or its binary); fail when ``CI`` is
    set, since CI must have it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the broker must be there)")
    pytest.skip(reason)


# -- ports --------------------------------------------------------------------


class PortClash(Exception):
    """A port picked ahead was taken by someone else before our bind."""


@asynccontextmanager
async def opened(place: str, **options: Any) -> AsyncIterator[pigeon.Connection]:
    """A started connection (``options`` as for ``pigeon.connect``) on
    ``place``: "bind" (a node of its own on a free port), "nats" or "amqp"
    (the broker, as :func:`require` finds it), or any other URL as it is."""
    if place == "bind":
        conn = pigeon.connect(bind=ANY_PORT, **options)
    elif place == "nats":
        conn = pigeon.connect(require(NATS_URL), **options)
    elif place == "amqp":
        conn = pigeon.connect(require(AMQP_URL), **options)
    else:
        conn = pigeon.connect(place, **options)
    async with conn:
        yield conn


def free_port() -> int:
    """A port nobody had bound a moment ago. Only for a test that must know
    the port before binding it, and that retries on :class:`PortClash`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_tcp() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def port_taken(text: object) -> bool:
    """Does this error (or output) say a bind was refused for a port in use?"""
    return ADDRESS_IN_USE in str(text) or "EADDRINUSE" in str(text)


def retry_on_port_clash(run: Callable[[], T], attempts: int = 5) -> T:
    """Call ``run`` (which picks its ports afresh each time) until it does not
    raise :class:`PortClash`, at most ``attempts`` times."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except PortClash:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


class Unlistened:
    """A TCP address where nobody listens, held for the test: the port is
    bound (so nobody else can take it) but never listened on, so connections
    to it are refused."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- subprocesses -------------------------------------------------------------


def tail(text: str | bytes | None, limit: int = 4000) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text if len(text) <= limit else "…" + text[-limit:]


def describe(
    what: str,
    returncode: int | None,
    stderr: str | bytes | Path | None,
    stdout: str | bytes | Path | None = None,
) -> str:
    """How a child process ended, for an assertion message: its exit code
    (or that it is still running), its stderr and, if given, its stdout."""

    def read(source: str | bytes | Path | None) -> str:
        if isinstance(source, Path):
            try:
                return tail(source.read_bytes())
            except OSError as exc:
                return f"<cannot read {source}: {exc}>"
        return tail(source)

    status = "still running" if returncode is None else f"exit code {returncode}"
    parts = [f"{what}: {status}", f"--- stderr ---\n{read(stderr)}"]
    if stdout is not None:
        parts.append(f"--- stdout ---\n{read(stdout)}")
    return "\n".join(parts)


def completed(done: subprocess.CompletedProcess[str], what: str = "") -> str:
    """:func:`describe` for a finished ``subprocess.run``."""
    name = what or " ".join(str(a) for a in done.args)[:200]
    return describe(name, done.returncode, done.stderr, done.stdout)


# -- leaving the shared RabbitMQ as it was ----------------------------------


def delete_amqp_queues(url: str, names: list[str]) -> None:
    """Delete these RabbitMQ queues (gone already is fine)."""
    import aio_pika

    async def delete() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        async with connection:
            channel = await connection.channel()
            for name in names:
                await channel.queue_delete(name)

    asyncio.run(delete())


async def delete_idle_queues_recorded_since(url: str, since: float) -> tuple[int, int]:
    """Delete the work queues (and their dead-letter queues) that pigeon
    recorded in RabbitMQ's inventory since ``since`` (epoch seconds), where
    they are empty and nobody consumes them; then compact the inventory to
    the names of queues that still exist. Returns (queues deleted, names
    dropped from the inventory).

    Each suite run declares a few dozen uniquely named quorum queues, and a
    broker that keeps collecting them run after run gets slower for every
    later run; so does ``pigeon queues`` for every name of a deleted queue
    its inventory still holds. Only empty queues nobody consumes go, so a
    message is never lost with one."""
    from datetime import UTC, datetime

    import aio_pika

    from pigeon.admin.amqp import AmqpAdmin
    from pigeon.transports.amqp import inventory

    connection = await aio_pika.connect(url, timeout=5)
    # pigeon's own admin counts the queues and reads the stream to its end.
    admin = await AmqpAdmin.open(url, timeout=30.0)
    async with connection:
        try:
            start = datetime.fromtimestamp(max(since - 1, 1), UTC)
            names = sorted(await _inventory_names(connection, start))
            found = await admin._counts(names + [f"{n}.dead" for n in names])
            # Quorum queues refuse delete's if-unused and if-empty flags, so
            # the counts are read first (CI is alone on the broker by now:
            # nothing starts using it between).
            idle = sorted(name for name, counts in found.items() if counts == (0, 0))
            async with connection.channel() as own:
                for name in idle:
                    await own.queue_delete(name)
            # Compacted: the stream is deleted and the names of queues that
            # still exist (or whose dead-letter queue does) are recorded anew.
            everything = await admin.inventory()
            found = await admin._counts(everything + [f"{n}.dead" for n in everything])
        finally:
            await admin.close()
        kept = [n for n in everything if found.get(n) or found.get(f"{n}.dead")]
        async with connection.channel() as own:
            await own.queue_delete(inventory.QUEUE)
        if kept and not await inventory.record(connection, kept, url):
            raise RuntimeError(f"could not record {len(kept)} names in the new inventory")
    return len(idle), len(everything) - len(kept)


async def _inventory_names(connection: Any, offset: Any) -> set[str]:
    """The queue names in pigeon's inventory stream from ``offset`` on."""
    import aio_pika
    import aiormq

    from pigeon._core.limits import check_name
    from pigeon.transports.amqp import inventory

    names: set[str] = set()
    async with connection.channel() as channel:
        await channel.set_qos(prefetch_count=1000)
        try:
            stream = await channel.declare_queue(inventory.QUEUE, passive=True)
        except aiormq.exceptions.ChannelClosed:
            return names  # nothing recorded
        if not stream.declaration_result.message_count:
            return names  # (a consume of a stream just declared can crash the channel)
        entries: asyncio.Queue[str] = asyncio.Queue()

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            entries.put_nowait(message.body.decode("utf-8", "replace"))
            await message.ack()

        await stream.consume(take, arguments={"x-stream-offset": offset})
        while len(names) < 100_000:
            try:
                name = await asyncio.wait_for(entries.get(), 0.5)
            except TimeoutError:
                break  # read to the end
            with contextlib.suppress(ValueError):  # (any client may write the stream)
                names.add(check_name(name, "queue"))
    return names
