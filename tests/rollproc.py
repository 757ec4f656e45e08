"""Child processes for the rolling-restart test: a fleet as an operator runs
it. Workers and servers are :class:`pigeon.App` programs stopped by SIGTERM
(``App.run`` drains them); a producer with a durable outbox and a caller run
at a steady rate until SIGTERM, then finish what they started.

Run as ``python tests/rollproc.py ROLE NAME URL [URL...]`` (a server also
takes ``--work=SECONDS``, how long its handler takes). Events go to
stdout as JSON lines (``ev`` says which), errors to stderr:

- every role: ``ready`` once started (a server adds the ``url`` it bound),
  ``stopped`` with its counters once it has stopped;
- worker: ``processed`` (``id``, ``redelivered``, ``attempt``) as a handler
  starts on a message;
- producer: ``sent`` (``id``) as a send is made, ``confirmed`` (``id``)
  once the outbox has it on disk (from then on it is pigeon's to deliver),
  ``failed`` for a send that raised, and ``flushed`` once the host has
  confirmed everything after SIGTERM;
- server: ``served`` (``call``: the caller's name and number) as a
  handler starts on a request;
- caller: ``call`` (``n``, ``ok``, and ``server`` or ``error``) per call.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

import pigeon

QUEUE = "jobs"
SERVICE = "svc"
# Seconds between heartbeats: a peer is dead after three missed ones, and a
# busy machine can starve a process for a good part of a second.
HEARTBEAT = 0.5
# Seconds a handler takes: three workers keep up with PRODUCE_RATE, two do
# not, so while one restarts the others hold full prefetch windows and a
# worker that stops has work to hand back.
WORK = 0.025
PRODUCE_RATE = 100.0  # messages per second
CALL_RATE = 50.0  # calls per second
# A call may wait this long: far more than a server restart takes, so only
# a real failure (no server left, an error) ends a call without its reply.
CALL_TIMEOUT = 30.0
# Far above anything the test waits for: a redelivery seen here came from a
# hand-back, a lost host or a restart, never from a lease running out.
LEASE = 120.0
MAX_IN_FLIGHT = 2000  # unfinished sends or calls before the pace waits


def emit(**event: object) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def stop_on_sigterm() -> asyncio.Event:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


class ReportingApp(pigeon.App):
    """An App that says when it has started; ``run`` is pigeon's own."""

    async def start(self) -> pigeon.Connection:
        conn = await super().start()
        emit(ev="ready", url=(conn.stats()["bound"] or [None])[0])
        return conn


def worker(name: str, urls: list[str]) -> None:
    app = ReportingApp(urls, heartbeat=HEARTBEAT)

    @app.worker(QUEUE, prefetch=16, lease_ttl=LEASE)
    async def process(message: pigeon.Message) -> None:
        emit(
            ev="processed",
            id=message.id,
            redelivered=message.redelivered,
            attempt=message.attempt,
            worker=name,
            t=time.time(),
        )
        await asyncio.sleep(WORK)

    app.run()  # until SIGTERM, then drains
    assert app.connection is not None
    emit(ev="stopped", stats=app.connection.stats()["workers"][0])


def server(name: str, urls: list[str], work: float = WORK) -> None:
    app = ReportingApp(bind=urls, heartbeat=HEARTBEAT)

    @app.service(SERVICE)
    async def answer(message: pigeon.Message) -> str:
        emit(ev="served", call=message.text, t=time.time())
        await asyncio.sleep(work)
        return name

    app.run()  # until SIGTERM, then drains
    assert app.connection is not None
    stats = app.connection.stats()
    emit(ev="stopped", stats=stats["servers"][0], expired_requests=stats["expired_requests"])


async def producer(name: str, urls: list[str], outbox: str) -> None:
    """Send at PRODUCE_RATE through a durable outbox until SIGTERM, then wait
    until the host has confirmed everything."""
    stop = stop_on_sigterm()
    async with pigeon.connect(urls, outbox=outbox, heartbeat=HEARTBEAT) as conn:
        emit(ev="ready", restored=conn.stats()["outbox"]["restored"])
        in_flight: set[asyncio.Future[None]] = set()

        def settled(message_id: str, future: asyncio.Future[None]) -> None:
            in_flight.discard(future)
            if future.cancelled() or future.exception() is not None:
                emit(ev="failed", id=message_id, error=repr(future.exception()))
            else:
                emit(ev="confirmed", id=message_id)

        await _paced(
            stop,
            PRODUCE_RATE,
            in_flight,
            lambda n: _send(conn, f"{name}-{n}", in_flight, settled),
        )
        if in_flight:
            await asyncio.wait(set(in_flight))
        started = time.monotonic()
        await conn.flush(timeout=120.0)
        emit(ev="flushed", seconds=time.monotonic() - started, outbox=conn.stats()["outbox"])
    emit(ev="stopped")


def _send(conn: pigeon.Connection, message_id: str, in_flight: set[Any], settled: Any) -> None:
    emit(ev="sent", id=message_id)
    try:
        future = conn.send_nowait(QUEUE, f"body of {message_id}", message_id=message_id)
    except pigeon.PigeonError as exc:
        emit(ev="failed", id=message_id, error=repr(exc))
        return
    in_flight.add(future)
    future.add_done_callback(lambda f: settled(message_id, f))


async def caller(name: str, urls: list[str]) -> None:
    """Call SERVICE at CALL_RATE until SIGTERM, then wait for every call."""
    stop = stop_on_sigterm()
    async with pigeon.connect(urls, heartbeat=HEARTBEAT) as conn:
        emit(ev="ready")
        in_flight: set[asyncio.Future[None]] = set()

        async def call(n: int) -> None:
            started = time.monotonic()
            try:
                reply = await conn.request(SERVICE, f"{name}-{n}", timeout=CALL_TIMEOUT)
            except pigeon.PigeonError as exc:
                emit(ev="call", n=n, ok=False, error=repr(exc), s=time.monotonic() - started)
                return
            emit(
                ev="call",
                n=n,
                ok=True,
                server=reply.text,
                s=time.monotonic() - started,
                t=time.time(),
            )

        def start(n: int) -> None:
            task = asyncio.ensure_future(call(n))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

        await _paced(stop, CALL_RATE, in_flight, start)
        if in_flight:
            await asyncio.wait(set(in_flight))
        stats = conn.stats()
        emit(
            ev="stopped",
            request_retries=stats["request_retries"],
            late_replies=stats["late_replies"],
        )


async def _paced(stop: asyncio.Event, rate: float, in_flight: set[Any], act: Any) -> None:
    """Call ``act(n)`` for n = 0, 1, … at ``rate`` per second by the clock
    (catching up after a stall) until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    n = 0
    while not stop.is_set():
        delay = started + n / rate - loop.time()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            continue
        if len(in_flight) >= MAX_IN_FLIGHT:
            await asyncio.wait(set(in_flight), return_when=asyncio.FIRST_COMPLETED)
            continue
        act(n)
        n += 1


def main() -> None:
    role, name, *rest = sys.argv[1:]
    if role == "worker":
        worker(name, rest)
    elif role == "server":
        work = [float(a.removeprefix("--work=")) for a in rest if a.startswith("--work=")]
        server(name, [a for a in rest if not a.startswith("--work=")], *work)
    elif role == "producer":
        *urls, outbox = rest
        asyncio.run(producer(name, urls, outbox))
    elif role == "caller":
        asyncio.run(caller(name, rest))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
